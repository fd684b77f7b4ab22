"""Dimin Mamba written from the paper, for the 2D and 3D tests: independent of the code under test except
the block's layer stack (and its token size)."""

import torch
import torch.nn.functional as F
from einops import rearrange


def reference_dimin(block, x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, C, *S): one profile per spatial axis (the mean over the other spatial axes),
    replicate-padded to a multiple of P and cut into tokens of P positions, the stack run on each profile
    on its own, and the outer product of the outputs over the axes (H x W in 2D, D x H x W in 3D)."""
    p = block.token_size
    spatial = range(2, x.dim())
    outs = []
    for axis in spatial:
        profile = x.mean(dim=tuple(a for a in spatial if a != axis))  # (B, C, L)
        n = profile.shape[-1]
        padded = F.pad(profile, (0, (-n) % p), mode="replicate")
        out = block.layers(rearrange(padded, "b c (n p) -> b n (c p)", p=p))
        outs.append(rearrange(out, "b n (c p) -> b c (n p)", p=p)[..., :n])
    axes = "dhw"[-len(outs):]
    return torch.einsum(",".join(f"bc{a}" for a in axes) + "->bc" + axes, *outs)
