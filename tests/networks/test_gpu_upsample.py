"""``linear_resize`` on CUDA: PyTorch's ``F.interpolate`` in values, gradients and dtypes (also under fp16
autocast, where both run in float32), with a backward that gives the same bits on every run, which
``F.interpolate``'s atomic adds do not promise. Prints both backward times (not asserted).

    pytest -m gpu tests/networks/test_gpu_upsample.py -s
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import report

from nnunetv2_mobilevim.networks.mobilevim.upsample import linear_resize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# the decoder's class maps at 96^3 with MobileViM_s's strides: 2x, 4x and 8x to 48^3, then 2x to 96^3
CASES = [((2, 5, 24, 24, 24), (48, 48, 48)), ((2, 5, 12, 12, 12), (48, 48, 48)), ((2, 5, 6, 6, 6), (48, 48, 48)),
         ((2, 5, 48, 48, 48), (96, 96, 96))]


def _reference(x, size):
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


@pytest.mark.parametrize("shape,size", CASES, ids=[f"{s[2]}to{z[0]}" for s, z in CASES])
def test_fp16_autocast_values_gradients_and_dtype_are_pytorchs(no_tf32, shape, size):
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(*shape, device="cuda", generator=generator).half().requires_grad_()
    grad_out = torch.randn(*shape[:2], *size, device="cuda", generator=generator)
    with torch.autocast("cuda", dtype=torch.float16):
        expected, got = _reference(x, size), linear_resize(x, size)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    (grad_expected,) = torch.autograd.grad(expected, x, grad_out)
    (grad_got,) = torch.autograd.grad(got, x, grad_out)
    assert grad_got.dtype == torch.float16
    # both sum float32 terms, then round to float16: at most one float16 step apart
    torch.testing.assert_close(grad_got.float(), grad_expected.float(), rtol=1e-3, atol=1e-3)


def test_backward_is_bitwise_repeatable_and_time(no_tf32):
    shape, size = CASES[-1]
    x = torch.randn(*shape, device="cuda").requires_grad_()
    grad_out = torch.randn(*shape[:2], *size, device="cuda")
    grads = [torch.autograd.grad(linear_resize(x, size), x, grad_out)[0] for _ in range(3)]
    assert all(torch.equal(g, grads[0]) for g in grads[1:])
    for name, fn in (("F.interpolate", _reference), ("linear_resize", linear_resize)):
        for _ in range(3):
            torch.autograd.grad(fn(x, size), x, grad_out)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            torch.autograd.grad(fn(x, size), x, grad_out)
        end.record()
        torch.cuda.synchronize()
        report(f"{name} forward + backward, 2x5x48^3 -> 96^3, float32, ms", start.elapsed_time(end) / 20)
