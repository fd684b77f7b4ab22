"""Pure-PyTorch selective scan: Algorithm 1's recurrence, exact, for CPUs and machines without kernels.

Same signature and layouts as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` so the
kernel backend is a drop-in replacement:

    u, delta:  (B, D, L)          D = channels (2E in Algorithm 1), L = sequence length
    A:         (D, N)             N = state size (M in Algorithm 1)
    B, C:      (B, N, L) or (B, G, N, L)   G groups split the D channels into G equal blocks
    D:         (D,) or None       skip term
    z:         (B, D, L) or None  gate: y * silu(z)
    delta_bias (D,) or None; delta_softplus applies softplus(delta + delta_bias)
    returns y: (B, D, L) in u's dtype

The state h (B, D, N) is carried in float32 (float64 for float64 inputs) whatever the input dtype:
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      y_t = <h_t, C_t> + D * u_t

Instead of a Python loop over L we use a log-depth (Hillis-Steele) scan over the affine maps
h -> a*h + b: ceil(log2 L) vectorised steps. It is the same recurrence, reassociated; results agree
with the sequential loop to float32 rounding (tests check values and gradients).

Memory: the scan of one stretch of the sequence keeps ~2 log2(length) state-sized tensors (B, D, length,
N) for autograd, far too many for a full-resolution 3D sequence. Long sequences are therefore scanned in
chunks that carry the state from one to the next (the same recurrence), and with gradients each chunk is
recomputed in the backward pass instead of stored (``torch.utils.checkpoint``), as mamba-ssm's fused
kernel recomputes its states: what autograd keeps is then the chunk inputs and one state per chunk.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _state_dtype(u: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 stays float64 (for gradient checks)."""
    return torch.promote_types(u.dtype, torch.float32)


def _per_channel(t: Tensor, channels: int) -> Tensor:
    """(B, N, L) or (B, G, N, L) -> (B, D, N, L) by repeating each group over its D/G channels."""
    if t.dim() == 3:
        return t.unsqueeze(1).expand(-1, channels, -1, -1)
    groups = t.shape[1]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups")
    return t.repeat_interleave(channels // groups, dim=1)


# state elements (batch x channels x length x state) of one chunk: 2^21 float32 values, 8 MiB per tensor
CHUNK_ELEMENTS = 2 ** 21


def linear_recurrence(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t with h_{-1} = ``h0`` (zeros when None), along the
    last-but-one axis.

    a, b: (..., L, N), h0: (..., N) -> h: (..., L, N). Log-depth inclusive scan of the affine maps (a, b).
    """
    length = a.shape[-2]
    # h_0 = a_0 * h_{-1} + b_0, written out also for h_{-1} = 0 so that a_0 is part of the graph (its
    # gradient is 0, not None, which DistributedDataParallel needs for one-token sequences).
    start = 0 if h0 is None else h0.unsqueeze(-2)
    b = torch.cat([a[..., :1, :] * start + b[..., :1, :], b[..., 1:, :]], dim=-2)
    offset = 1
    while offset < length:
        b = torch.cat([b[..., :offset, :], a[..., offset:, :] * b[..., :-offset, :] + b[..., offset:, :]], dim=-2)
        a = torch.cat([a[..., :offset, :], a[..., offset:, :] * a[..., :-offset, :]], dim=-2)
        offset *= 2
    return b


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    chunk_length: Optional[int] = None,
) -> Tensor:
    """See the module docstring for shapes. Differentiable in every input. ``chunk_length``: tokens per
    chunk (default: from the sizes, about ``CHUNK_ELEMENTS`` state elements per chunk)."""
    out_dtype, dt = u.dtype, _state_dtype(u)
    channels = u.shape[1]
    u32, delta32 = u.to(dt), delta.to(dt)
    if delta_bias is not None:
        delta32 = delta32 + delta_bias.to(dt)[:, None]
    if delta_softplus:
        delta32 = F.softplus(delta32)
    # B, C stay per group over the whole sequence; each chunk expands its own stretch to (B, D, N, K)
    B32, C32, A32 = B.to(dt), C.to(dt), A.to(dt)
    batch, length, state = u.shape[0], u.shape[-1], A.shape[-1]
    chunk = chunk_length or max(16, CHUNK_ELEMENTS // max(1, batch * channels * state))
    if chunk >= length:
        y, _ = _scan_chunk(delta32, delta32 * u32, A32, B32, C32, None)
    else:
        recompute = torch.is_grad_enabled() and any(
            t.requires_grad for t in (u, delta, A, B, C) + ((delta_bias,) if delta_bias is not None else ()))
        h, ys, delta_u = None, [], delta32 * u32
        for s in range(0, length, chunk):
            args = (delta32[..., s:s + chunk], delta_u[..., s:s + chunk], A32, B32[..., s:s + chunk],
                    C32[..., s:s + chunk], h)
            y_c, h = (checkpoint(_scan_chunk, *args, use_reentrant=False) if recompute else _scan_chunk(*args))
            ys.append(y_c)
        y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + D.to(dt)[:, None] * u32
    if z is not None:
        y = y * F.silu(z.to(dt))
    return y.to(out_dtype)


def _scan_chunk(delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor, C: Tensor,
                h0: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """One stretch of the recurrence from the state ``h0`` (B, D, N) (zeros when None): delta, delta_u
    (B, D, K), A (D, N), B, C (B, N, K) or (B, G, N, K) -> (<h_t, C_t> (B, D, K), the last state (B, D, N))."""
    B, C = _per_channel(B, delta.shape[1]), _per_channel(C, delta.shape[1])  # (B, D, N, K)
    # Discretisation of Algorithm 1: A_bar = exp(delta (x) A), B_bar x = delta * B * x.
    a = torch.exp(delta.unsqueeze(-1) * A[None, :, None, :])  # (B, D, K, N)
    b = delta_u.unsqueeze(-1) * B.transpose(-1, -2)  # (B, D, K, N)
    h = linear_recurrence(a, b, h0)  # (B, D, K, N)
    return torch.einsum("bdln,bdnl->bdl", h, C), h[..., -1, :]


def selective_scan_loop(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
    z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
) -> Tensor:
    """The recurrence written as the naive per-timestep loop of Algorithm 1. Slow; the test oracle."""
    channels, length, dt = u.shape[1], u.shape[2], _state_dtype(u)
    delta = delta.to(dt) + (delta_bias.to(dt)[:, None] if delta_bias is not None else 0.0)
    if delta_softplus:
        delta = F.softplus(delta)
    B_, C_ = _per_channel(B.to(dt), channels), _per_channel(C.to(dt), channels)
    h = u.new_zeros(u.shape[0], channels, A.shape[1], dtype=dt)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A.to(dt)) * h + delta[:, :, t, None] * B_[..., t] * u[:, :, t, None].to(dt)
        ys.append((h * C_[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dt)[:, None] * u.to(dt)
    if z is not None:
        y = y * F.silu(z.to(dt))
    return y.to(u.dtype)


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                        activation: Optional[str] = "silu") -> Tensor:
    """Depthwise causal conv1d with causal_conv1d_fn's layout: x (B, D, L), weight (D, W), bias (D,)."""
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(y) if activation in ("silu", "swish") else y
