"""The MobileViM decoder (the released code's "feature guide" head), with nnU-Net deep supervision.

Inputs: encoder features f_0..f_3 of stages 1-4, f_i: (B, C_i, *S_i), S_{i+1} = S_i / strides[i],
S = (D, H, W) or (H, W) after ``conv_op``.
    1. o_i = Bottleneck(f_i) on every stage                (the "Bottleneck" boxes of Fig. 1)
    2. ScaleBridger across o_0..o_3                        (Eq. 9)
    3. Top-down path from d_3 = o_3: d_i = ReLU(o_i + ConvPair(concat(UpLink(d_{i+1}), o_i)))
    4. Multi-scale fusion: d_0..d_3 resized to S_0, concatenated, 1x1 conv to classes (computed per
       scale before resizing, which is the same map: see ``fuse_scales``)
Output logits at S_0; the network upsamples them to the input size.
Deep supervision (ours, for nnU-Net): 1x1 heads on d_0, d_1, d_2, highest resolution first.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Type

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .conv_blocks import FUNCTIONAL_CONV, Bottleneck, ConvPair, Stride, UpLink, make_divisible
from .scale_bridger import ScaleBridger
from .upsample import linear_resize


class MobileViMDecoder(nn.Module):
    """[f_0..f_3] -> logits (B, classes, *S_0) and, with ``deep_supervision``, [d_0, d_1, d_2] logits."""

    def __init__(self, channels: Sequence[int], strides: Sequence[Stride], num_classes: int,
                 bottleneck_expand: int = 2, uplink_expand: float = 0.25, conv_op: Type[_ConvNd] = nn.Conv3d,
                 norm_op: Type[nn.Module] = nn.BatchNorm3d, norm_op_kwargs: Optional[dict] = None,
                 scale_bridger: bool = True, deep_supervision: bool = False) -> None:
        super().__init__()
        channels = list(channels)
        if len(strides) != len(channels) - 1:
            raise ValueError("the decoder needs one stride between each pair of consecutive stages")
        self.deep_supervision = deep_supervision  # nnU-Net's trainer flips this attribute
        self.dim = convert_conv_op_to_dim(conv_op)  # fuse_scales' functional conv follows it
        ops = dict(conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs)
        self.bottlenecks = nn.ModuleList([Bottleneck(c, bottleneck_expand, **ops) for c in channels])
        self.scale_bridger: Optional[ScaleBridger] = (
            ScaleBridger(channels, strides, **ops) if scale_bridger else None)
        # up_links[i]: stage i+1 -> stage i; cat_fusions[i] merges it with stage i
        self.up_links = nn.ModuleList([
            UpLink(channels[i + 1], channels[i], strides[i], make_divisible(channels[i + 1] * uplink_expand), **ops)
            for i in range(len(channels) - 1)])
        self.cat_fusions = nn.ModuleList([ConvPair(2 * c, c, **ops) for c in channels[:-1]])
        self.classifier = conv_op(sum(channels), num_classes, 1, bias=True)
        self.ds_heads = nn.ModuleList([conv_op(c, num_classes, 1, bias=True) for c in channels[:-1]])

    def fuse_scales(self, decoded: List[Tensor]) -> Tensor:
        """classifier(concat(d_0, up(d_1), up(d_2), up(d_3))), computed as sum_i up(W_i d_i) + b.

        A 1x1 convolution commutes with (bi/tri)linear interpolation (a convex combination of voxels), so
        applying each block W_i of the classifier's weight at its own resolution and upsampling only
        the class maps gives the same logits while interpolating `classes` instead of C_i channels.
        """
        size = decoded[0].shape[2:]
        conv = FUNCTIONAL_CONV[self.dim]
        weights = self.classifier.weight.split([t.shape[1] for t in decoded], dim=1)
        logits = conv(decoded[0], weights[0], self.classifier.bias)
        for w, t in zip(weights[1:], decoded[1:]):
            logits = logits + linear_resize(conv(t, w), size)
        return logits

    def forward(self, features: List[Tensor]):
        branches = [b(f) for b, f in zip(self.bottlenecks, features)]
        if self.scale_bridger is not None:
            branches = self.scale_bridger(branches)
        decoded = list(branches)
        for i in reversed(range(len(branches) - 1)):
            up = self.up_links[i](decoded[i + 1])
            decoded[i] = F.relu(branches[i] + self.cat_fusions[i](torch.cat([up, branches[i]], dim=1)))
        logits = self.fuse_scales(decoded)
        if not self.deep_supervision:
            return logits
        return logits, [head(t) for head, t in zip(self.ds_heads, decoded[:-1])]
