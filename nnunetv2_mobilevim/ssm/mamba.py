"""The Mamba-1 (S6) block on our scan backend, with ``mamba_ssm.Mamba``'s parameters and names.

    x, z  = in_proj(h).chunk(2)                       (B, L, E) each, E = expand * d_model
    x     = SiLU(causal depthwise conv1d(x))          kernel d_conv
    Delta, B, C = x_proj(x).split(R, N, N)            R = dt_rank, N = d_state
    Delta = softplus(dt_proj(Delta))                  (B, L, E)
    y     = selective scan(x, Delta, A = -exp(A_log), B, C, D) * SiLU(z)
    out   = out_proj(y)                               (B, L, d_model)

``Mamba`` is one such block: (B, L, d_model) -> (B, L, d_model), no norm and no residual, as
``mamba_ssm.Mamba`` (weights trained with it load unchanged). ``MambaGroup`` runs G independent
blocks on G sequences in ONE scan call, their channels stacked as groups (mamba-ssm's grouped B/C
layout, as ``DualDirectionMamba`` does for its two directions); the blocks keep their own names.
``flatten_tokens`` / ``unflatten_tokens`` turn a feature map into the token sequence of a scan order
(an axis permutation, optionally reversed) and back.

Deliberately not ``mamba_ssm.Mamba`` itself: that needs the mamba-ssm package (no CPU path) and its
fused ``mamba_inner_fn``, which cannot stack several blocks into one call. Where its fused path saves
memory (it recomputes the convolution and Delta in the backward instead of storing them), long
sequences here recompute the same stretch with ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backend import causal_conv1d, selective_scan

# tokens x inner channels from which the block recomputes its inner part in the backward (a 32^3 stage
# at 64 inner channels, 2^21): below it storing is cheap
RECOMPUTE_ELEMENTS = 2 ** 21


class Mamba(nn.Module):
    """One Mamba-1 block, (B, L, d_model) -> (B, L, d_model). Arguments and initialisation as
    ``mamba_ssm.Mamba`` (d_state 16, d_conv 4, expand 2, dt_rank ceil(d_model / 16)).

    ``float32``: compute in float32 even under fp16 autocast (the scan's outputs overflow half
    precision; U-Mamba's and Taming Mambas' guard), returning the input's dtype. ``recompute``: redo the
    inner part (conv, projections, scan) in the backward instead of storing it; ``"auto"`` does so for
    sequences of at least ``RECOMPUTE_ELEMENTS`` tokens x inner channels.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, float32: bool = True,
                 recompute: Union[bool, str] = "auto", scan_backend: Optional[str] = None) -> None:
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.float32, self.recompute, self.scan_backend = float32, recompute, scan_backend
        inner = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=bias)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1, bias=conv_bias)
        self.act = nn.SiLU()  # as mamba_ssm.Mamba holds it; the conv kernel applies it
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        dt_std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(dt_std)
            else:
                self.dt_proj.weight.uniform_(-dt_std, dt_std)
            # softplus(bias) starts log-uniform in [dt_min, dt_max]
            dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        # S4D-real initialisation: A = -(1..N) for every channel
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)))
        self.D = nn.Parameter(torch.ones(inner))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(inner, d_model, bias=bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return MambaGroup.run([self], hidden_states.unsqueeze(1)).squeeze(1)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, float32={self.float32}")


class MambaGroup(nn.Module):
    """G independent ``Mamba`` blocks of one width, each on its own sequence, in one scan call:
    (B, G, L, d_model) -> (B, G, L, d_model). ``blocks[g]`` is a plain ``Mamba`` (its own parameters
    and ``mamba_ssm`` names under ``blocks.g``); the group only stacks them when it runs."""

    def __init__(self, blocks: Sequence[Mamba]) -> None:
        super().__init__()
        first = blocks[0]
        for b in blocks:
            if (b.d_model, b.d_inner, b.d_state, b.d_conv, b.dt_rank) != \
                    (first.d_model, first.d_inner, first.d_state, first.d_conv, first.dt_rank):
                raise ValueError("the blocks of a MambaGroup need the same widths")
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.run(list(self.blocks), hidden_states)

    @staticmethod
    def run(blocks: List[Mamba], hidden_states: Tensor) -> Tensor:
        """``blocks[g]`` applied to ``hidden_states[:, g]`` (B, G, L, d_model), in one scan call."""
        first = blocks[0]
        if hidden_states.shape[1] != len(blocks):
            raise ValueError(f"{len(blocks)} blocks for {hidden_states.shape[1]} sequences")
        dtype = hidden_states.dtype
        with autocast_off(hidden_states.device.type) if first.float32 else nullcontext():
            h = hidden_states.float() if first.float32 else hidden_states
            grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in first.parameters()))
            long = h.shape[0] * h.shape[1] * h.shape[2] * first.d_inner >= RECOMPUTE_ELEMENTS
            recompute = first.recompute is True or (first.recompute == "auto" and long)
            if grad and recompute:
                out = checkpoint(_group_forward, blocks, h, use_reentrant=False)
            else:
                out = _group_forward(blocks, h)
        return out.to(dtype)


