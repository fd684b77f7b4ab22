"""The PyTorch scan's memory is bounded: what autograd keeps and what the process holds grow with the
sequence by (B, D)-sized tensors per token, never by the (B, D, N) state of every token."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunetv2_mobilevim.ssm.backend import selective_scan_loop, selective_scan_torch
from nnunetv2_mobilevim.ssm.torch_scan import CHUNK_ELEMENTS, chunk_tokens

REPO = Path(__file__).resolve().parents[2]


def _inputs(batch, channels, state, length, dtype=torch.float32, groups=None):
    g = torch.Generator().manual_seed(0)
    bc = (batch, state, length) if groups is None else (batch, groups, state, length)
    return [torch.randn(batch, channels, length, generator=g, dtype=dtype),
            torch.randn(batch, channels, length, generator=g, dtype=dtype) * 0.5,
            -torch.rand(channels, state, generator=g, dtype=dtype) * 2 - 0.1,
            torch.randn(*bc, generator=g, dtype=dtype), torch.randn(*bc, generator=g, dtype=dtype),
            torch.randn(channels, generator=g, dtype=dtype),
            torch.randn(batch, channels, length, generator=g, dtype=dtype),
            torch.randn(channels, generator=g, dtype=dtype) * 0.1]


def test_saved_for_backward_is_bounded_by_the_boundary_states():
    """Beyond the inputs, autograd keeps a few (B, D, L) tensors and one (B, D, N) state per chunk: far
    below one (B, D, L, N) tensor of all the states (64 (B, D, L) tensors here, N = 64)."""
    batch, channels, state, length, chunk = 1, 4, 64, 4096, 256
    inputs = [t.requires_grad_() for t in _inputs(batch, channels, state, length)]
    u, delta, A, B, C, D, z, bias = inputs
    given = {t.untyped_storage().data_ptr() for t in inputs}
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, chunk_length=chunk)
    new = sum(nbytes for ptr, nbytes in kept.items() if ptr not in given)
    sequence = batch * channels * length * 4  # one (B, D, L) float32 tensor
    boundary = (length // chunk) * batch * channels * state * 4
    assert new <= 6 * sequence + boundary, (new / sequence, boundary / sequence)
    assert y.shape == u.shape


# One process per length: VmHWM (reset through /proc/self/clear_refs) is the peak resident memory of the
# forward and backward alone. glibc's mmap threshold is pinned so that freed tensors leave the process
# (its default adapts and keeps freed blocks in the heap, which would measure the allocator, not the scan).
_CHILD = r"""
import sys, torch
from nnunetv2_mobilevim.ssm.torch_scan import selective_scan_torch
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
length, batch, channels, state = (int(a) for a in sys.argv[1:5])
g = torch.Generator().manual_seed(0)
u, delta = (torch.randn(batch, channels, length, generator=g, requires_grad=True) for _ in range(2))
A = (-torch.rand(channels, state, generator=g) - 0.1).requires_grad_()
B, C = (torch.randn(batch, state, length, generator=g, requires_grad=True) for _ in range(2))
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
y = selective_scan_torch(u, delta, A, B, C, delta_softplus=True)
y.sum().backward()
print(status("VmHWM:") - before)
"""


def _peak_bytes(length: int, batch: int, channels: int, state: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(length), str(batch), str(channels), str(state)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="reads /proc and pins glibc's mmap threshold")
def test_peak_memory_of_forward_and_backward_is_bounded():
    """Peak resident memory of the forward and backward at 2048 and 8192 tokens (batch 1, 32 channels,
    state 128: 16 KiB of state per token, 128-token chunks): the 6144 more tokens may add (B, D) and
    (B, N)-sized tensors per token, not the states (96 MiB); half of that is the bound."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        pytest.skip(f"cannot reset the peak resident memory here: {e}")
    batch, channels, state = 1, 32, 128
    assert chunk_tokens(batch, channels, state) == 128
    short, long = _peak_bytes(2048, batch, channels, state), _peak_bytes(8192, batch, channels, state)
    states = (8192 - 2048) * batch * channels * state * 4
    assert long - short < 0.5 * states, ((long - short) / 2 ** 20, short / 2 ** 20, states / 2 ** 20)


@pytest.mark.parametrize("wanted", ["u", "delta", "A", "B", "C", "bias"])
def test_gradient_of_each_input_alone_matches_the_naive_loop(wanted):
    """The backward computes only the gradients asked for; each one alone, over several chunks with a
    short last one and two groups, equals the naive loop's (float64)."""
    names = "u delta A B C D z bias".split()
    inputs = _inputs(2, 4, 3, 23, dtype=torch.float64, groups=2)
    inputs[names.index(wanted)].requires_grad_()
    u, delta, A, B, C, D, z, bias = inputs
    grad_out = torch.randn_like(u)
    fast = selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, chunk_length=5)
    slow = selective_scan_loop(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    target = inputs[names.index(wanted)]
    (g_fast,) = torch.autograd.grad((fast * grad_out).sum(), [target])
    (g_slow,) = torch.autograd.grad((slow * grad_out).sum(), [target])
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-9, atol=1e-9)


def test_chunk_rule_follows_the_sizes():
    """About CHUNK_ELEMENTS state elements per chunk (batch x channels x tokens x state), at least 16 tokens."""
    for batch, channels, state in [(2, 64, 16), (2, 128, 16), (1, 32, 128), (2, 640, 16)]:
        tokens = chunk_tokens(batch, channels, state)
        assert CHUNK_ELEMENTS // 2 < tokens * batch * channels * state <= CHUNK_ELEMENTS
    assert chunk_tokens(64, 1024, 64) == 16
