"""MobileViM in 2D (nnU-Net's ``2d`` configuration) through the same code path as 3D.

The blocks take ``conv_op`` / ``norm_op`` types; the dimension follows the strides. In 2D the Dimin
Mamba scans the two axis profiles (H and W) and recombines them as their outer product. 3D must not
change: the last test compares a tiny 3D network with values recorded from the code before 2D existed.
"""

import io
import math

import pytest
import torch
from dimin_reference import reference_dimin
from torch import nn

from nnunetv2_mobilevim import DiminMamba, MobileViM
from nnunetv2_mobilevim.networks.mobilevim import deep_supervision_scales

# (patch, per-axis strides as an nnU-Net 2d plan gives its first four pooling steps; 1s where an axis stops)
PLANNED_2D = [
    ((64, 64), [[2, 2], [2, 2], [2, 2], [2, 2]]),
    ((48, 80), [[1, 2], [2, 2], [2, 1], [2, 2]]),
    ((37, 50), [[2, 2], [2, 2], [1, 2], [1, 1]]),  # not a multiple of the total stride: padded, cropped
]


@pytest.fixture(scope="module")
def nets_2d():
    torch.manual_seed(0)
    return {tuple(map(tuple, strides)): MobileViM(input_channels=2, num_classes=3, variant="xs", strides=strides,
                                                  deep_supervision=True) for _, strides in PLANNED_2D}


@pytest.mark.parametrize("patch,strides", PLANNED_2D)
def test_2d_forward_shapes_with_and_without_deep_supervision(nets_2d, patch, strides):
    net = nets_2d[tuple(map(tuple, strides))].eval()
    assert net.dim == 2 and net.strides == tuple(map(tuple, strides))
    scales = net.deep_supervision_scales
    assert scales == deep_supervision_scales(strides) and all(len(s) == 2 for s in scales)
    assert scales[1] == [1 / strides[0][0], 1 / strides[0][1]]
    x = torch.randn(2, 2, *patch)
    with torch.no_grad():
        net.decoder.deep_supervision = True
        outs = net(x)
        net.decoder.deep_supervision = False
        out = net(x)
    assert isinstance(outs, list) and len(outs) == 4
    for o, scale in zip(outs, scales):
        assert list(o.shape) == [2, 3] + [math.ceil(p * s) for p, s in zip(patch, scale)]
        assert torch.isfinite(o).all()
    assert torch.is_tensor(out) and out.shape == (2, 3, *patch)
    assert torch.equal(out, outs[0])


def test_2d_network_has_only_2d_operators():
    net2 = MobileViM(input_channels=1, num_classes=2, variant="xs", strides=[[2, 2]] * 4, norm="instance")
    net3 = MobileViM(input_channels=1, num_classes=2, variant="xs")
    kinds2 = {type(m) for m in net2.modules()}
    kinds3 = {type(m) for m in net3.modules()}
    assert {nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d} <= kinds2
    assert not kinds2 & {nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d}
    assert {nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d} <= kinds3 and not kinds3 & {nn.Conv2d, nn.BatchNorm2d}


def test_dimension_comes_from_strides_or_dim_and_mismatches_are_refused():
    assert MobileViM(input_channels=1, num_classes=2, variant="xs", dim=2).strides == ((2, 2),) * 4
    assert MobileViM(input_channels=1, num_classes=2, variant="xs").dim == 3  # the old call: 3D
    with pytest.raises(ValueError, match="2 entries"):
        MobileViM(input_channels=1, num_classes=2, strides=[[2, 2], [2, 2, 2], [2, 2], [2, 2]])
    with pytest.raises(ValueError, match="3 entries"):
        MobileViM(input_channels=1, num_classes=2, strides=[[2, 2]] * 4, dim=3)
    net = MobileViM(input_channels=1, num_classes=2, variant="xs", strides=[[1, 2], [2, 2], [2, 2], [2, 2]])
    net.check_input_size((16, 32))
    with pytest.raises(ValueError, match=r"patch size \[4, 64\].*\[8, 16\]"):
        net.check_input_size((4, 64))
    with pytest.raises(ValueError, match=r"2D network: expected \(H, W\)"):
        net.check_input_size((16, 64, 64))
    with pytest.raises(ValueError, match="2D MobileViM expects a"):
        net(torch.randn(1, 1, 16, 32, 32))


