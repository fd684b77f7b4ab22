"""Algorithm 1's dual-direction Mamba: shapes, TRUE bidirectionality, per-direction parameters."""

import torch

from nnunetv2_mobilevim import DualDirectionMamba
from nnunetv2_mobilevim.ssm import dual_direction_mamba as module_path  # importable from a submodule too


def _perturbed_outputs(layer, index, length=12):
    x = torch.randn(2, length, layer.d_model)
    x2 = x.clone()
    x2[:, index] += 3.0
    with torch.no_grad():
        return layer(x), layer(x2)


def test_shape_and_import_paths():
    assert module_path.DualDirectionMamba is DualDirectionMamba
    layer = DualDirectionMamba(32)
    x = torch.randn(3, 10, 32)
    assert layer(x).shape == (3, 10, 32)


def test_last_token_changes_first_output():
    layer = DualDirectionMamba(16).eval()
    y, y2 = _perturbed_outputs(layer, index=-1)
    assert (y2[:, 0] - y[:, 0]).abs().max() > 1e-4


def test_first_token_changes_last_output():
    layer = DualDirectionMamba(16).eval()
    y, y2 = _perturbed_outputs(layer, index=0)
    assert (y2[:, -1] - y[:, -1]).abs().max() > 1e-4


def test_single_direction_is_causal():
    """The same check on the one-direction layer: the test above can tell causal from bidirectional."""
    layer = DualDirectionMamba(16, dual_direction=False).eval()
    y, y2 = _perturbed_outputs(layer, index=-1)
    torch.testing.assert_close(y[:, :-1], y2[:, :-1])


def test_reversed_input_uses_other_direction_parameters():
    """Onwards and backwards have their own conv1d, B/C/Delta projections and A."""
    layer = DualDirectionMamba(8)
    assert layer.conv_weight.shape[0] == 2 and layer.x_proj_weight.shape[0] == 2
    assert layer.A_log.shape == (2, 16) and layer.dt_proj_weight.shape[0] == 2
    assert not torch.equal(layer.conv_weight[0], layer.conv_weight[1])
    # A_d is drawn from U(1, M)
    A = layer.A_log.exp()
    assert (A >= 1).all() and (A <= 16).all()


def test_shortcut_is_added():
    layer = DualDirectionMamba(8)
    with torch.no_grad():
        layer.out_proj.weight.zero_()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), x)


def test_gradients_reach_both_directions():
    layer = DualDirectionMamba(8)
    layer(torch.randn(2, 9, 8)).square().mean().backward()
    for name in ("conv_weight", "x_proj_weight", "dt_proj_weight", "A_log", "D", "dt_bias"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0, name


def test_autocast_bfloat16_is_finite():
    layer = DualDirectionMamba(16)
    x = torch.randn(2, 20, 16) * 50
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert torch.isfinite(y).all()
