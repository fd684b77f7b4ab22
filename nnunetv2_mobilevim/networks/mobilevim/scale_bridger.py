"""The scale bridger of Eq. (9) (Sec. 3.6, orange arrows of Fig. 1).

For every later stage o, y_o = x_o + sum_{s<o} g(x_s, o), where g is a chain of (o - s) strided
ConvPair blocks that carries stage s down to stage o's resolution and channels. Stages are
updated in order, so a bridged stage feeds the stages after it (as in the released code).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Type

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .conv_blocks import ConvPair, Stride


class ScaleBridger(nn.Module):
    """features[i]: (B, C_i, *S_i) with S_{i+1} = S_i / strides[i]  ->  same shapes, bridged.
    S has the 2 or 3 axes of ``conv_op``; the ops are passed on to every ConvPair."""

    def __init__(self, channels: Sequence[int], strides: Sequence[Stride], conv_op: Type[_ConvNd] = nn.Conv3d,
                 norm_op: Type[nn.Module] = nn.BatchNorm3d, norm_op_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        if len(strides) != len(channels) - 1:
            raise ValueError("ScaleBridger needs one stride between each pair of consecutive stages")
        self.num_stages = len(channels)
        ops = dict(conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs)
        # chains[f"{s}_{o}"]: stage s -> stage o; intermediate blocks keep C_s, the last one outputs C_o.
        self.chains = nn.ModuleDict()
        for s in range(self.num_stages):
            for o in range(s + 1, self.num_stages):
                blocks = [ConvPair(channels[s], channels[s] if k < o - 1 else channels[o], strides[k], **ops)
                          for k in range(s, o)]
                self.chains[f"{s}_{o}"] = nn.Sequential(*blocks)

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        out = list(features)
        for s in range(self.num_stages):
            for o in range(s + 1, self.num_stages):
                out[o] = out[o] + self.chains[f"{s}_{o}"](out[s])
        return out