@pytest.mark.parametrize("size", [(10, 14), (7, 12)])  # unequal / odd lengths: separate passes and padding
def test_2d_dimin_is_the_outer_product_of_both_axis_profiles(size):
    torch.manual_seed(1)
    block = DiminMamba(6, num_layers=2, dim=2)
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        y, expected = block(x), reference_dimin(block, x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        # zero-mean stripes along one axis change that axis' profile only: the output must see both
        along_w = torch.linspace(-2, 2, size[1]).expand(size)
        along_h = torch.linspace(-2, 2, size[0])[:, None].expand(size)
        assert (block(x + along_w) - y).abs().max() > 1e-3
        assert (block(x + along_h) - y).abs().max() > 1e-3


def test_2d_gradients_reach_every_parameter():
    # bottom 4 x 4: every profile has 2 tokens, so every A_log sees a recurrence
    net = MobileViM(input_channels=1, num_classes=2, variant="xs", strides=[[2, 2]] * 4, deep_supervision=True)
    outs = net(torch.randn(2, 1, 64, 64))
    sum(o.square().mean() / 2 ** k for k, o in enumerate(outs)).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    dead = [n for n, p in net.named_parameters() if not (torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0)]
    assert dead == []


def test_2d_fp32_and_bf16_autocast_are_finite_and_close():
    torch.manual_seed(2)
    net = MobileViM(input_channels=1, num_classes=3, variant="xs", strides=[[2, 2]] * 4).eval()
    x = torch.randn(1, 1, 64, 48)
    with torch.no_grad():
        fp32 = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = net(x)
    assert torch.isfinite(fp32).all() and torch.isfinite(bf16).all()
    assert (bf16.float() - fp32).norm() / fp32.norm() < 0.05
    # the 2D rank-1 map keeps the input's dtype and stays O(1) for activations far beyond a healthy range
    block = DiminMamba(8, num_layers=2, dim=2)
    for dtype in (torch.float16, torch.bfloat16):
        y = block((torch.randn(2, 8, 12, 10) * 3000).to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all() and y.float().abs().max() < 1e3


def test_2d_state_dict_round_trip_and_same_names_as_3d():
    torch.manual_seed(3)
    strides = [[1, 2], [2, 2], [2, 2], [2, 2]]
    a = MobileViM(input_channels=1, num_classes=3, variant="xs", strides=strides, deep_supervision=True).eval()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = MobileViM(input_channels=1, num_classes=3, variant="xs", strides=strides, deep_supervision=True).eval()
    b.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(1, 1, 32, 64)
    with torch.no_grad():
        assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))
    # the 2D state_dict has the 3D names; conv kernels lose one axis, the Mamba layers keep their shapes
    three = MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True).state_dict()
    two = a.state_dict()
    assert list(two) == list(three)
    for name in two:
        if ".dimin." in name:
            assert two[name].shape == three[name].shape, name
        elif two[name].dim() >= 3:
            assert two[name].shape == three[name].shape[:-1], name


# A tiny 3D network with weights and input that depend on no random generator. EXPECTED_3D was recorded
# with the code of commit 1f55500 (before 2D existed); the same values must come out now.
TINY = dict(stem_channels=4, stage_channels=[4, 8, 8, 12], mamba_layers=[1, 1, 2, 1], d_state=4, expand=1,
            downsample_expand=2)
STRIDES_3D = [[1, 2, 2], [2, 2, 2], [2, 2, 1], [1, 1, 2]]
# per deep-supervision output: shape, sum, sum of |.|, values at flat indices 0, 7, n//3, n//2+5, n-1
EXPECTED_3D = [
    ([2, 2, 8, 16, 16], 19075.716952636838, 19075.716952636838,
     [3.929029941558838, 3.457699775695801, 2.000598430633545, 3.567368507385254, 2.0632781982421875]),
    ([2, 2, 8, 8, 8], 2530.812785446644, 2530.812785446644,
     [0.9163846969604492, 0.960934042930603, 1.372244119644165, 0.945322573184967, 1.201545238494873]),
    ([2, 2, 4, 4, 4], -140.18344600498676, 521.7991445213556,
     [-2.6580400466918945, -2.935192108154297, 2.3001720905303955, -2.296053647994995, 2.213711738586426]),
    ([2, 2, 2, 2, 4], -52.845669750124216, 58.00871005281806,
     [-1.4195162057876587, -1.9674252271652222, -0.6152766942977905, -1.8313652276992798, -0.5099773406982422]),
]


def _deterministic_(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            fan_in = p[0].numel() if p.dim() > 1 else 1
            values = torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + i) / math.sqrt(fan_in)
            p.copy_(values.reshape(p.shape))
    return net


def test_3d_is_unchanged_old_constructor_calls_and_recorded_outputs():
    old_calls = [dict(), dict(strides=[2, 2, 2, 2]), dict(strides=[[2, 2, 2]] * 4), dict(dim=3)]
    states = []
    for kwargs in old_calls:
        torch.manual_seed(4)
        states.append(MobileViM(input_channels=1, num_classes=2, variant="xs", deep_supervision=True,
                                **kwargs).state_dict())
    for state in states[1:]:
        assert list(state) == list(states[0]) and all(torch.equal(state[k], states[0][k]) for k in state)

    net = _deterministic_(MobileViM(input_channels=1, num_classes=2, variant="xs", strides=STRIDES_3D,
                                    deep_supervision=True, **TINY)).train()  # BatchNorm on batch statistics
    x = torch.cos(torch.arange(2 * 8 * 16 * 16, dtype=torch.float64) * 0.11).reshape(2, 1, 8, 16, 16).float()
    with torch.no_grad():
        outs = net(x)
    for out, (shape, total, total_abs, values) in zip(outs, EXPECTED_3D, strict=True):
        flat = out.double().flatten()
        n = flat.numel()
        assert list(out.shape) == shape
        assert flat.sum().item() == pytest.approx(total, rel=1e-4)
        assert flat.abs().sum().item() == pytest.approx(total_abs, rel=1e-4)
        got = [flat[i].item() for i in (0, 7, n // 3, n // 2 + 5, n - 1)]
        assert got == pytest.approx(values, rel=1e-4, abs=1e-4)  # thread counts change the last bits
