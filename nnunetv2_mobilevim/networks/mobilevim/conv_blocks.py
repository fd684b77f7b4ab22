"""Small convolution blocks shared by the encoder and the decoder, for 2D and 3D alike.

As in dynamic_network_architectures, every block takes its operators as types: ``conv_op``
(``nn.Conv3d`` or ``nn.Conv2d``), ``norm_op`` and ``norm_op_kwargs``; the dimension follows
``conv_op`` (transposed convolution is matched to it), so one code path serves
both. The defaults are the 3D operators the network always used.
Strides are per axis from the start (``(sd, sh, sw)`` or ``(sh, sw)``) so anisotropic nnU-Net plans work.
All blocks map (B, C_in, *S) -> (B, C_out, *S'), S = (D, H, W) in 3D, (H, W) in 2D.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type

import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import (
    convert_conv_op_to_dim,
    get_matching_batchnorm,
    get_matching_convtransp,
    get_matching_instancenorm,
)
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

Stride = Tuple[int, ...]  # one entry per spatial axis

#: the functional convolution for each number of spatial axes (the decoder applies weight blocks itself)
FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def infer_dim(strides, dim: Optional[int] = None) -> int:
    """Number of spatial axes: ``dim`` if given, else the length of the first per-axis stride in
    ``strides``, else 3 (all-int or missing strides, the network's original 3D behaviour)."""
    per_axis = [len(s) for s in (strides or []) if not isinstance(s, int)]
    if dim is None:
        dim = per_axis[0] if per_axis else 3
    if dim not in (2, 3):
        raise ValueError(f"MobileViM is built in 2D or 3D, got dim={dim}")
    if any(n != dim for n in per_axis):
        raise ValueError(f"strides {list(strides)} do not all have {dim} entries (a {dim}D network)")
    return dim


def as_stride(stride, dim: int = 3) -> Stride:
    """An int or a length-``dim`` sequence -> a ``dim``-tuple of ints."""
    if isinstance(stride, int):
        return (stride,) * dim
    stride = tuple(int(s) for s in stride)
    if len(stride) != dim:
        raise ValueError(f"a {dim}D stride needs {dim} entries, got {stride}")
    return stride


def matching_norm(kind: str, conv_op: Type[_ConvNd] = nn.Conv3d) -> Tuple[Type[nn.Module], dict]:
    """``(norm_op, norm_op_kwargs)`` for the config's ``"batch"`` (the paper) or ``"instance"`` norm."""
    if kind == "batch":
        return get_matching_batchnorm(conv_op), {}
    if kind == "instance":
        return get_matching_instancenorm(conv_op), {"affine": True}
    raise ValueError(f"unknown norm {kind!r}")


def norm_layer(kind: str, channels: int, conv_op: Type[_ConvNd] = nn.Conv3d) -> nn.Module:
    """``"batch"`` or ``"instance"`` normalisation of ``channels`` features, matched to ``conv_op``."""
    norm_op, norm_op_kwargs = matching_norm(kind, conv_op)
    return norm_op(channels, **norm_op_kwargs)


class ConvNormAct(nn.Sequential):
    """conv_op (no bias) -> norm_op -> optional activation; 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride=1, groups: int = 1,
                 conv_op: Type[_ConvNd] = nn.Conv3d, norm_op: Type[nn.Module] = nn.BatchNorm3d,
                 norm_op_kwargs: Optional[dict] = None, act: Optional[Type[nn.Module]] = nn.SiLU) -> None:
        layers = [conv_op(in_channels, out_channels, kernel_size, as_stride(stride, convert_conv_op_to_dim(conv_op)),
                          kernel_size // 2, groups=groups, bias=False),
                  norm_op(out_channels, **(norm_op_kwargs or {}))]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class MBConvDownsample(nn.Sequential):
    """The DWConv downsampling block (inverted residual without the residual, as in MobileNetV2):
    1x1 expand -> depthwise 3^d with ``stride`` -> 1x1 project. (B, C_in, *S) -> (B, C_out, S/stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride, expand: int = 4,
                 conv_op: Type[_ConvNd] = nn.Conv3d, norm_op: Type[nn.Module] = nn.BatchNorm3d,
                 norm_op_kwargs: Optional[dict] = None) -> None:
        hidden = in_channels * expand
        ops = dict(conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs)
        super().__init__(
            ConvNormAct(in_channels, hidden, 1, **ops),
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, **ops),
            ConvNormAct(hidden, out_channels, 1, **ops, act=None),
        )


class ConvPair(nn.Sequential):
    """3^d conv with ``stride`` then 1x1 conv, each with norm + ReLU: the unit of the scale bridger's
    strided chains and of the decoder's concat fusion."""

    def __init__(self, in_channels: int, out_channels: int, stride=1, conv_op: Type[_ConvNd] = nn.Conv3d,
                 norm_op: Type[nn.Module] = nn.BatchNorm3d, norm_op_kwargs: Optional[dict] = None) -> None:
        ops = dict(conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs)
        super().__init__(
            ConvNormAct(in_channels, out_channels, 3, stride, **ops, act=nn.ReLU),
            ConvNormAct(out_channels, out_channels, 1, **ops, act=nn.ReLU),
        )


class Bottleneck(nn.Module):
    """Decoder bottleneck: x + (1x1 expand -> 3^d -> 1x1 back). (B, C, *S) -> same."""

    def __init__(self, channels: int, expand: int = 2, conv_op: Type[_ConvNd] = nn.Conv3d,
                 norm_op: Type[nn.Module] = nn.BatchNorm3d, norm_op_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        hidden = channels * expand
        ops = dict(conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs)
        self.body = nn.Sequential(
            ConvNormAct(channels, hidden, 1, **ops, act=nn.ReLU),
            ConvNormAct(hidden, hidden, 3, **ops, act=nn.ReLU),
            ConvNormAct(hidden, channels, 1, **ops, act=None),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class UpLink(nn.Sequential):
    """Decoder up-link: 1x1 squeeze -> transposed 3^d with ``stride`` -> 1x1 to ``out_channels``.

    (B, C_in, *S) -> (B, C_out, S * stride): output_padding = stride - 1 makes the size exactly
    in * stride on every axis, including stride-1 axes of anisotropic plans.
    """

    def __init__(self, in_channels: int, out_channels: int, stride, hidden: int,
                 conv_op: Type[_ConvNd] = nn.Conv3d, norm_op: Type[nn.Module] = nn.BatchNorm3d,
                 norm_op_kwargs: Optional[dict] = None) -> None:
        stride = as_stride(stride, convert_conv_op_to_dim(conv_op))
        ops = dict(conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs)
        super().__init__(
            ConvNormAct(in_channels, hidden, 1, **ops, act=nn.ReLU),
            get_matching_convtransp(conv_op)(hidden, hidden, 3, stride, padding=1,
                                             output_padding=tuple(s - 1 for s in stride), bias=False),
            norm_op(hidden, **(norm_op_kwargs or {})),
            nn.ReLU(inplace=True),
            ConvNormAct(hidden, out_channels, 1, **ops, act=nn.ReLU),
        )


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor`` (never below it, never >10% down), as MobileNet does."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def prod_strides(strides: Sequence[Stride]) -> Stride:
    """Cumulative stride of a sequence of per-axis strides (all of one dimension)."""
    total = [1] * len(strides[0])
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

