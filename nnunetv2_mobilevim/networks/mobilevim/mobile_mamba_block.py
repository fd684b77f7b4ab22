"""The MobileMamba block (Sec. 3.5, Fig. 1 green box) and its Dimin Mamba (Sec. 3.3, Fig. 2)."""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from ...ssm.dual_direction_mamba import DualDirectionMamba
from .conv_blocks import ConvNormAct, norm_layer, pad_to_multiple


class DiminMamba(nn.Module):
    """Global context from a stack of ``num_layers`` DualDirectionMamba layers.

    Dimension-independent (Dimin, the paper's mechanism): (B, C, D, H, W) is reduced to three mean
    profiles (B, C, D), (B, C, H), (B, C, W); each is cut into tokens of P neighbouring positions
    (B, L/P, C*P) (lengths not divisible by P are replicate-padded and cropped back); the same layer
    stack runs on all three; the outputs are recombined into the rank-1 map
    out[b, c, d, h, w] = pD[b, c, d] * pH[b, c, h] * pW[b, c, w]  (the released code squares pD).
    Sequence length drops from N to ~N^(1/3) per axis (Eq. 8).

    Without Dimin (ablation): tokens are P^3 voxel cubes, one sequence of D*H*W/P^3 tokens.

    AMP safety (ours): the stack ends with an RMSNorm (Mamba's ``norm_f``), so the three factors of
    the product stay O(1) however the residual stream grows, and the profile path (means, Mamba
    layers, the D x H plane) runs in float32 with autocast off (a few hundred tokens, negligible
    cost); only the final broadcast to the volume is in the input's dtype. Without both, the product of three
    unnormalised profiles overflows float16 after a few hundred AMP training steps (seen on an H100).
    """

    def __init__(self, channels: int, num_layers: int, token_size: int = 2, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dual_direction: bool = True, dimension_independent: bool = True) -> None:
        super().__init__()
        self.token_size = token_size
        self.dimension_independent = dimension_independent
        token_dim = channels * (token_size if dimension_independent else token_size ** 3)
        self.layers = nn.Sequential(*[
            DualDirectionMamba(token_dim, d_state=d_state, d_conv=d_conv, expand=expand,
                               dual_direction=dual_direction) for _ in range(num_layers)],
            nn.RMSNorm(token_dim, eps=1e-5))

    # The mamba-ssm kernels are opaque to torch.compile; keep the (tiny) profile path eager so the
    # compiler can fuse the convolutional rest of the network around it.
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            if not self.dimension_independent:
                return self._forward_volume(x.float()).to(x.dtype)
            return self._forward_dimin(x)

    def _forward_dimin(self, x: Tensor) -> Tensor:
        p = self.token_size
        # float32 means straight from x (no float32 copy of the volume)
        profiles = [x.mean(dim=(3, 4), dtype=torch.float32), x.mean(dim=(2, 4), dtype=torch.float32),
                    x.mean(dim=(2, 3), dtype=torch.float32)]  # (B, C, D), (B, C, H), (B, C, W)
        lengths = [pr.shape[-1] for pr in profiles]
        tokens = [rearrange(pad_to_multiple(pr, [p]), "b c (n p) -> b n (c p)", p=p) for pr in profiles]
        if len({t.shape[1] for t in tokens}) == 1:  # equal lengths: one pass with the profiles on the batch axis
            outs = self.layers(torch.cat(tokens, dim=0)).chunk(3, dim=0)
        else:
            outs = [self.layers(t) for t in tokens]
        pd, ph, pw = [rearrange(o, "b n (c p) -> b c (n p)", p=p)[..., :n] for o, n in zip(outs, lengths)]
        # the (B, C, D, H) plane in float32, the volume directly in x's dtype (factors are RMS-normalised)
        plane = (pd[:, :, :, None] * ph[:, :, None, :]).to(x.dtype)
        return plane[..., None] * pw.to(x.dtype)[:, :, None, None, :]

    def _forward_volume(self, x: Tensor) -> Tensor:
        p = self.token_size
        d, h, w = x.shape[-3:]
        xp = pad_to_multiple(x, [p] * 3)
        n_d, n_h, n_w = (s // p for s in xp.shape[-3:])
        tokens = rearrange(xp, "b c (nd p1) (nh p2) (nw p3) -> b (nd nh nw) (c p1 p2 p3)", p1=p, p2=p, p3=p)
        out = rearrange(self.layers(tokens), "b (nd nh nw) (c p1 p2 p3) -> b c (nd p1) (nh p2) (nw p3)",
                        nd=n_d, nh=n_h, nw=n_w, p1=p, p2=p, p3=p)
        return out[..., :d, :h, :w]


class MobileMambaBlock(nn.Module):
    """Local depthwise-separable branch + Dimin Mamba global branch, fused, with a residual.

    (B, C, D, H, W) -> (B, C, D, H, W):
        local  = 1x1(C -> C/2, bias)(SiLU(Norm(DWConv3^3(x))))
        global = DiminMamba(local)                     (C/2 channels)
        out    = x + Norm(1x1(concat(global, local)))  (C -> C)
    With ``mamba=False`` (ablation) the global branch is the identity, so the fusion sees the local
    features twice and the parameter count of the convolutions is unchanged.
    """

    def __init__(self, channels: int, num_layers: int, token_size: int = 2, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, norm: str = "batch", mamba: bool = True, dual_direction: bool = True,
                 dimension_independent: bool = True) -> None:
        super().__init__()
        half = channels // 2
        self.local = nn.Sequential(
            ConvNormAct(channels, channels, 3, groups=channels, norm=norm),
            nn.Conv3d(channels, half, 1, bias=True),
        )
        self.dimin: Optional[DiminMamba] = (
            DiminMamba(half, num_layers, token_size, d_state, d_conv, expand, dual_direction, dimension_independent)
            if mamba and num_layers > 0 else None)
        self.fuse = nn.Sequential(nn.Conv3d(2 * half, channels, 1, bias=False), norm_layer(norm, channels))

    def forward(self, x: Tensor) -> Tensor:
        local = self.local(x)
        glob = self.dimin(local) if self.dimin is not None else local
        return x + self.fuse(torch.cat([glob, local], dim=1))
