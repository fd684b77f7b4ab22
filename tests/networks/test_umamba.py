"""U-Mamba Bot / Enc and their NoMamba twins built from nnU-Net 2.8 plans: output contract, where the Mamba
layers sit and how they scan, the twins, mixed precision, the papers' parameter counts, checkpoints."""

import dataclasses
import io
import json
import math

import pytest
import torch
from torch import nn

from nnunetv2_mobilevim.networks.umamba import (
    MambaLayer,
    UMambaConfig,
    block_counts,
    channel_token_stages,
    count_parameters,
    load_config,
    umamba_from_plan,
)

# Lumetti et al., "Taming Mambas", Table 5 (Synapse), in parameters
PAPER_PARAMS = {"bot": 41.95e6, "enc": 42.85e6}


def make_plan(strides, kernels, features, blocks=2, key="n_conv_per_stage"):
    """nnU-Net 2.8 arch_kwargs as its planners write them (op names as dotted strings)."""
    n, dim = len(strides), len(strides[0])
    return {"n_stages": n, "features_per_stage": list(features), "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [list(k) for k in kernels], "strides": [list(s) for s in strides],
            key: [blocks] * n if isinstance(blocks, int) else list(blocks), "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


# What nnU-Net 2.8's default planner gives Synapse (BTCV) CT: spacing (3, 0.76, 0.76), the 48 x 192 x 192
# crop of Taming Mambas' Table 1, 1 channel, 14 classes (13 organs + background), features 32 -> 320.
SYNAPSE_SPACING, SYNAPSE_PATCH = (3.0, 0.76, 0.76), (48, 192, 192)
SYNAPSE_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
SYNAPSE_KERNELS = [[1, 3, 3]] + [[3, 3, 3]] * 5
SYNAPSE_PLAN = make_plan(SYNAPSE_STRIDES, SYNAPSE_KERNELS, [32, 64, 128, 256, 320, 320])

# Small plans for forward passes on CPU: (arch_kwargs, patch)
PLANS = {
    "isotropic3d": (make_plan([[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, [8, 16, 32, 64]), (16, 16, 16)),
    "anisotropic3d": (make_plan([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [[1, 3, 3]] * 2 + [[3, 3, 3]] * 2,
                                [8, 16, 32, 64]), (4, 32, 24)),
    "2d": (make_plan([[1, 1]] + [[2, 2]] * 4, [[3, 3]] * 5, [8, 16, 32, 64, 64]), (64, 48)),
    "resenc3d": (make_plan([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 4, [8, 16, 32, 64],
                           blocks=[1, 3, 4, 6], key="n_blocks_per_stage"), (4, 32, 16)),
}


def build(plan_name, variant, mamba=True, deep_supervision=True, classes=3):
    plan, patch = PLANS[plan_name]
    return umamba_from_plan(plan, patch, 1, classes, deep_supervision, variant, mamba)


def expected_scales(plan, patch):
    sizes, size = [], list(patch)
    for stride in plan["strides"][:-1]:
        size = [p // s for p, s in zip(size, stride)]
        sizes.append(tuple(size))
    return sizes


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("variant", ["bot", "enc"])
def test_deep_supervision_outputs_and_switch(plan_name, variant):
    plan, patch = PLANS[plan_name]
    net = build(plan_name, variant).eval()
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list) and len(outputs) == plan["n_stages"] - 1
        assert [tuple(o.shape[2:]) for o in outputs] == expected_scales(plan, patch)  # highest resolution first
        assert all(o.shape[:2] == (2, 3) for o in outputs)
        net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
        full = net(x)
    assert isinstance(full, torch.Tensor) and full.shape == (2, 3, *patch)
    torch.testing.assert_close(full, outputs[0])


def test_block_counts_follow_the_released_rule_without_touching_the_plan():
    plan, _ = PLANS["resenc3d"]
    before = json.dumps(plan)
    net = build("resenc3d", "bot")
    assert json.dumps(plan) == before
    # 4 stages: one block from stage ceil(4/2) = 2 on, in the encoder and in the decoder entries
    assert [len(stage) for stage in net.encoder.stages] == [1, 3, 1, 1]
    assert len(net.encoder.stem) == 1
    assert [len(stage) for stage in net.decoder.stages] == [2, 2, 1]
    assert block_counts(6, [2] * 6, [2] * 5, "released") == ([2, 2, 2, 1, 1, 1], [2, 2, 2, 1, 1])
    assert block_counts(6, [2] * 6, [2] * 5, "plan") == ([2] * 6, [2] * 5)


@pytest.mark.parametrize("plan_name,variant,expected", [
    ("isotropic3d", "bot", [False, False, False, True]),
    ("isotropic3d", "enc", [True, True, True, True]),  # every stage, full resolution included
    ("2d", "bot", [False, False, False, False, True]),
    ("2d", "enc", [True, False, True, False, True]),  # the released 2D Enc: every other stage, bottleneck last
])
def test_mamba_layers_sit_where_the_variant_says(plan_name, variant, expected):
    net = build(plan_name, variant)
    assert [isinstance(m, MambaLayer) for m in net.encoder.mamba_layers] == expected
    assert all(isinstance(m, (MambaLayer, nn.Identity)) for m in net.encoder.mamba_layers)


@pytest.mark.parametrize("plan_name,concatenated", [("isotropic3d", True), ("anisotropic3d", True), ("2d", False)])
def test_full_resolution_skip_only_in_3d(plan_name, concatenated):
    """The released 2D networks give the last decoder stage no skip; the 3D ones concatenate all skips."""
    first = PLANS[plan_name][0]["features_per_stage"][0]
    for variant in ("bot", "enc"):
        last = build(plan_name, variant).decoder.stages[-1][0]
        assert last.conv1.in_channels == (2 * first if concatenated else first)


@pytest.mark.parametrize("patch,expected", [
    ((48, 192, 192), [False, False, False, False, False, True]),  # bottleneck 6 x 6 x 6 = 216 <= 320
    ((96, 320, 320), [False] * 6),  # bottleneck 12 x 10 x 10 = 1200 > 320
    ((16, 64, 64), [False, False, False, True, True, True]),
])
def test_channels_as_tokens_follow_the_patch(patch, expected):
    assert channel_token_stages(patch, SYNAPSE_STRIDES, SYNAPSE_PLAN["features_per_stage"]) == expected
    net = umamba_from_plan(SYNAPSE_PLAN, patch, 1, 14, True, "enc")
    assert net.channel_tokens == expected
    sizes, size = [], list(patch)
    for stride in SYNAPSE_STRIDES:
        size = [p // s for p, s in zip(size, stride)]
        sizes.append(math.prod(size))
    for layer, tokens, voxels, channels in zip(net.encoder.mamba_layers, expected, sizes,
                                               SYNAPSE_PLAN["features_per_stage"]):
        assert layer.channel_tokens == tokens
        assert layer.norm.normalized_shape == ((voxels,) if tokens else (channels,))
    bot = umamba_from_plan(SYNAPSE_PLAN, patch, 1, 14, True, "bot")
    assert not any(bot.channel_tokens)  # the released Bot always scans voxels


def test_channel_token_layer_refuses_another_size():
    layer = MambaLayer(16, (2, 3, 4), channel_tokens=True, d_state=4, d_conv=4, expand=2)
    layer(torch.randn(1, 16, 2, 3, 4))
    with pytest.raises(ValueError, match="plan's patch"):
        layer(torch.randn(1, 16, 2, 3, 5))


@pytest.mark.parametrize("spatial", [(3, 4, 5), (6, 7)])
def test_spatial_tokens_scan_in_raster_order(spatial):
    """Reference written out by hand: one token per voxel, last axis fastest, LayerNorm then Mamba."""
    layer = MambaLayer(6, spatial, channel_tokens=False, d_state=4, d_conv=4, expand=2).eval()
    x = torch.randn(2, 6, *spatial)
    with torch.no_grad():
        tokens = x.reshape(2, 6, -1).transpose(1, 2)  # (B, L, C)
        expected = layer.mamba(layer.norm(tokens)).transpose(1, 2).reshape(2, 6, *spatial)
        torch.testing.assert_close(layer(x), expected)


def test_channel_tokens_scan_in_channel_order():
    layer = MambaLayer(5, (2, 3, 4), channel_tokens=True, d_state=4, d_conv=4, expand=2).eval()
    x = torch.randn(2, 5, 2, 3, 4)
    with torch.no_grad():
        expected = layer.mamba(layer.norm(x.reshape(2, 5, 24))).reshape(2, 5, 2, 3, 4)
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("plan_name", ["isotropic3d", "2d"])
@pytest.mark.parametrize("variant", ["bot", "enc"])
def test_twin_differs_only_in_the_mamba_layers(plan_name, variant):
    net, twin = build(plan_name, variant), build(plan_name, variant, mamba=False)
    mamba_prefixes = tuple(f"encoder.mamba_layers.{s}." for s, m in enumerate(net.encoder.mamba_layers)
                           if isinstance(m, MambaLayer))
    assert mamba_prefixes  # the Mamba network has some
    keys = {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.replace("decoder.encoder.", "encoder.", 1).startswith(mamba_prefixes)}
    assert {k: tuple(v.shape) for k, v in twin.state_dict().items()} == keys
    assert all(isinstance(m, nn.Identity) for m in twin.encoder.mamba_layers)
    assert not any(twin.mamba_stages)
    # identity really: the twin's encoder output is its conv stages' output
    x = torch.randn(1, 1, *PLANS[plan_name][1])
    with torch.no_grad():
        features = twin.encoder.stem(x)
        for stage, skip in zip(twin.encoder.stages, twin.encoder(x)):
            features = stage(features)
            torch.testing.assert_close(skip, features)


def _half_dtype():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3))
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


@pytest.mark.parametrize("plan_name", ["isotropic3d", "2d"])
@pytest.mark.parametrize("variant", ["bot", "enc"])
def test_half_precision_autocast_gives_finite_outputs(plan_name, variant):
    net = build(plan_name, variant)
    dtype, seen = _half_dtype(), []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
             for m in net.encoder.mamba_layers if isinstance(m, MambaLayer)]
    x = torch.randn(1, 1, *PLANS[plan_name][1]) * 100  # large activations, as in CT intensities
    with torch.autocast("cpu", dtype=dtype):
        outputs = net(x)
    for h in hooks:
        h.remove()
    assert seen and all(d == torch.float32 for d in seen)  # the Mamba layers ran in float32
    assert all(torch.isfinite(o.float()).all() for o in outputs)
    sum(o.float().mean() for o in outputs).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_synapse_plan_is_nnunets():
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    _, strides, kernels, patch, _ = get_pool_and_conv_props(list(SYNAPSE_SPACING), SYNAPSE_PATCH, 4, 999999)
    assert [list(s) for s in strides] == SYNAPSE_STRIDES
    assert [list(k) for k in kernels] == SYNAPSE_KERNELS
    assert tuple(int(p) for p in patch) == SYNAPSE_PATCH


@pytest.mark.parametrize("variant", ["bot", "enc"])
def test_parameter_count_within_two_percent_of_taming_mambas(variant):
    net = umamba_from_plan(SYNAPSE_PLAN, SYNAPSE_PATCH, 1, 14, True, variant)
    params = count_parameters(net)
    assert abs(params / PAPER_PARAMS[variant] - 1) <= 0.02, params
    twin = count_parameters(umamba_from_plan(SYNAPSE_PLAN, SYNAPSE_PATCH, 1, 14, True, variant, mamba=False))
    mamba_params = sum(p.numel() for m in net.encoder.mamba_layers for p in m.parameters())
    assert twin == params - mamba_params > 0


@pytest.mark.parametrize("plan_name", ["anisotropic3d", "2d"])
def test_conv_feature_map_size_for_the_planner(plan_name):
    patch = PLANS[plan_name][1]
    sizes = {build(plan_name, "enc", mamba=m).compute_conv_feature_map_size(patch) for m in (True, False)}
    assert len(sizes) == 1 and sizes.pop() > 0  # conv outputs only: the twin's count equals the network's


@pytest.mark.parametrize("variant", ["bot", "enc"])
def test_checkpoint_round_trip(variant):
    plan, patch = PLANS["isotropic3d"]
    net = build("isotropic3d", variant).eval()
    buffer = io.BytesIO()
    torch.save({"network_weights": net.state_dict()}, buffer)  # as nnU-Net's checkpoint holds them
    buffer.seek(0)
    torch.manual_seed(1)
    other = build("isotropic3d", variant).eval()
    assert any(not torch.equal(a, b) for a, b in zip(other.state_dict().values(), net.state_dict().values()))
    other.load_state_dict(torch.load(buffer, weights_only=True)["network_weights"], strict=True)
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        for a, b in zip(other(x), net(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_files_are_checked(tmp_path):
    assert load_config("bot").mamba_stages_3d == "bottleneck"
    assert load_config("enc").channel_tokens is True
    data = load_config("enc").to_dict()
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({**data, "dstate": 16}))
    with pytest.raises(ValueError, match=r"typo\.json.*dstate"):
        load_config(path)
    del data["d_state"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"typo\.json.*missing.*d_state"):
        load_config(path)
    path.write_text(json.dumps({**data, "d_state": 16, "mamba_stages_3d": "every"}))
    with pytest.raises(ValueError, match=r"typo\.json.*mamba_stages_3d"):
        load_config(path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config("bot").mamba = False


def test_plans_it_cannot_honour_are_refused():
    plan, patch = PLANS["isotropic3d"]
    with pytest.raises(ValueError, match="stochastic_depth_p"):
        umamba_from_plan({**plan, "stochastic_depth_p": 0.1}, patch, 1, 3, True)
    with pytest.raises(ValueError, match="dropout"):
        umamba_from_plan({**plan, "dropout_op": "torch.nn.Dropout3d"}, patch, 1, 3, True)
    with pytest.raises(ValueError, match="divisible"):
        umamba_from_plan(plan, (14, 16, 16), 1, 3, True)
    with pytest.raises(ValueError, match="importable"):
        umamba_from_plan({**plan, "norm_op": "torch.nn.NoSuchNorm"}, patch, 1, 3, True)
    one_stage = {k: (v[:1] if isinstance(v, list) and len(v) == plan["n_stages"] else v) for k, v in plan.items()}
    with pytest.raises(ValueError, match="n_stages >= 2"):
        umamba_from_plan({**one_stage, "n_stages": 1, "n_conv_per_stage_decoder": []}, patch, 1, 3, True)


def test_twin_from_the_config_file(tmp_path):
    data = {**load_config("enc").to_dict(), "mamba": False}
    path = tmp_path / "enc_nomamba.json"
    path.write_text(json.dumps(data))
    plan, patch = PLANS["isotropic3d"]
    net = umamba_from_plan(plan, patch, 1, 3, True, path)
    assert isinstance(UMambaConfig.from_dict(data), UMambaConfig)
    assert all(isinstance(m, nn.Identity) for m in net.encoder.mamba_layers)
