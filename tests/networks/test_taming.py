"""Taming Mambas networks (Lumetti et al.): plans, scan orders, the NoMamba twin, precision, size, init.

Expected values come from the paper (Sec. 3, Table 5) and from nnU-Net's plan rules, not from the code.
"""

import json
import math

import numpy as np
import pytest
import torch

from nnunetv2_mobilevim.networks.taming import (
    SHIPPED_VARIANTS,
    TamingConfig,
    TamingMambaLayer,
    count_parameters,
    load_taming_config,
    taming_from_plan,
)

VARIANTS = ["segmamba", "bisegmamba", "multisegmamba", "segmambaskip"]

# Table 5 (Synapse), millions of parameters
TABLE5 = {"segmamba": 61.49e6, "bisegmamba": 64.75e6, "multisegmamba": 68.46e6, "segmambaskip": 62.36e6}

# Sec. 3.2 and its footnote: the paper's (H, W, D) are the first, second and third spatial axis
PAPER_PERMUTATIONS_3D = {
    "segmamba": [(0, 1, 2)],
    "bisegmamba": [(0, 1, 2)],
    "multisegmamba": [(0, 1, 2), (0, 2, 1), (1, 0, 2), (2, 1, 0)],  # (H,W,D) (H,D,W) (W,H,D) (D,W,H)
    "segmambaskip": [(0, 1, 2)],
}
# the paper is 3D only; in 2D, Multi reads both axis orders
PERMUTATIONS_2D = {v: [(0, 1), (1, 0)] if v == "multisegmamba" else [(0, 1)] for v in PAPER_PERMUTATIONS_3D}
BIDIRECTIONAL = {"segmamba": False, "bisegmamba": True, "multisegmamba": True, "segmambaskip": True}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: on a loaded two-core machine, handing them between two threads costs
    100x the work itself."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def plan(dim, features, strides, blocks_key="n_conv_per_stage"):
    """nnU-Net 2.8 network_arch_init_kwargs as a plans file holds them (dotted names)."""
    n = len(features)
    return {
        "n_stages": n, "features_per_stage": list(features),
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": [[3] * dim] * n, "strides": [list(s) for s in strides],
        blocks_key: [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


def synapse_plan():
    """Synapse 3d_fullres as nnU-Net's planner lays it out for the paper's spacing and crop (Table 1):
    strides and kernels from nnU-Net's get_pool_and_conv_props, features min(32 * 2^i, 320), two
    residual blocks per stage (the default plan's n_conv_per_stage, read as blocks by the paper's base)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    _, strides, kernels, patch, _ = get_pool_and_conv_props((3.0, 0.76, 0.76), (48, 192, 192), 4, 999999)
    n = len(kernels)
    kwargs = plan(3, [min(32 * 2 ** i, 320) for i in range(n)], strides)
    kwargs["kernel_sizes"] = [list(k) for k in kernels]
    return kwargs, tuple(int(p) for p in patch)


PLANS = {  # name: (arch kwargs, patch); tiny so that the CPU scan stays fast
    "3d_isotropic": (plan(3, [4, 8, 16], [[1, 1, 1], [2, 2, 2], [2, 2, 2]]), (8, 8, 8)),
    "3d_anisotropic": (plan(3, [4, 8, 8, 16], [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]], "n_blocks_per_stage"),
                       (4, 24, 16)),
    "2d": (plan(2, [4, 8, 16], [[1, 1], [2, 2], [2, 2]]), (12, 16)),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_deep_supervision_list_and_full_resolution_logits(variant, plan_name):
    kwargs, patch = PLANS[plan_name]
    net = taming_from_plan(kwargs, patch, 2, 3, True, variant).eval()
    x = torch.randn(1, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
    strides = np.cumprod(np.array(kwargs["strides"]), axis=0)
    assert isinstance(outputs, list) and len(outputs) == len(kwargs["features_per_stage"]) - 1
    for out, stride in zip(outputs, strides):  # highest resolution first
        assert out.shape == (1, 3, *(p // s for p, s in zip(patch, stride)))
    net.decoder.deep_supervision = False
    with torch.no_grad():
        full = net(x)
    assert isinstance(full, torch.Tensor) and full.shape == (1, 3, *patch)
    torch.testing.assert_close(full, outputs[0])


@pytest.mark.parametrize("variant", ["multisegmamba", "segmambaskip"])
def test_every_parameter_gets_a_gradient(variant):
    kwargs, patch = PLANS["3d_anisotropic"]
    net = taming_from_plan(kwargs, patch, 1, 3, True, variant)
    sum(out.square().mean() for out in net(torch.randn(2, 1, *patch))).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_plan_from_nnunet_planner_anisotropic_patch():
    """A planner's anisotropic patch (strides with 1s) builds; a patch the strides do not divide is refused."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    _, strides, kernels, patch, _ = get_pool_and_conv_props((3.0, 0.8, 0.8), (40, 224, 192), 4, 999999)
    assert any(1 in s for s in strides[1:])
    kwargs = plan(3, [min(32 * 2 ** i, 320) for i in range(len(kernels))], strides)
    kwargs["kernel_sizes"] = [list(k) for k in kernels]
    with torch.device("meta"):
        net = taming_from_plan(kwargs, patch, 1, 14, True, "multisegmamba")
    assert len(net.deep_supervision_scales()) == len(kernels) - 1
    with pytest.raises(ValueError, match="not divisible"):
        taming_from_plan(kwargs, (41, 224, 192), 1, 14, True, "segmamba")


# ---- scan orders ---------------------------------------------------------------------------------

def expected_rank(spatial, permutation, backwards):
    """Position of every voxel in the token sequence of (permutation, direction): (*spatial) ints.
    Independent of the code under test: the raster index of the permuted grid position."""
    grid = np.indices(spatial)  # (ndim, *spatial)
    permuted_index = tuple(grid[a] for a in permutation)
    rank = np.ravel_multi_index(permuted_index, [spatial[a] for a in permutation])
    return rank.size - 1 - rank if backwards else rank


def only_branch(layer, keep):
    """Silence every Mamba block but ``keep``: the other branches become per-token maps. In float64
    (the float32 guard off), so that effects across the whole sequence stand far above rounding."""
    layer.double()
    with torch.no_grad():
        for g, block in enumerate(layer.mamba.blocks):
            block.float32 = False
            if g != keep:
                block.out_proj.weight.zero_()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spatial", [(3, 4, 5), (5, 7)])
def test_each_branch_sees_exactly_the_tokens_before_it_in_its_order(variant, spatial):
    """Perturb one voxel: with one branch's Mamba left, the effect is zero on every voxel that comes
    before it in that branch's order and non-zero on the voxel and every one after it."""
    config = load_taming_config(variant)
    permutations = (PAPER_PERMUTATIONS_3D if len(spatial) == 3 else PERMUTATIONS_2D)[variant]
    directions = (False, True) if BIDIRECTIONAL[variant] else (False,)
    expected_orders = [(p, d) for p in permutations for d in directions]  # forward then backward per permutation
    channels = 6
    x = torch.randn(1, channels, *spatial, dtype=torch.float64)
    probe = tuple(s // 2 for s in spatial)
    bumped = x.clone()
    # a random vector, not a constant: the entry LN removes constant shifts
    bumped[(0, slice(None), *probe)] += 3.0 * torch.randn(channels, dtype=torch.float64)
    for g, (permutation, backwards) in enumerate(expected_orders):
        torch.manual_seed(g)
        layer = TamingMambaLayer(channels, config.scan_orders(len(spatial)), config.bidirectional, d_state=4).eval()
        assert len(layer.mamba.blocks) == len(expected_orders)  # all orders in one MambaGroup
        only_branch(layer, g)
        with torch.no_grad():
            effect = (layer(bumped) - layer(x)).abs().amax(1)[0].numpy()
        rank = expected_rank(spatial, permutation, backwards)
        before, after = rank < rank[probe], rank >= rank[probe]
        assert effect[before].max() == 0, (permutation, backwards)
        assert effect[after].min() > 1e-12 * effect.max(), (permutation, backwards)


def test_unidirectional_layer_does_not_see_later_tokens_in_raster_order():
    layer = TamingMambaLayer(4, [(0, 1, 2)], bidirectional=False, d_state=4).eval()
    x = torch.randn(1, 4, 2, 3, 4)
    bumped = x.clone()
    bumped[0, :, 1, 2, 3] += 3.0 * torch.randn(4)  # the last voxel of the raster order
    with torch.no_grad():
        effect = (layer(bumped) - layer(x)).abs().amax(1)[0]
    assert effect.flatten()[:-1].max() == 0 and effect[1, 2, 3] > 0


def test_multi_layer_is_the_mean_of_four_bidirectional_layers():
    """Fig. 3: MultiSegMamba's layer averages four Bidirectional 3D Mamba Layers, one per permutation;
    running its eight blocks as one group gives what four separate layers give."""
    channels, spatial = 6, (3, 4, 5)
    multi = TamingMambaLayer(channels, PAPER_PERMUTATIONS_3D["multisegmamba"], True, d_state=4).eval()
    state = multi.state_dict()
    x = torch.randn(2, channels, *spatial)
    outputs = []
    for p, permutation in enumerate(PAPER_PERMUTATIONS_3D["multisegmamba"]):
        bi = TamingMambaLayer(channels, [permutation], True, d_state=4).eval()
        branch = {2 * p: 0, 2 * p + 1: 1}
        picked = {}
        for key, value in state.items():
            parts = key.split(".")
            index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
            if index is None:
                picked[key] = value
            elif parts[0] == "out_norms" and int(parts[1]) == p:
                picked[".".join(["out_norms", "0", *parts[2:]])] = value
            elif parts[0] != "out_norms" and int(parts[index]) in branch:
                parts[index] = str(branch[int(parts[index])])
                picked[".".join(parts)] = value
        bi.load_state_dict(picked)
        with torch.no_grad():
            outputs.append(bi(x))
    with torch.no_grad():
        torch.testing.assert_close(multi(x), torch.stack(outputs).mean(0), rtol=1e-5, atol=1e-5)


# ---- the NoMamba twin ----------------------------------------------------------------------------

def is_mamba_key(key):
    return ".mamba." in key or ".mamba_norms." in key


@pytest.mark.parametrize("variant", VARIANTS)
def test_twin_differs_only_in_the_mamba_sublayers(variant):
    kwargs, patch = PLANS["3d_isotropic"]
    net = taming_from_plan(kwargs, patch, 1, 3, False, variant).eval()
    twin = taming_from_plan(kwargs, patch, 1, 3, False, variant, mamba=False).eval()
    full_state, twin_state = net.state_dict(), twin.state_dict()
    assert any(is_mamba_key(k) for k in full_state) and not any(is_mamba_key(k) for k in twin_state)
    assert {k: v.shape for k, v in full_state.items() if not is_mamba_key(k)} == \
        {k: v.shape for k, v in twin_state.items()}
    twin.load_state_dict({k: v for k, v in full_state.items() if not is_mamba_key(k)})
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        assert not torch.allclose(net(x), twin(x), atol=1e-4)
        for layer in net.mamba_layers:  # a Mamba Block that adds nothing: the twin
            for block in layer.mamba.blocks:
                block.out_proj.weight.zero_()
        torch.testing.assert_close(net(x), twin(x))


# ---- precision -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["segmamba", "multisegmamba", "segmambaskip"])
def test_autocast_forward_is_finite_and_mamba_computes_in_float32(variant, dtype):
    kwargs, patch = PLANS["3d_isotropic"]
    net = taming_from_plan(kwargs, patch, 1, 3, False, variant).eval()
    calls = []
    hooks = []
    for layer in net.mamba_layers:
        assert all(block.float32 for block in layer.mamba.blocks)
        hooks.append(layer.mamba.register_forward_hook(lambda m, i, o: calls.append((m, i[0], o))))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = net(100 * torch.randn(1, 1, *patch))
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(out).all()
    assert len(calls) == len(net.mamba_layers)
    with torch.no_grad():  # the same Mamba blocks outside autocast, in float32: the same numbers
        for group, inputs, outputs in calls:
            torch.testing.assert_close(outputs.float(), group(inputs.float()), rtol=1e-5, atol=1e-5)


# ---- size and initialisation ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", [
    "segmamba", "bisegmamba", "segmambaskip",
    pytest.param("multisegmamba", marks=pytest.mark.xfail(
        strict=True, reason="eight independent Mamba Layers per stage as Sec. 3.2 describes them are ~26 % "
                            "above Table 5's 68.46 M; no d_state fits (see the report / docs)")),
])
def test_parameter_count_within_two_percent_of_table5(variant):
    kwargs, patch = synapse_plan()
    with torch.device("meta"):
        net = taming_from_plan(kwargs, patch, 1, 14, True, variant)
    assert abs(count_parameters(net) / TABLE5[variant] - 1) <= 0.02, count_parameters(net)


def test_multisegmamba_count_of_table5_is_reproduced_by_expand_1_and_d_state_64():
    """The one configuration near Table 5's 68.46 M for MultiSegMamba
    (docs/benchmarks/cpu_multisegmamba_count_grid.txt): the released code's d_state = min(C, 64) with Mamba's
    expand 1, within 0.5 %. It is neither the paper's text
    (d_state 256: 86.31 M) nor the released code (expand 2: 77.66 M); docs/networks.md asks which to follow."""
    import dataclasses

    kwargs, patch = synapse_plan()
    config = dataclasses.replace(load_taming_config("multisegmamba"), expand=1, d_state_max=64)
    with torch.device("meta"):
        net = taming_from_plan(kwargs, patch, 1, 14, True, config)
        released = taming_from_plan(kwargs, patch, 1, 14, True,
                                    dataclasses.replace(load_taming_config("multisegmamba"), d_state_max=64))
    assert abs(count_parameters(net) / TABLE5["multisegmamba"] - 1) <= 0.005, count_parameters(net)
    assert abs(count_parameters(released) / 77.65e6 - 1) <= 0.005, count_parameters(released)  # Table 5's "(c)"


def test_synapse_base_and_twins():
    """The base is nnU-Net's residual U-Net (~57.2 M); each twin adds only per-token norms and heads."""
    from dynamic_network_architectures.architectures.unet import ResidualUNet
    from torch import nn
    kwargs, patch = synapse_plan()
    n = kwargs["n_stages"]
    with torch.device("meta"):
        base = ResidualUNet(1, n, kwargs["features_per_stage"], nn.Conv3d, kwargs["kernel_sizes"], kwargs["strides"],
                            2, 14, 2, True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                            nn.LeakyReLU, {"inplace": True})
        for variant in VARIANTS:
            twin = taming_from_plan(kwargs, patch, 1, 14, True, variant, mamba=False)
            net = taming_from_plan(kwargs, patch, 1, 14, True, variant)
            heads = sum(p.numel() for layer in twin.mamba_layers for p in layer.parameters())
            assert count_parameters(twin) == count_parameters(base) + heads
            assert count_parameters(base) < count_parameters(twin) < count_parameters(net)
    assert abs(count_parameters(base) / 57.2e6 - 1) < 0.005


@pytest.mark.parametrize("variant", VARIANTS)
def test_d_state_rule_and_placement_on_synapse(variant):
    kwargs, patch = synapse_plan()
    with torch.device("meta"):
        net = taming_from_plan(kwargs, patch, 1, 14, True, variant)
    features = kwargs["features_per_stage"]
    # Fig. 2: SegMambaSkip's layers sit on the skip connections only, the others after every stage
    places = features[:-1] if variant == "segmambaskip" else features
    assert [layer.channels for layer in net.mamba_layers] == places
    for layer, channels in zip(net.mamba_layers, places):
        assert {b.d_state for b in layer.mamba.blocks} == {min(channels, 256)}  # Sec. 3.3


@pytest.mark.parametrize("variant", VARIANTS)
def test_residual_projections_start_scaled_by_one_over_sqrt_n(variant):
    """Sec. 3.3: the residual layers (each Mamba Block's out_proj, each head) start at their default
    initialisation, bound 1/sqrt(fan_in), divided by sqrt(N), N the residual layers of the network."""
    kwargs = plan(3, [16, 32, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    net = taming_from_plan(kwargs, (8, 8, 8), 1, 3, True, variant)
    places = 2 if variant == "segmambaskip" else 3
    branches = len(PAPER_PERMUTATIONS_3D[variant]) * (2 if BIDIRECTIONAL[variant] else 1)
    n = 2 * branches * places
    for layer in net.mamba_layers:
        for linear, rescaled in [(b.out_proj, True) for b in layer.mamba.blocks] + \
                                [(h, True) for h in layer.heads] + [(b.in_proj, False) for b in layer.mamba.blocks]:
            bound = 1 / math.sqrt(linear.in_features) / (math.sqrt(n) if rescaled else 1)
            peak = linear.weight.abs().max().item()
            assert 0.8 * bound < peak <= bound, (linear, n)


# ---- configuration as data -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_configurations_follow_the_paper(variant):
    config = load_taming_config(variant)
    assert [tuple(o) for o in config.scan_orders_3d] == PAPER_PERMUTATIONS_3D[variant]
    assert config.bidirectional == BIDIRECTIONAL[variant]
    assert config.d_state_max == 256 and config.mamba and config.rescale_residual_init
    assert config.placement == ("skips" if variant == "segmambaskip" else "encoder")


def test_configuration_refuses_unknown_missing_and_bad_keys(tmp_path):
    data = load_taming_config("segmamba").to_dict()
    for broken, key in [({**data, "d_stat_max": 16}, "d_stat_max"),
                        ({k: v for k, v in data.items() if k != "placement"}, "placement"),
                        ({**data, "scan_orders_3d": [[0, 1, 1]]}, "scan_orders_3d")]:
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=key) as err:
            load_taming_config(path)
        assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="unknown Taming Mambas variant"):
        load_taming_config("segmambaa")
    assert set(SHIPPED_VARIANTS) == set(VARIANTS)
    assert isinstance(load_taming_config(TamingConfig.from_dict(data)), TamingConfig)
