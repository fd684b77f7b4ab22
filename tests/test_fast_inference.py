"""Speed-ups must not change results: BatchNorm folding on the CPU (CUDA graphs: tests/test_gpu_kernels.py)."""

import torch
from torch import nn

from nnunetv2_mobilevim import MobileViM
from nnunetv2_mobilevim.fast_inference import fold_batchnorm


def test_folded_network_gives_the_same_logits():
    net = MobileViM(input_channels=1, num_classes=3, variant="xs")
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()
    folded = fold_batchnorm(net)
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad():
        ref, out = net(x), folded(x)
    remaining = sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    total = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert remaining == 0 and total > 50
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == total  # the original is untouched


def test_fast_inference_flag_is_inert_on_the_cpu():
    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=2, variant="xs", fast_inference=True).eval()
    plain = MobileViM(input_channels=1, num_classes=2, variant="xs").eval()
    plain.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x))
    assert net._fast is None