def autocast_off(device_type: str):
    """A context without autocast on ``device_type``; nothing to switch off on the meta device (which
    ``nnunetv2_mobilevim list`` builds and runs networks on)."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()


def _f32(t: Tensor) -> Tensor:
    """float32 for the scan's per-channel parameters, as mamba_ssm passes them; float64 stays (tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _stack(tensors: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    return None if tensors[0] is None else torch.stack(list(tensors))


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Per-group linear layers: x (B, G, L, in), weight (G, out, in), bias (G, out) -> (B, G, L, out)."""
    y = torch.einsum("bgli,goi->bglo", x, weight)
    return y if bias is None else y + bias[:, None, :]


def _group_forward(blocks: List[Mamba], h: Tensor) -> Tensor:
    first = blocks[0]
    batch, g, length, _ = h.shape
    inner, n, r = first.d_inner, first.d_state, first.dt_rank
    if g == 1:  # the common case: the layers themselves, no stacking
        b = blocks[0]
        x, z = b.in_proj(h[:, 0]).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
        x = causal_conv1d(x, b.conv1d.weight.squeeze(1), b.conv1d.bias, backend=b.scan_backend)
        dt, B, C = b.x_proj(x.transpose(1, 2)).split([r, n, n], dim=-1)  # (B, L, R), (B, L, N) x 2
        delta = F.linear(dt, b.dt_proj.weight).transpose(1, 2)  # (B, E, L); the bias is the scan's
        y = selective_scan(x, delta, -torch.exp(_f32(b.A_log)), B.transpose(1, 2).contiguous(),
                           C.transpose(1, 2).contiguous(), D=_f32(b.D), z=z,
                           delta_bias=_f32(b.dt_proj.bias), delta_softplus=True, backend=b.scan_backend)
        return b.out_proj(y.transpose(1, 2)).unsqueeze(1)
    xz = _linear(h, _stack([b.in_proj.weight for b in blocks]), _stack([b.in_proj.bias for b in blocks]))
    x, z = xz.permute(0, 1, 3, 2).chunk(2, dim=2)  # (B, G, E, L) each
    conv_bias = _stack([b.conv1d.bias for b in blocks])
    x = causal_conv1d(x.reshape(batch, g * inner, length),
                      torch.cat([b.conv1d.weight.squeeze(1) for b in blocks]),
                      None if conv_bias is None else conv_bias.reshape(-1), backend=first.scan_backend)
    x = x.view(batch, g, inner, length)
    proj = torch.einsum("bgil,gki->bgkl", x, _stack([b.x_proj.weight for b in blocks]))
    dt, B, C = proj.split([r, n, n], dim=2)  # (B, G, R, L), (B, G, N, L) x 2
    delta = torch.einsum("bgrl,gir->bgil", dt, _stack([b.dt_proj.weight for b in blocks]))
    A = -torch.exp(torch.cat([_f32(b.A_log) for b in blocks]))  # (G*E, N)
    y = selective_scan(x.reshape(batch, g * inner, length), delta.reshape(batch, g * inner, length), A,
                       B.contiguous(), C.contiguous(), D=torch.cat([_f32(b.D) for b in blocks]),
                       z=z.reshape(batch, g * inner, length),
                       delta_bias=torch.cat([_f32(b.dt_proj.bias) for b in blocks]), delta_softplus=True,
                       backend=first.scan_backend)  # (B, G*E, L)
    y = y.view(batch, g, inner, length).transpose(2, 3)  # (B, G, L, E)
    return _linear(y, _stack([b.out_proj.weight for b in blocks]), _stack([b.out_proj.bias for b in blocks]))


ScanOrder = Tuple[Tuple[int, ...], bool]  # (spatial axes, outermost first; reversed)


def flatten_tokens(x: Tensor, order: ScanOrder) -> Tensor:
    """(B, C, *S) -> (B, L, C): the tokens in ``order``. ``((0, 1, 2), False)`` is the raster order of
    (D, H, W) with W fastest; ``((0, 2, 1), False)`` makes H fastest; ``reversed`` reads the result
    backwards."""
    axes, backwards = order
    if sorted(axes) != list(range(x.dim() - 2)):
        raise ValueError(f"scan order {order} does not permute the {x.dim() - 2} spatial axes")
    tokens = x.permute(0, *[a + 2 for a in axes], 1).flatten(1, -2)
    return tokens.flip(1) if backwards else tokens


def unflatten_tokens(tokens: Tensor, order: ScanOrder, spatial: Sequence[int]) -> Tensor:
    """The inverse of ``flatten_tokens``: (B, L, C) in ``order`` -> (B, C, *spatial)."""
    axes, backwards = order
    if backwards:
        tokens = tokens.flip(1)
    permuted = tokens.reshape(tokens.shape[0], *[spatial[a] for a in axes], tokens.shape[-1])
    inverse = [0] * (len(axes) + 2)
    inverse[1] = len(axes) + 1
    for i, a in enumerate(axes):
        inverse[a + 2] = i + 1
    return permuted.permute(*inverse)
