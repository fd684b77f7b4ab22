"""The mamba-ssm kernel backend against the exact PyTorch path, on CUDA (skipped elsewhere).

Run on the GPU machine: pytest -m gpu tests/ssm/test_gpu_kernels.py -s  (prints the measured errors).
Tolerances: float32 1e-4 relative to the output scale; fp16 autocast 2e-2 (what the kernels' half
inputs allow; the state stays float32 in both backends).
"""

from __future__ import annotations

import copy

import pytest
import torch
from gpu_helpers import rel_err, report

from nnunetv2_mobilevim import DualDirectionMamba, MobileViM
from nnunetv2_mobilevim.ssm.backend import load_kernels, selective_scan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(load_kernels()[0] is None, reason="needs mamba-ssm kernels")]

FP32_TOL, FP16_TOL = 1e-4, 2e-2
# token dim E and tokens per profile of every DualDirectionMamba in MobileViM_s / _xs at a 128^3 patch
# (profiles of 64, 32, 16, 8 positions cut into tokens of 2); batch = 2 samples x 3 profiles
BLOCK_SHAPES = [(16, 32), (64, 16), (96, 8), (128, 4), (48, 16), (80, 4), (64, 57)]


def test_raw_scan_matches_torch_fp32_and_grads():
    torch.manual_seed(0)
    b, d, n, length = 3, 64, 16, 37
    dev = "cuda"
    u = torch.randn(b, d, length, device=dev, requires_grad=True)
    delta = (0.5 * torch.randn(b, d, length, device=dev)).requires_grad_()
    A = (-torch.rand(d, n, device=dev) - 0.1).requires_grad_()
    B = torch.randn(b, 2, n, length, device=dev, requires_grad=True)
    C = torch.randn(b, 2, n, length, device=dev, requires_grad=True)
    D = torch.randn(d, device=dev, requires_grad=True)
    z = torch.randn(b, d, length, device=dev, requires_grad=True)
    bias = (0.1 * torch.randn(d, device=dev)).requires_grad_()
    inputs = [u, delta, A, B, C, D, z, bias]
    outs, grads = {}, {}
    g = torch.randn(b, d, length, device=dev)
    for backend in ("mamba_ssm", "torch"):
        y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, backend=backend)
        outs[backend] = y
        grads[backend] = torch.autograd.grad((y * g).sum(), inputs)
    err = rel_err(outs["mamba_ssm"], outs["torch"])
    report("selective_scan fp32 output", err)
    assert err < FP32_TOL
    for name, a, c in zip("u delta A B C D z bias".split(), grads["mamba_ssm"], grads["torch"]):
        e = rel_err(a, c)
        report(f"selective_scan fp32 grad {name}", e)
        assert e < 1e-3, name


@pytest.mark.parametrize("d_model,tokens", BLOCK_SHAPES)
@pytest.mark.parametrize("amp", [False, True])
def test_dual_direction_mamba_backends_agree(d_model, tokens, amp):
    torch.manual_seed(0)
    layer = DualDirectionMamba(d_model).cuda()
    layers = {"mamba_ssm": layer, "torch": copy.deepcopy(layer)}
    layers["mamba_ssm"].scan_backend, layers["torch"].scan_backend = "mamba_ssm", "torch"
    x = torch.randn(6, tokens, d_model, device="cuda")
    outs, grads = {}, {}
    for name, mod in layers.items():
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            y = mod(xi)
        y.float().square().mean().backward()
        outs[name] = y
        grads[name] = [xi.grad] + [p.grad for p in mod.parameters()]
    tol = FP16_TOL if amp else FP32_TOL
    err = rel_err(outs["mamba_ssm"], outs["torch"])
    report(f"DualDirectionMamba E={d_model} L={tokens} {'fp16' if amp else 'fp32'} output", err)
    assert err < tol
    worst = max(rel_err(a, b) for a, b in zip(grads["mamba_ssm"], grads["torch"]))
    report(f"DualDirectionMamba E={d_model} L={tokens} {'fp16' if amp else 'fp32'} grads (worst)", worst)
    assert worst < (5e-2 if amp else 1e-3)


@pytest.mark.parametrize("variant", ["s", "xs"])
def test_whole_network_backends_agree(variant, monkeypatch, no_tf32):
    from nnunetv2_mobilevim.ssm import backend as scan

    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=4, variant=variant).cuda().eval()
    x = torch.randn(2, 1, 128, 128, 128, device="cuda")
    outs = {}
    try:
        for backend in ("mamba_ssm", "torch"):
            monkeypatch.setenv("NNUNETV2_MOBILEVIM_SCAN", backend)
            scan.reset_backend_state()  # the variable is read once per process
            with torch.no_grad():
                outs[backend] = net(x)
    finally:
        monkeypatch.undo()
        scan.reset_backend_state()  # later tests read the real environment again
    err = rel_err(outs["mamba_ssm"], outs["torch"])
    report(f"MobileViM_{variant} 128^3 fp32 logits", err)
    assert err < FP32_TOL


def test_whole_network_training_step_under_amp_is_finite():
    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=4, variant="s", deep_supervision=True).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")
    x = 5 * torch.randn(2, 1, 128, 128, 128, device="cuda")
    target = (x[:, 0] > 2).long()
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.float16):
            outs = net(x)
            loss = torch.nn.functional.cross_entropy(outs[0].float(), target)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)


def test_our_kernel_wrapper_matches_mamba_ssms_own():
    """We call mamba-ssm's compiled kernel directly (import time); mamba-ssm's wrapper must agree exactly."""
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    torch.manual_seed(0)
    b, d, n, length = 2, 32, 16, 29
    u = torch.randn(b, d, length, device="cuda", requires_grad=True)
    delta = (0.5 * torch.randn(b, d, length, device="cuda")).requires_grad_()
    A = (-torch.rand(d, n, device="cuda") - 0.1).requires_grad_()
    B = torch.randn(b, 2, n, length, device="cuda", requires_grad=True)
    C = torch.randn(b, 2, n, length, device="cuda", requires_grad=True)
    D = torch.randn(d, device="cuda", requires_grad=True)
    z = torch.randn(b, d, length, device="cuda", requires_grad=True)
    bias = (0.1 * torch.randn(d, device="cuda")).requires_grad_()
    inputs, g = [u, delta, A, B, C, D, z, bias], torch.randn(b, d, length, device="cuda")
    results = []
    for fn in (load_kernels()[0], interface.selective_scan_fn):
        for z_arg in (z, None):
            y = fn(u, delta, A, B, C, D=D, z=z_arg, delta_bias=bias, delta_softplus=True)
            used = [t for t in inputs if z_arg is not None or t is not z]
            results.append((y, torch.autograd.grad((y * g).sum(), used)))
    for ours, theirs in zip(results[:2], results[2:]):
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        for a, c in zip(ours[1], theirs[1]):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)  # backward kernels add atomically
