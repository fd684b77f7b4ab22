"""Small convolution blocks shared by the encoder and the decoder.

Strides are per axis from the start (``(sd, sh, sw)``) so anisotropic nnU-Net plans work.
All blocks map (B, C_in, D, H, W) -> (B, C_out, D', H', W').
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type

import torch.nn.functional as F
from torch import Tensor, nn

Stride = Tuple[int, int, int]


def as_stride(stride) -> Stride:
    """An int or a length-3 sequence -> a 3-tuple of ints."""
    if isinstance(stride, int):
        return (stride, stride, stride)
    stride = tuple(int(s) for s in stride)
    if len(stride) != 3:
        raise ValueError(f"a 3D stride needs 3 entries, got {stride}")
    return stride


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``"batch"`` (the paper) or ``"instance"`` normalisation for ``channels`` features."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}")


class ConvNormAct(nn.Sequential):
    """Conv3d (no bias) -> norm -> optional activation; 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride=1, groups: int = 1,
                 norm: str = "batch", act: Optional[Type[nn.Module]] = nn.SiLU) -> None:
        layers = [nn.Conv3d(in_channels, out_channels, kernel_size, as_stride(stride), kernel_size // 2,
                            groups=groups, bias=False),
                  norm_layer(norm, out_channels)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class MBConvDownsample(nn.Sequential):
    """The DWConv downsampling block (inverted residual without the residual, as in MobileNetV2):
    1x1 expand -> depthwise 3^3 with ``stride`` -> 1x1 project. (B, C_in, ...) -> (B, C_out, .../stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride, expand: int = 4, norm: str = "batch") -> None:
        hidden = in_channels * expand
        super().__init__(
            ConvNormAct(in_channels, hidden, 1, norm=norm),
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, norm=norm),
            ConvNormAct(hidden, out_channels, 1, norm=norm, act=None),
        )


class ConvPair(nn.Sequential):
    """3^3 conv with ``stride`` then 1x1 conv, each with norm + ReLU: the unit of the scale bridger's
    strided chains and of the decoder's concat fusion."""

    def __init__(self, in_channels: int, out_channels: int, stride=1, norm: str = "batch") -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, 3, stride, norm=norm, act=nn.ReLU),
            ConvNormAct(out_channels, out_channels, 1, norm=norm, act=nn.ReLU),
        )


class Bottleneck(nn.Module):
    """Decoder bottleneck: x + (1x1 expand -> 3^3 -> 1x1 back). (B, C, D, H, W) -> same."""

    def __init__(self, channels: int, expand: int = 2, norm: str = "batch") -> None:
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            ConvNormAct(channels, hidden, 1, norm=norm, act=nn.ReLU),
            ConvNormAct(hidden, hidden, 3, norm=norm, act=nn.ReLU),
            ConvNormAct(hidden, channels, 1, norm=norm, act=None),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class UpLink(nn.Sequential):
    """Decoder up-link: 1x1 squeeze -> transposed 3^3 with ``stride`` -> 1x1 to ``out_channels``.

    (B, C_in, D, H, W) -> (B, C_out, D*sd, H*sh, W*sw): output_padding = stride - 1 makes the size
    exactly in * stride on every axis, including stride-1 axes of anisotropic plans.
    """

    def __init__(self, in_channels: int, out_channels: int, stride, hidden: int, norm: str = "batch") -> None:
        stride = as_stride(stride)
        super().__init__(
            ConvNormAct(in_channels, hidden, 1, norm=norm, act=nn.ReLU),
            nn.ConvTranspose3d(hidden, hidden, 3, stride, padding=1, output_padding=tuple(s - 1 for s in stride),
                               bias=False),
            norm_layer(norm, hidden),
            nn.ReLU(inplace=True),
            ConvNormAct(hidden, out_channels, 1, norm=norm, act=nn.ReLU),
        )


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor`` (never below it, never >10% down), as MobileNet does."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def prod_strides(strides: Sequence[Stride]) -> Stride:
    """Cumulative stride of a sequence of per-axis strides."""
    total = [1, 1, 1]
    for s in strides:
        total = [t * si for t, si in zip(total, s)]
    return tuple(total)


def pad_to_multiple(x: Tensor, multiples: Sequence[int]) -> Tensor:
    """Replicate-pad the last ``len(multiples)`` axes of ``x`` up to multiples of ``multiples`` (one per
    axis, in order); ``x`` itself when nothing is missing. Callers crop their outputs back."""
    pads: List[int] = []
    for size, multiple in zip(reversed(x.shape[-len(multiples):]), reversed(list(multiples))):
        pads += [0, (-size) % multiple]
    return F.pad(x, pads, mode="replicate") if any(pads) else x
