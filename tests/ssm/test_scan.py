"""The pure-PyTorch selective scan against the naive per-timestep loop of Algorithm 1."""

import pytest
import torch

from nnunetv2_mobilevim.ssm import backend as scan
from nnunetv2_mobilevim.ssm.backend import ScanBackendError, resolve_backend, selective_scan_loop, selective_scan_torch
from nnunetv2_mobilevim.ssm.torch_scan import causal_conv1d_torch, linear_recurrence


def _inputs(batch=2, channels=8, state=4, length=13, groups=None, dtype=torch.float64):
    g = {} if groups is None else {"groups": groups}
    u = torch.randn(batch, channels, length, dtype=dtype)
    delta = torch.randn(batch, channels, length, dtype=dtype) * 0.5
    A = -torch.rand(channels, state, dtype=dtype) * 2 - 0.1
    shape = (batch, state, length) if not g else (batch, groups, state, length)
    B = torch.randn(*shape, dtype=dtype)
    C = torch.randn(*shape, dtype=dtype)
    D = torch.randn(channels, dtype=dtype)
    z = torch.randn(batch, channels, length, dtype=dtype)
    bias = torch.randn(channels, dtype=dtype) * 0.1
    return u, delta, A, B, C, D, z, bias


@pytest.mark.parametrize("length", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("groups", [None, 2])
def test_values_match_naive_loop(length, groups):
    u, delta, A, B, C, D, z, bias = _inputs(length=length, groups=groups, dtype=torch.float32)
    fast = selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    slow = selective_scan_loop(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    assert fast.shape == u.shape
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_gradients_match_naive_loop():
    inputs = [t.requires_grad_() for t in _inputs(length=21, groups=2)]
    u, delta, A, B, C, D, z, bias = inputs
    grad_out = torch.randn_like(u)
    fast = selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    g_fast = torch.autograd.grad((fast * grad_out).sum(), inputs)
    slow = selective_scan_loop(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    g_slow = torch.autograd.grad((slow * grad_out).sum(), inputs)
    for name, a, b in zip("u delta A B C D z bias".split(), g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_groups_split_channels():
    """Group g's B and C must drive only its block of channels (how both directions share one call)."""
    u, delta, A, B, C, *_ = _inputs(channels=6, groups=2, length=9)
    base = selective_scan_torch(u, delta, A, B, C)
    B2 = B.clone()
    B2[:, 1] += 1.0  # change group 1 only
    changed = selective_scan_torch(u, delta, A, B2, C)
    torch.testing.assert_close(changed[:, :3], base[:, :3])
    assert not torch.allclose(changed[:, 3:], base[:, 3:])


def test_recurrence_is_the_definition():
    a, b = torch.rand(3, 10, 4, dtype=torch.float64), torch.randn(3, 10, 4, dtype=torch.float64)
    h, expected = torch.zeros(3, 4, dtype=torch.float64), []
    for t in range(10):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    torch.testing.assert_close(linear_recurrence(a, b), torch.stack(expected, dim=1))


@pytest.mark.parametrize("length", [1, 2, 9, 16])
def test_reverse_recurrence_and_initial_state_are_the_definition(length):
    """The scan the backward runs (h_t = a_t h_{t+1} + b_t from h_L = h0) and the forward's start from a
    carried state, against the loops."""
    a, b = torch.rand(3, length, 4, dtype=torch.float64), torch.randn(3, length, 4, dtype=torch.float64)
    h0 = torch.randn(3, 4, dtype=torch.float64)
    h, forward = h0, []
    for t in range(length):
        h = a[:, t] * h + b[:, t]
        forward.append(h)
    h, backward = h0, []
    for t in reversed(range(length)):
        h = a[:, t] * h + b[:, t]
        backward.insert(0, h)
    torch.testing.assert_close(linear_recurrence(a, b, h0), torch.stack(forward, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear_recurrence(a, b, h0, reverse=True), torch.stack(backward, dim=1),
                               rtol=1e-12, atol=1e-12)


def test_half_precision_inputs_keep_float32_state():
    u, delta, A, B, C, D, z, bias = _inputs(length=40, dtype=torch.float32)
    ref = selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    half = selective_scan_torch(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D=D, z=z.bfloat16(),
                                delta_bias=bias, delta_softplus=True)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), ref, rtol=0.1, atol=0.1)


def test_causal_conv1d_is_causal():
    x = torch.randn(2, 5, 12)
    w, b = torch.randn(5, 4), torch.randn(5)
    y = causal_conv1d_torch(x, w, b)
    x2 = x.clone()
    x2[..., 7] += 10
    y2 = causal_conv1d_torch(x2, w, b)
    torch.testing.assert_close(y[..., :7], y2[..., :7])
    assert not torch.allclose(y[..., 7:11], y2[..., 7:11])


@pytest.fixture
def set_scan_env(monkeypatch):
    """Set NNUNETV2_MOBILEVIM_SCAN and make the package read it again (it reads it once per process)."""
    def set_env(value):
        monkeypatch.setenv(scan.ENV_VAR, value)
        scan.reset_backend_state()
    yield set_env
    monkeypatch.undo()
    scan.reset_backend_state()  # later tests read the real environment again


def test_backend_selection(set_scan_env):
    set_scan_env("torch")
    assert resolve_backend(is_cuda=True) == "torch"
    set_scan_env("auto")
    assert resolve_backend(is_cuda=False) == "torch"
    set_scan_env("bogus")
    with pytest.raises(ScanBackendError, match="NNUNETV2_MOBILEVIM_SCAN"):
        resolve_backend(is_cuda=False)


def test_explicit_kernel_request_never_falls_back(set_scan_env):
    set_scan_env("mamba_ssm")
    with pytest.raises(ScanBackendError) as info:
        resolve_backend(is_cuda=False)
    message = str(info.value)
    # Either the kernels are missing (say how to install) or the tensors are on the CPU (say so).
    assert "pip install" in message or "CPU" in message


@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("groups", [None, 2])
def test_chunked_scan_is_the_same_recurrence(chunk, groups):
    """Chunks that carry the state, recomputed in the backward: values and every gradient as the naive
    loop's (float64, 1e-9), including chunks that do not divide the length."""
    inputs = [t.requires_grad_() for t in _inputs(length=33, groups=groups)]
    u, delta, A, B, C, D, z, bias = inputs
    grad_out = torch.randn_like(u)
    fast = selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, chunk_length=chunk)
    slow = selective_scan_loop(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    g_fast = torch.autograd.grad((fast * grad_out).sum(), inputs)
    g_slow = torch.autograd.grad((slow * grad_out).sum(), inputs)
    for name, a, b in zip("u delta A B C D z bias".split(), g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")
