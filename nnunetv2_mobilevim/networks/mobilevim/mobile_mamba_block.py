"""The MobileMamba block (Sec. 3.5, Fig. 1 green box) and its Dimin Mamba (Sec. 3.3, Fig. 2), 2D and 3D."""

from __future__ import annotations

from typing import List, Optional, Type

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ...ssm.backend import eager_under_compile
from ...ssm.dual_direction_mamba import DualDirectionMamba
from .conv_blocks import ConvNormAct, pad_to_multiple


class DiminMamba(nn.Module):
    """Global context from a stack of ``num_layers`` DualDirectionMamba layers, for ``dim`` = 2 or 3
    spatial axes S = (D, H, W) or (H, W).

    Dimension-independent (Dimin, the paper's mechanism): (B, C, *S) is reduced to one mean profile per
    axis, (B, C, D), (B, C, H), (B, C, W) in 3D and (B, C, H), (B, C, W) in 2D; each is cut into tokens
    of P neighbouring positions (B, L/P, C*P) (lengths not divisible by P are replicate-padded and
    cropped back); the same layer stack runs on every profile; the outputs are recombined into the
    rank-1 map
        3D: out[b, c, d, h, w] = pD[b, c, d] * pH[b, c, h] * pW[b, c, w]  (the released code squares pD)
        2D: out[b, c, h, w]    = pH[b, c, h] * pW[b, c, w]               (the H x W matrix product)
    Sequence length drops from N to ~N^(1/dim) per axis (Eq. 8: the cube root in 3D, the square root
    in 2D); the token width C*P and so the weights do not depend on ``dim``.

    Without Dimin (ablation): tokens are P^dim voxel cubes (pixel squares), one sequence of N/P^dim
    tokens; only here ``dim`` changes the token width.

    AMP safety (ours): the stack ends with an RMSNorm (Mamba's ``norm_f``), so the factors of the
    product stay O(1) however the residual stream grows, and the profile path (means, Mamba layers,
    the product of all factors but the last) runs in float32 with autocast off (a few hundred tokens,
    negligible cost); only the final broadcast to the full map is in the input's dtype. Without both,
    the product of three unnormalised profiles overflows float16 after a few hundred AMP training
    steps (seen on an H100).
    """

    def __init__(self, channels: int, num_layers: int, token_size: int = 2, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dual_direction: bool = True, dimension_independent: bool = True,
                 dim: int = 3) -> None:
        super().__init__()
        self.token_size = token_size
        self.dimension_independent = dimension_independent
        self.dim = dim
        token_dim = channels * (token_size if dimension_independent else token_size ** dim)
        self.layers = nn.Sequential(*[
            DualDirectionMamba(token_dim, d_state=d_state, d_conv=d_conv, expand=expand,
                               dual_direction=dual_direction) for _ in range(num_layers)],
            nn.RMSNorm(token_dim, eps=1e-5))

    # The mamba-ssm kernels are opaque to torch.compile; keep the (tiny) profile path eager so the
    # compiler can fuse the convolutional rest of the network around it.
    @eager_under_compile
    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> (B, C, *S), S with ``dim`` axes."""
        if x.dim() != self.dim + 2:
            raise ValueError(f"this DiminMamba is {self.dim}D: expected a (B, C, {self.dim} axes) tensor, "
                             f"got shape {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):
            if not self.dimension_independent:
                return self._forward_volume(x.float()).to(x.dtype)
            return self._forward_dimin(x)

    def _forward_dimin(self, x: Tensor) -> Tensor:
        p = self.token_size
        axes = range(2, x.dim())
        # one profile per axis, the mean over every other spatial axis; float32 means straight from x
        # (no float32 copy of the volume). 3D: (B, C, D), (B, C, H), (B, C, W); 2D: (B, C, H), (B, C, W)
        profiles = [x.mean(dim=tuple(a for a in axes if a != axis), dtype=torch.float32) for axis in axes]
        lengths = [pr.shape[-1] for pr in profiles]
        tokens = [rearrange(pad_to_multiple(pr, [p]), "b c (n p) -> b n (c p)", p=p) for pr in profiles]
        outs = self._stack_by_length(tokens)
        factors = [rearrange(o, "b n (c p) -> b c (n p)", p=p)[..., :n] for o, n in zip(outs, lengths)]
        return rank_one(factors, x.dtype)

    def _stack_by_length(self, tokens: List[Tensor]) -> List[Tensor]:
        """The layer stack on every (B, L_k, C*P) token sequence, one pass per distinct length with those
        sequences on the batch axis (3 passes -> 1 at a cube, 2 at D = W != H): a third or half the
        launches of small kernels, which set the pace here; each sequence's result is unchanged."""
        outs: List[Optional[Tensor]] = [None] * len(tokens)
        for length in dict.fromkeys(t.shape[1] for t in tokens):
            group = [i for i, t in enumerate(tokens) if t.shape[1] == length]
            stacked = tokens[group[0]] if len(group) == 1 else torch.cat([tokens[i] for i in group], dim=0)
            for i, out in zip(group, self.layers(stacked).chunk(len(group), dim=0)):
                outs[i] = out
        return outs

    def _forward_volume(self, x: Tensor) -> Tensor:
        p = self.token_size
        sizes = x.shape[2:]
        xp = pad_to_multiple(x, [p] * len(sizes))
        grid = {f"n{k}": s // p for k, s in enumerate(xp.shape[2:])}
        cubes = {f"p{k}": p for k in range(len(sizes))}
        # 3D: "b c (n0 p0) (n1 p1) (n2 p2)" <-> "b (n0 n1 n2) (c p0 p1 p2)"; 2D: the same without axis 2
        spatial = " ".join(f"(n{k} p{k})" for k in range(len(sizes)))
        sequence = f"b ({' '.join(grid)}) (c {' '.join(cubes)})"
        tokens = rearrange(xp, f"b c {spatial} -> {sequence}", **cubes)
        out = rearrange(self.layers(tokens), f"{sequence} -> b c {spatial}", **grid, **cubes)
        return out[(..., *[slice(0, s) for s in sizes])]


def rank_one(factors: List[Tensor], dtype: torch.dtype) -> Tensor:
    """float32 factors (B, C, L_k), k = 0..n-1 -> (B, C, L_0, ..., L_{n-1}) in ``dtype``,
    out[b, c, i_0, ..., i_{n-1}] = prod_k factors[k][b, c, i_k].

    All factors but the last are multiplied in float32 (in 3D the (B, C, D, H) plane); only the last
    product, the one as large as the feature map, is computed in ``dtype`` (factors are RMS-normalised).
    """
    partial = factors[0]
    for factor in factors[1:-1]:
        partial = partial.unsqueeze(-1) * _leading_ones(factor, partial.dim() - 2)
    return partial.to(dtype).unsqueeze(-1) * _leading_ones(factors[-1].to(dtype), partial.dim() - 2)


def _leading_ones(factor: Tensor, count: int) -> Tensor:
    """(B, C, L) -> (B, C, 1 x count, L): a view that broadcasts along the axes before its own."""
    for _ in range(count):
        factor = factor.unsqueeze(2)
    return factor


class MobileMambaBlock(nn.Module):
    """Local depthwise-separable branch + Dimin Mamba global branch, fused, with a residual.

    (B, C, *S) -> (B, C, *S), S = (D, H, W) or (H, W) after ``conv_op``:
        local  = 1x1(C -> C/2, bias)(SiLU(Norm(DWConv3^d(x))))
        global = DiminMamba(local)                     (C/2 channels)
        out    = x + Norm(1x1(concat(global, local)))  (C -> C)
    With ``mamba=False`` (ablation) the global branch is the identity, so the fusion sees the local
    features twice and the parameter count of the convolutions is unchanged.
    """

    def __init__(self, channels: int, num_layers: int, token_size: int = 2, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, conv_op: Type[_ConvNd] = nn.Conv3d, norm_op: Type[nn.Module] = nn.BatchNorm3d,
                 norm_op_kwargs: Optional[dict] = None, mamba: bool = True, dual_direction: bool = True,
                 dimension_independent: bool = True) -> None:
        super().__init__()
        half = channels // 2
        self.local = nn.Sequential(
            ConvNormAct(channels, channels, 3, groups=channels, conv_op=conv_op, norm_op=norm_op,
                        norm_op_kwargs=norm_op_kwargs),
            conv_op(channels, half, 1, bias=True),
        )
        self.dimin: Optional[DiminMamba] = (
            DiminMamba(half, num_layers, token_size, d_state, d_conv, expand, dual_direction, dimension_independent,
                       dim=convert_conv_op_to_dim(conv_op))
            if mamba and num_layers > 0 else None)
        self.fuse = nn.Sequential(conv_op(2 * half, channels, 1, bias=False),
                                  norm_op(channels, **(norm_op_kwargs or {})))

    def forward(self, x: Tensor) -> Tensor:
        local = self.local(x)
        glob = self.dimin(local) if self.dimin is not None else local
        return x + self.fuse(torch.cat([glob, local], dim=1))
