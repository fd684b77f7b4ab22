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
h -> a*h + b: ceil(log2 K) vectorised steps over a stretch of K tokens. It is the same recurrence,
reassociated; results agree with the sequential loop to float32 rounding (tests check values and gradients).

Memory: every state h_t is a (B, D, N) tensor, so the states of a whole 3D sequence (B, D, L, N) are N
times the size of the input: never materialised. The sequence is scanned in chunks of K tokens that carry
the state from one to the next (the same recurrence). The forward keeps only the state at each chunk
boundary; the backward recomputes each chunk's states from its boundary state, last chunk first, and
back-propagates through it by the adjoint recurrence lambda_t = g_t + a_{t+1} lambda_{t+1} (g_t: the
gradient reaching h_t from y_t), carrying the gradient of the boundary state to the chunk before, as
mamba-ssm's fused kernel recomputes its states in its backward. What autograd keeps is the (B, D, L)- and
(B, G, N, L)-sized inputs and one (B, D, N) state per chunk. The work memory is a few (B, D, K, N)
buffers, allocated once per call and reused by every chunk: the allocator sees a handful of allocations,
not thousands of odd-sized temporaries (which glibc's heap keeps once freed, however few are alive).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


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


# state elements (batch x channels x tokens x state) of one chunk: 2 MiB per float32 work buffer, so that
# the few buffers a chunk works in stay in a CPU's cache; much smaller chunks cost per-chunk overhead
CHUNK_ELEMENTS = 2 ** 19


def chunk_tokens(batch: int, channels: int, state: int) -> int:
    """Tokens per chunk: ``CHUNK_ELEMENTS // (batch * channels * state)``, at least 16 (fewer tokens per
    chunk would cost more in per-chunk overhead than the buffers save). The last chunk of a sequence takes
    what is left."""
    return max(16, CHUNK_ELEMENTS // max(1, batch * channels * state))


def _scan_(a: Tensor, b: Tensor, work: Tensor, reverse: bool = False) -> None:
    """In place along the last-but-one axis: ``b`` becomes the states of h_t = a_t * h_{t-1} + b_t
    (h_{-1} = 0), or with ``reverse`` of h_t = a_t * h_{t+1} + b_t (h_K = 0).

    a, b: (..., K, N); ``a`` is overwritten (partial products); work: (..., >= K, N) scratch.
    Log-depth (Hillis-Steele): after the step of offset o, b_t holds the map of the o tokens ending at t.
    """
    length = a.shape[-2]
    offset = 1
    while offset < length:
        n = length - offset
        to, frm = (slice(0, n), slice(offset, length)) if reverse else (slice(offset, length), slice(0, n))
        tmp = work[..., :n, :]
        torch.mul(a[..., to, :], b[..., frm, :], out=tmp)
        b[..., to, :].add_(tmp)
        if 2 * offset < length:  # the products are needed by the next step only
            torch.mul(a[..., to, :], a[..., frm, :], out=tmp)
            a[..., to, :].copy_(tmp)
        offset *= 2


def linear_recurrence(a: Tensor, b: Tensor, h0: Optional[Tensor] = None, reverse: bool = False) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t with h_{-1} = ``h0`` (zeros when None), along the
    last-but-one axis (``reverse``: h_t = a_t * h_{t+1} + b_t from h_K = ``h0``).

    a, b: (..., L, N), h0: (..., N) -> h: (..., L, N). The scan the chunks run, on copies of the inputs;
    not differentiable (``selective_scan_torch`` has its own backward).
    """
    a, h = a.clone(), b.clone()
    if h0 is not None:
        end = -1 if reverse else 0
        h[..., end, :] += a[..., end, :] * h0
    _scan_(a, h, torch.empty_like(a), reverse=reverse)
    return h


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
    """See the module docstring for shapes. Differentiable (once) in every input. ``chunk_length``: tokens per
    chunk (default ``chunk_tokens(batch, channels, state)``: about ``CHUNK_ELEMENTS`` state elements)."""
    out_dtype, dt = u.dtype, _state_dtype(u)
    batch, channels, state = u.shape[0], u.shape[1], A.shape[-1]
    u32, delta32 = u.to(dt), delta.to(dt)
    if delta_bias is not None:
        delta32 = delta32 + delta_bias.to(dt)[:, None]
    if delta_softplus:
        delta32 = F.softplus(delta32)
    # B, C stay per group over the whole sequence; each chunk reads its stretch per group
    B32, C32 = B.to(dt), C.to(dt)
    if B32.dim() == 3:
        B32, C32 = B32.unsqueeze(1), C32.unsqueeze(1)
    if channels % B32.shape[1]:
        raise ValueError(f"{channels} channels cannot be split into {B32.shape[1]} groups")
    chunk = chunk_length or chunk_tokens(batch, channels, state)
    y = _ChunkedScan.apply(delta32, delta32 * u32, A.to(dt), B32, C32, chunk)
    if D is not None:
        y = y + D.to(dt)[:, None] * u32
    if z is not None:
        y = y * F.silu(z.to(dt))
    return y.to(out_dtype)


def _grouped(t: Tensor, groups: int) -> Tensor:
    """(B, D, ...) -> (B, G, D/G, ...): a view."""
    return t.view(t.shape[0], groups, t.shape[1] // groups, *t.shape[2:])


def _chunk_states(delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor, h0: Optional[Tensor],
                  a: Tensor, h: Tensor, work: Tensor) -> None:
    """All states of one chunk into ``h``: delta, delta_u (B, D, K), A (D, N), B (B, G, N, K), h0 (B, D, N)
    or None (zeros); a, h, work: (B, D, K, N) buffers (``a`` and ``work`` are overwritten)."""
    # Discretisation of Algorithm 1: A_bar = exp(delta (x) A), B_bar x = delta * B * x.
    torch.mul(delta.unsqueeze(-1), A[:, None, :], out=a).exp_()
    groups = B.shape[1]
    torch.mul(_grouped(delta_u, groups).unsqueeze(-1), B.transpose(-1, -2).unsqueeze(2), out=_grouped(h, groups))
    if h0 is not None:
        h[..., 0, :] += a[..., 0, :] * h0
    _scan_(a, h, work)


class _ChunkedScan(torch.autograd.Function):
    """y_t = <h_t, C_t> of h_t = exp(delta_t A) h_{t-1} + delta_u_t B_t (h_{-1} = 0), scanned in chunks of
    ``chunk`` tokens. delta, delta_u: (B, D, L); A: (D, N); B, C: (B, G, N, L) -> y (B, D, L). Saves one
    state per chunk; the backward recomputes each chunk's states (see the module docstring)."""

    @staticmethod
    def forward(ctx, delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
        batch, channels, length = delta.shape
        groups, state = B.shape[1], A.shape[-1]
        chunk = max(1, min(chunk, length))
        a, h, work = (delta.new_empty(batch, channels, chunk, state) for _ in range(3))
        y = delta.new_empty(batch, channels, length)
        starts = range(0, length, chunk)
        boundary = delta.new_zeros(len(starts), batch, channels, state)  # [i]: the state before chunk i
        for i, s in enumerate(starts):
            k = min(chunk, length - s)
            hk, wk = h[:, :, :k], work[:, :, :k]
            _chunk_states(delta[..., s:s + k], delta_u[..., s:s + k], A, B[..., s:s + k],
                          boundary[i] if i else None, a[:, :, :k], hk, work)
            torch.mul(_grouped(hk, groups), C[..., s:s + k].transpose(-1, -2).unsqueeze(2), out=_grouped(wk, groups))
            torch.sum(wk, dim=-1, out=y[..., s:s + k])
            if i + 1 < len(starts):
                boundary[i + 1].copy_(hk[..., -1, :])
        ctx.chunk = chunk
        ctx.save_for_backward(delta, delta_u, A, B, C, boundary)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        delta, delta_u, A, B, C, boundary = ctx.saved_tensors
        need_delta, need_delta_u, need_A, need_B, need_C = ctx.needs_input_grad[:5]
        chunk, dy = ctx.chunk, dy.contiguous()
        batch, channels, length = delta.shape
        groups, state = B.shape[1], A.shape[-1]
        d_delta = torch.empty_like(delta) if need_delta else None
        d_delta_u = torch.empty_like(delta_u) if need_delta_u else None
        d_A = torch.zeros_like(A) if need_A else None
        d_B = torch.empty_like(B) if need_B else None
        d_C = torch.empty_like(C) if need_C else None
        a, h, lam, work = (delta.new_empty(batch, channels, chunk, state) for _ in range(4))
        carry = None  # gradient of the state at the end of the chunk, from the chunks after it
        starts = range(0, length, chunk)
        for i in reversed(range(len(starts))):
            s = starts[i]
            k = min(chunk, length - s)
            t = slice(s, s + k)
            d_k, du_k, B_k, C_k = delta[..., t], delta_u[..., t], B[..., t], C[..., t]
            ak, hk, lk, wk = a[:, :, :k], h[:, :, :k], lam[:, :, :k], work[:, :, :k]
            h0 = boundary[i] if i else None
            _chunk_states(d_k, du_k, A, B_k, h0, ak, hk, work)  # the states again, from the boundary state
            dy_k = _grouped(dy[..., t], groups).unsqueeze(-1)  # (B, G, D/G, K, 1)
            if need_C:  # dC_t = sum over the group's channels of dy_t h_t
                torch.mul(_grouped(hk, groups), dy_k, out=_grouped(wk, groups))
                torch.sum(_grouped(wk, groups), dim=2, out=d_C[..., t].transpose(-1, -2))
            if not (need_delta or need_delta_u or need_A or need_B):
                continue
            # g_t = dy_t C_t reaches h_t from y_t; the last state also gets what the chunks after it send back
            torch.mul(dy_k, C_k.transpose(-1, -2).unsqueeze(2), out=_grouped(lk, groups))
            if carry is not None:
                lk[..., -1, :] += carry
            # adjoint: lambda_t = g_t + a_{t+1} lambda_{t+1}, a reverse scan with multipliers a_{t+1}
            torch.mul(d_k[..., 1:].unsqueeze(-1), A[:, None, :], out=ak[..., :-1, :]).exp_()
            ak[..., -1, :] = 0  # multiplies lambda_K, which does not exist
            _scan_(ak, lk, work, reverse=True)
            if i:  # h_{-1} of this chunk is the last state of the one before: its gradient is a_0 lambda_0
                carry = torch.exp(d_k[..., 0, None] * A) * lk[..., 0, :]
            # lambda_t is the gradient of b_t = delta_u_t B_t
            if need_delta_u:
                torch.mul(_grouped(lk, groups), B_k.transpose(-1, -2).unsqueeze(2), out=_grouped(wk, groups))
                torch.sum(wk, dim=-1, out=d_delta_u[..., t])
            if need_B:
                torch.mul(_grouped(lk, groups), _grouped(du_k, groups).unsqueeze(-1), out=_grouped(wk, groups))
                torch.sum(_grouped(wk, groups), dim=2, out=d_B[..., t].transpose(-1, -2))
            if need_delta or need_A:  # the gradient of delta_t A is lambda_t h_{t-1} a_t
                ak[..., 1:, :].copy_(hk[..., :-1, :])
                if h0 is None:
                    ak[..., 0, :] = 0
                else:
                    ak[..., 0, :].copy_(h0)
                ak.mul_(lk)
                torch.mul(d_k.unsqueeze(-1), A[:, None, :], out=wk).exp_()
                ak.mul_(wk)
                if need_delta:
                    torch.mul(ak, A[:, None, :], out=wk)
                    torch.sum(wk, dim=-1, out=d_delta[..., t])
                if need_A:
                    torch.mul(ak, d_k.unsqueeze(-1), out=wk)
                    d_A += wk.sum((0, 2))
        return d_delta, d_delta_u, d_A, d_B, d_C, None


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
