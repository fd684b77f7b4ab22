"""U-Mamba's building blocks, dimension-agnostic (``conv_op`` / ``norm_op`` / ``nonlin`` are types, as in
dynamic_network_architectures): the residual block that opens every stage, the decoder's upsampling,
and the Mamba layer.

The blocks that follow the first one in a stage are nnU-Net's own ``BasicBlockD`` (imported where
they are stacked, in ``network.py``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_mobilevim.ssm.mamba import Mamba, autocast_off, flatten_tokens, unflatten_tokens

Size = Union[int, Sequence[int]]


class ResidualProjectionBlock(nn.Module):
    """The residual block that opens each U-Mamba stage (and the stem and each decoder stage):

        y = norm2(conv2(act1(norm1(conv1(x)))))          conv1: kernel k, stride s; conv2: kernel k
        out = act2(y + conv3(x))                          conv3: 1x1, stride s, projection without norm

    (B, C_in, *S) -> (B, C_out, *S / s). Deliberately not nnU-Net's ``BasicBlockD``: that block projects
    with avg-pool + 1x1 conv + norm; U-Mamba projects with a plain strided 1x1 conv (with bias), also
    when C_in == C_out, and the module names here (conv1..conv3, norm1, norm2) are those of the
    released code, so its checkpoints keep their keys.
    """

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: Size, stride: Size, conv_bias: bool, norm_op: Type[nn.Module],
                 norm_op_kwargs: Optional[dict], nonlin: Type[nn.Module], nonlin_kwargs: Optional[dict]) -> None:
        super().__init__()
        kernel_size = maybe_convert_scalar_to_list(conv_op, kernel_size)
        self.stride = maybe_convert_scalar_to_list(conv_op, stride)
        self.output_channels = output_channels
        padding = [k // 2 for k in kernel_size]
        norm_op_kwargs, nonlin_kwargs = norm_op_kwargs or {}, nonlin_kwargs or {}
        self.conv1 = conv_op(input_channels, output_channels, kernel_size, self.stride, padding, bias=conv_bias)
        self.norm1 = norm_op(output_channels, **norm_op_kwargs)
        self.act1 = nonlin(**nonlin_kwargs)
        self.conv2 = conv_op(output_channels, output_channels, kernel_size, 1, padding, bias=conv_bias)
        self.norm2 = norm_op(output_channels, **norm_op_kwargs)
        self.act2 = nonlin(**nonlin_kwargs)
        self.conv3 = conv_op(input_channels, output_channels, 1, self.stride, 0, bias=conv_bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.conv3(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Elements of the conv outputs (conv1, conv2, projection) for one sample."""
        size = [i // s for i, s in zip(input_size, self.stride)]
        return 3 * np.prod([self.output_channels, *size], dtype=np.int64)


class UpsampleConv(nn.Module):
    """The decoder's upsampling: nearest-neighbour by the encoder stride, then a 1x1 conv.
    (B, C_in, *S) -> (B, C_out, *S * stride)."""

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int,
                 stride: Sequence[int], conv_bias: bool) -> None:
        super().__init__()
        self.scale = tuple(float(s) for s in stride)
        self.conv = conv_op(input_channels, output_channels, 1, bias=conv_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class MambaLayer(nn.Module):
    """LayerNorm -> Mamba over the tokens of a feature map, in float32, with no residual around it (the
    released U-Mamba replaces the features by the Mamba output). (B, C, *S) -> (B, C, *S), float32.

    Spatial tokens (the default): one token per pixel/voxel in raster order (last axis fastest), token
    width C. Channel tokens (``channel_tokens=True``): one token per channel, in channel order, whose
    width is the stage's pixel/voxel count; this ties the layer to the stage size ``spatial`` fixed at
    construction (from the plan's patch), and any other input size is refused.
    """

    def __init__(self, channels: int, spatial: Sequence[int], channel_tokens: bool,
                 d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.channels = channels
        self.spatial: Tuple[int, ...] = tuple(int(s) for s in spatial)
        self.channel_tokens = channel_tokens
        width = math.prod(self.spatial) if channel_tokens else channels
        self.norm = nn.LayerNorm(width)
        self.mamba = Mamba(width, d_state=d_state, d_conv=d_conv, expand=expand, float32=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"MambaLayer built for {self.channels} channels got {tuple(x.shape)}")
        # LayerNorm and Mamba in float32 under any autocast: the scan's outputs overflow half precision
        with autocast_off(x.device.type):
            x = x.float()
            if self.channel_tokens:
                if tuple(x.shape[2:]) != self.spatial:
                    raise ValueError(
                        f"this Mamba layer scans channels as tokens of width {math.prod(self.spatial)} (stage size "
                        f"{self.spatial}, fixed by the plan's patch); it got a feature map of size "
                        f"{tuple(x.shape[2:])}: feed the network exactly the plan's patch size")
                tokens = x.flatten(2)  # (B, C, V): the channels are the sequence
                return self.mamba(self.norm(tokens)).view_as(x)
            order = (tuple(range(x.dim() - 2)), False)  # raster order, last axis fastest
            tokens = flatten_tokens(x, order)  # (B, L, C)
            out = unflatten_tokens(self.mamba(self.norm(tokens)), order, x.shape[2:])
            return out.contiguous()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_tokens={self.channel_tokens}, spatial={self.spatial}"
