"""MobileViM as a whole: parameter budget, every nnU-Net patch, deep supervision, errors, training."""

import json

import pytest
import torch
import torch.nn.functional as F
from dimin_reference import reference_dimin

from nnunetv2_mobilevim import MobileViM, MobileViMConfig, count_parameters, load_config

PAPER_PARAMS = {"s": 6.29e6, "xs": 2.89e6}


@pytest.mark.parametrize("variant", ["s", "xs"])
def test_parameter_count_within_two_percent_of_paper(variant):
    net = MobileViM(input_channels=1, num_classes=4, variant=variant, deep_supervision=True)
    params = count_parameters(net, deep_supervision_heads=False)
    assert abs(params / PAPER_PARAMS[variant] - 1) <= 0.02, params
    assert count_parameters(net) > params  # the heads exist and are excluded above


def test_xs_is_smaller_than_s():
    s = count_parameters(MobileViM(input_channels=1, num_classes=4, variant="s"))
    xs = count_parameters(MobileViM(input_channels=1, num_classes=4, variant="xs"))
    assert xs < 0.5 * s


# (patch, per-axis strides as an nnU-Net 3d_fullres plan gives its first four pooling steps)
PLANNED_PATCHES = [
    ((20, 256, 224), [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
    ((48, 192, 192), [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
    ((80, 160, 160), [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
    ((128, 128, 128), None),
]


@pytest.mark.parametrize("patch,strides", PLANNED_PATCHES)
def test_every_planned_patch_keeps_its_size(patch, strides):
    net = MobileViM(input_channels=1, num_classes=3, variant="xs", strides=strides).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, *patch))
    assert out.shape == (1, 3, *patch)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("channels,classes", [(1, 2), (2, 5), (3, 17), (4, 43)])
def test_channels_and_classes(channels, classes):
    net = MobileViM(input_channels=channels, num_classes=classes, variant="xs").eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, 32, 32, 32))
    assert out.shape == (2, classes, 32, 32, 32)


def test_profile_not_divisible_by_token_size():
    # stage-4 depth profile: 48 / (1*2*2*2) = 6, stage 3: 6, stage 2: 12 ... and 40 -> 5 (odd) at the bottom
    net = MobileViM(input_channels=1, num_classes=2, variant="xs",
                    strides=[[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 40, 48, 80))  # bottom 5 x 3 x 5: odd lengths everywhere
    assert out.shape == (1, 2, 40, 48, 80)


def test_size_not_a_multiple_of_total_stride_is_padded_and_cropped():
    net = MobileViM(input_channels=1, num_classes=2, variant="xs").eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 33, 47, 18))
    assert out.shape == (1, 2, 33, 47, 18)


def test_patch_too_small_names_patch_and_requirement():
    net = MobileViM(input_channels=1, num_classes=2, variant="xs")
    with pytest.raises(ValueError, match=r"patch size \[8, 64, 64\].*\[16, 16, 16\]"):
        net(torch.randn(1, 1, 8, 64, 64))
    with pytest.raises(ValueError, match="3D network"):
        net.check_input_size((64, 64))


def test_wrong_number_of_input_channels():
    net = MobileViM(input_channels=2, num_classes=2, variant="xs")
    with pytest.raises(ValueError, match="2 input channel"):
        net(torch.randn(1, 1, 32, 32, 32))


def test_bad_strides():
    with pytest.raises(ValueError, match="4 entries"):
        MobileViM(input_channels=1, num_classes=2, strides=[2, 2, 2])


def test_deep_supervision_outputs_match_reported_scales():
    strides = [[1, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 2]]
    patch = (32, 64, 48)
    net = MobileViM(input_channels=1, num_classes=4, variant="xs", strides=strides, deep_supervision=True)
    outs = net(torch.randn(2, 1, *patch))
    assert isinstance(outs, list) and len(outs) == len(net.deep_supervision_scales) == 4
    for out, scale in zip(outs, net.deep_supervision_scales):
        assert list(out.shape[2:]) == [round(p * s) for p, s in zip(patch, scale)]
    assert net.deep_supervision_scales[1] == [1.0, 0.5, 0.5]
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    out = net(torch.randn(1, 1, *patch))
    assert torch.is_tensor(out) and out.shape == (1, 4, *patch)


@pytest.mark.parametrize("switch", ["scale_bridger", "mamba", "dimension_independent", "dual_direction"])
def test_each_ablation_row_builds_and_runs(switch):
    full = MobileViM(input_channels=1, num_classes=2, variant="xs")
    ablated = MobileViM(input_channels=1, num_classes=2, variant="xs", **{switch: False}).eval()
    assert getattr(ablated.config, switch) is False
    assert count_parameters(ablated) != count_parameters(full)
    with torch.no_grad():
        out = ablated(torch.randn(1, 1, 16, 16, 16))
    assert out.shape == (1, 2, 16, 16, 16)


def test_config_files_load_and_validate(tmp_path):
    s = load_config("s")
    assert isinstance(s, MobileViMConfig) and s.name == "MobileViM_s" and s.mamba_layers == (3, 2, 4, 3)
    custom = s.to_dict() | {"name": "tiny", "stage_channels": [8, 16, 24, 32]}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(custom))
    net = MobileViM(input_channels=1, num_classes=2, variant=str(path))
    assert net.config.stage_channels == (8, 16, 24, 32)
    path.write_text(json.dumps(custom | {"stage_chanels": [1]}))
    with pytest.raises(ValueError, match="unknown configuration keys.*stage_chanels"):
        load_config(path)
    path.write_text(json.dumps({k: v for k, v in custom.items() if k != "d_state"}))
    with pytest.raises(ValueError, match="missing.*d_state"):
        load_config(path)
    path.write_text(json.dumps(custom | {"stage_channels": [8, 15, 24, 32]}))
    with pytest.raises(ValueError, match="even"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown MobileViM variant"):
        load_config("m")


def test_it_learns():
    """The released training loop never called backward(); ours must actually fit a target."""
    z, y, x = torch.meshgrid(*[torch.arange(n).float() for n in (16, 32, 32)], indexing="ij")
    balls = [((z - c0) ** 2 + (y - c1) ** 2 + (x - c2) ** 2 < 36) for c0, c1, c2 in [(6, 10, 12), (9, 20, 18)]]
    target = torch.stack(balls).long()
    x = (2 * target.float() + 0.3 * torch.randn(2, 16, 32, 32))[:, None]
    net = MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(16):
        outs = net(x)  # deep supervision: every output gets a (downsampled) target, as in nnU-Net
        loss = sum(F.cross_entropy(o, F.interpolate(target[:, None].float(), o.shape[2:]).long()[:, 0]) / 2 ** k
                   for k, o in enumerate(outs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    # every parameter learns; A only where a sequence is longer than one token (bottom: 1x2x2 -> 1 token)
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert all(n.startswith("encoder.stages.3.") and n.endswith("A_log") for n in missing), missing
    assert net.encoder.stages[0][-1].dimin.layers[0].A_log.grad.abs().sum() > 0


def test_cpu_forward_of_s_at_64_is_quick():
    import time

    net = MobileViM(input_channels=1, num_classes=4, variant="s").eval()
    x = torch.randn(1, 1, 64, 64, 64)
    start = time.perf_counter()
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 4, 64, 64, 64)
    # "seconds, not minutes": a generous bound for a shared 2-core machine
    assert time.perf_counter() - start < 60


def test_dimin_product_stays_in_float16_range():
    """AMP regression: three unnormalised profiles multiplied overflowed float16 after ~150 steps on a GPU.
    The stack's final RMSNorm and the float32 profile path keep the rank-1 map finite and O(1)."""
    from nnunetv2_mobilevim import DiminMamba

    block = DiminMamba(8, num_layers=2)
    x = (torch.randn(2, 8, 12, 10, 14) * 3000).half()  # activations far beyond a healthy range
    y = block(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert y.float().abs().max() < 1e3  # each factor has RMS ~1 per token


# (size, passes of the layer stack): a cube, D = W != H (nnU-Net's 64x80x64 patch), all three different
@pytest.mark.parametrize("size,passes", [((8, 8, 8), 1), ((10, 14, 10), 2), ((7, 12, 9), 3), ((12, 12, 7), 2)])
def test_dimin_stacks_profiles_of_equal_length_and_gives_each_its_own_result(size, passes):
    from nnunetv2_mobilevim import DiminMamba

    torch.manual_seed(2)
    block = DiminMamba(6, num_layers=2)
    calls = []
    block.layers.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        y = block(x)
        assert len(calls) == passes, calls
        expected = reference_dimin(block, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
