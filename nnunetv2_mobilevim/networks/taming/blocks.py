"""The Mamba Layers of Taming Mambas (Lumetti et al., Sec. 3.2, Figs. 1 and 3), for 2D and 3D maps.

One :class:`TamingMambaLayer` is everything a network puts at one place (a stage output or a skip):

    x     = LN(x)                                          entry norm, per token (released code)
    for every scan order g (an axis permutation, forwards and, if bidirectional, backwards):
        t_g = tokens of x in order g                       (B, L, C)
        t_g = t_g + Mamba_g(LN(t_g))                       the Mamba Block with its skip
        t_g = t_g + Linear_g(LN(t_g))                      the wrapper: LayerNorm, MLP head, skip
    unidirectional:  y = t_0 back on the grid
    bidirectional:   y_p = LN(t_fwd + t_bwd) per permutation p, the backward one put back in the
                     forward order first (Fig. 1b); y = mean over permutations (Fig. 3)

All G = permutations x directions Mamba blocks run as one ``MambaGroup`` (one scan call); each keeps its
own weights, norms and head. The Mamba blocks compute in float32 under autocast (``Mamba(float32=True)``).

Every operation except the Mamba block acts on one token at a time, so the only path between tokens is
the causal scan of each order; the tests rely on this to check each order's direction.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunetv2_mobilevim.ssm.mamba import Mamba, MambaGroup, ScanOrder, flatten_tokens, unflatten_tokens


def _stacked_layer_norm(h: Tensor, norms: Sequence[nn.LayerNorm]) -> Tensor:
    """``norms[g]`` applied to ``h[:, g]``: (B, G, L, C) -> (B, G, L, C), one call for all groups."""
    weight = torch.stack([n.weight for n in norms])[:, None, :]  # (G, 1, C)
    bias = torch.stack([n.bias for n in norms])[:, None, :]
    return F.layer_norm(h, h.shape[-1:], eps=norms[0].eps) * weight + bias


def _stacked_linear(h: Tensor, linears: Sequence[nn.Linear]) -> Tensor:
    """``linears[g]`` applied to ``h[:, g]``: (B, G, L, C) -> (B, G, L, C')."""
    weight = torch.stack([lin.weight for lin in linears])  # (G, C', C)
    bias = torch.stack([lin.bias for lin in linears])[:, None, :]  # (G, 1, C')
    return torch.einsum("bglc,goc->bglo", h, weight) + bias


def _channel_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """A LayerNorm over the channels of a map: (B, C, *S) -> (B, C, *S)."""
    return norm(x.movedim(1, -1)).movedim(-1, 1)


class TamingMambaLayer(nn.Module):
    """Mamba Layer(s) at one place of the U-Net: (B, C, *S) -> (B, C, *S), S 2D or 3D.

    ``scan_orders``: axis permutations (outermost first), one Mamba Layer each, or a forward/backward
    pair each if ``bidirectional``. One permutation and not bidirectional is the paper's unidirectional
    Mamba Layer (SegMamba); one bidirectional permutation is the Bidirectional 3D Mamba Layer
    (BiSegMamba, SegMambaSkip); four are MultiSegMamba's layer. ``d_state`` is the SSM state size N.

    ``mamba=False`` builds the NoMamba twin of the layer: every ``t + Mamba(LN t)`` sub-layer is the
    identity and its norm and block are not built; the entry norm, the heads and the output norms stay,
    so the twin keeps the per-token capacity and differs from the Mamba layer only in what mixes tokens.
    """

    def __init__(self, channels: int, scan_orders: Sequence[Sequence[int]], bidirectional: bool, d_state: int,
                 d_conv: int = 4, expand: int = 2, mamba: bool = True) -> None:
        super().__init__()
        self.channels, self.bidirectional = channels, bidirectional
        self.permutations: Tuple[Tuple[int, ...], ...] = tuple(tuple(p) for p in scan_orders)
        directions = (False, True) if bidirectional else (False,)
        # branch g reads the tokens in orders[g]; a backward branch directly follows its forward one
        self.orders: List[ScanOrder] = [(p, backwards) for p in self.permutations for backwards in directions]
        branches = len(self.orders)
        self.norm = nn.LayerNorm(channels)
        if mamba:
            self.mamba_norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(branches))
            self.mamba = MambaGroup([Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, float32=True)
                                     for _ in range(branches)])
        else:
            self.mamba_norms = None
            self.mamba = None
        self.head_norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(branches))
        self.heads = nn.ModuleList(nn.Linear(channels, channels) for _ in range(branches))
        self.out_norms = (nn.ModuleList(nn.LayerNorm(channels) for _ in self.permutations)
                          if bidirectional else None)

    @property
    def n_residual_layers(self) -> int:
        """Residual sub-layers of this layer as if the Mamba blocks were there: two per branch (the
        Mamba Block and the head), so a NoMamba twin is initialised as its Mamba network."""
        return 2 * len(self.orders)

    def residual_projections(self) -> List[nn.Linear]:
        """The projections that write into the residual stream: each Mamba block's out_proj, each head."""
        blocks = [] if self.mamba is None else [b.out_proj for b in self.mamba.blocks]
        return blocks + list(self.heads)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got input of shape {tuple(x.shape)}")
        spatial = x.shape[2:]
        if len(spatial) != len(self.permutations[0]):
            raise ValueError(f"scan orders {self.permutations} do not fit a {len(spatial)}D input")
        x = _channel_norm(self.norm, x)
        h = torch.stack([flatten_tokens(x, order) for order in self.orders], dim=1)  # (B, G, L, C)
        if self.mamba is not None:
            h = h + self.mamba(_stacked_layer_norm(h, self.mamba_norms))
        h = h + _stacked_linear(_stacked_layer_norm(h, self.head_norms), self.heads)
        maps = [unflatten_tokens(h[:, g], order, spatial) for g, order in enumerate(self.orders)]  # (B, C, *S)
        if self.out_norms is not None:
            maps = [_channel_norm(norm, maps[2 * p] + maps[2 * p + 1]) for p, norm in enumerate(self.out_norms)]
        y = maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)
        return y.contiguous()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, scan_orders={list(self.permutations)}, "
                f"bidirectional={self.bidirectional}, mamba={self.mamba is not None}")
