"""The label-side steps of nnU-Net's training augmentation, batched: mirroring (image and
segmentation), masking the image outside the normalisation mask, removing the padding label,
regions (with the ignore label as one more region) and the deep-supervision target pyramid.

Shapes: image ``(B, C, *S)`` float, segmentation ``(B, Cs, *S)`` (int16 from nnU-Net's loader, -1
outside the image), S two or three spatial axes. Each step is deterministic except the mirror axes,
so the tests compare it with batchgeneratorsv2's transform exactly.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling import Untranslatable, coin, constant


class DeviceMirror:
    """``MirrorTransform``: each allowed spatial axis flipped with probability 1/2, per sample, image and
    segmentation together."""

    def __init__(self, allowed_axes: Sequence[int]) -> None:
        self.allowed_axes = tuple(int(a) for a in allowed_axes)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceMirror":
        _require_always(transform, apply_probability)
        return cls(transform.allowed_axes)

    def draw(self, image: Tensor) -> Tensor:
        """(B, len(allowed_axes)) bool: which axes each sample flips."""
        return coin(0.5, (image.shape[0], len(self.allowed_axes)), image.device)

    def apply(self, image: Tensor, seg: Optional[Tensor], flips: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        # flips commute: one pass per axis, each sample keeping or taking the flipped copy
        for i, axis in enumerate(self.allowed_axes):
            image = _where_samples(flips[:, i], image.flip(axis + 2), image)
            if seg is not None:
                seg = _where_samples(flips[:, i], seg.flip(axis + 2), seg)
        return image, seg

    def __call__(self, image: Tensor, seg: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        return self.apply(image, seg, self.draw(image))


class DeviceMaskImage:
    """``MaskImageTransform``: in ``apply_to_channels``, voxels whose label (channel ``channel_idx_in_seg``)
    is negative (outside the mask nnU-Net normalised in) are set to ``set_outside_to``."""

    def __init__(self, apply_to_channels: Sequence[int], channel_idx_in_seg: int = 0, set_outside_to: float = 0.0):
        self.apply_to_channels = [int(c) for c in apply_to_channels]
        self.channel_idx_in_seg, self.set_outside_to = int(channel_idx_in_seg), float(set_outside_to)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceMaskImage":
        _require_always(transform, apply_probability)
        return cls(transform.apply_to_channels, transform.channel_idx_in_seg, transform.set_outside_to)

    def __call__(self, image: Tensor, seg: Tensor) -> Tuple[Tensor, Tensor]:
        if not self.apply_to_channels:
            return image, seg
        outside = (seg[:, self.channel_idx_in_seg] < 0).unsqueeze(1)  # (B, 1, *S)
        channels = _channel_mask(self.apply_to_channels, image.shape[1], image.device)
        where = outside & channels.view(1, -1, *([1] * (image.dim() - 2)))
        return image.masked_fill(where, self.set_outside_to), seg


class DeviceRemoveLabel:
    """``RemoveLabelTransform``: ``label_value`` becomes ``set_to`` in the given segmentation channels
    (all when None); nnU-Net turns its padding label -1 into background."""

    def __init__(self, label_value: int, set_to: int, segmentation_channels: Optional[Sequence[int]] = None):
        self.label_value, self.set_to = label_value, set_to
        self.segmentation_channels = None if segmentation_channels is None else list(segmentation_channels)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceRemoveLabel":
        _require_always(transform, apply_probability)
        return cls(transform.label_value, transform.set_to, transform.segmentation_channels)

    def __call__(self, image: Tensor, seg: Tensor) -> Tuple[Tensor, Tensor]:
        hit = seg == self.label_value
        if self.segmentation_channels is not None:
            chosen = _channel_mask(self.segmentation_channels, seg.shape[1], seg.device)
            hit &= chosen.view(1, -1, *([1] * (seg.dim() - 2)))
        return image, seg.masked_fill(hit, self.set_to)


class DeviceRegions:
    """``ConvertSegmentationToRegionsTransform``: channel ``channel_in_seg`` -> one bool channel per
    region (a label or a list of labels), ``(B, len(regions), *S)``; nnU-Net appends the ignore label
    as a last region."""

    def __init__(self, regions: Sequence[Union[int, Sequence[int]]], channel_in_seg: int = 0) -> None:
        self.regions = [[int(r)] if isinstance(r, (int, float)) else [int(v) for v in r] for r in regions]
        self.channel_in_seg = int(channel_in_seg)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceRegions":
        _require_always(transform, apply_probability)
        return cls([[int(v) for v in r.tolist()] for r in transform.regions], transform.channel_in_seg)

    def __call__(self, image: Tensor, seg: Tensor) -> Tuple[Tensor, Tensor]:
        labels = seg[:, self.channel_in_seg]
        out = [torch.isin(labels, constant(tuple(r), labels.device, labels.dtype)) for r in self.regions]
        return image, torch.stack(out, dim=1)


class DeviceDeepSupervisionTargets:
    """``DownsampleSegForDSTransform``: the segmentation at every deep-supervision scale, nearest-exact
    (as ``F.interpolate(..., mode="nearest-exact")`` to ``round(size * scale)`` per axis), scale 1 as it is.
    Returns the list of targets, highest resolution first."""

    def __init__(self, ds_scales: Sequence[Union[float, Sequence[float]]]) -> None:
        self.ds_scales = [s if isinstance(s, (list, tuple)) else float(s) for s in ds_scales]

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceDeepSupervisionTargets":
        _require_always(transform, apply_probability)
        return cls(transform.ds_scales)

    def __call__(self, image: Tensor, seg: Tensor) -> Tuple[Tensor, List[Tensor]]:
        spatial = seg.shape[2:]
        targets, as_float = [], None
        for scale in self.ds_scales:
            scale = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(spatial)
            if all(s == 1 for s in scale):
                targets.append(seg)
                continue
            if as_float is None:
                as_float = seg.float()
            size = [round(n * s) for n, s in zip(spatial, scale)]
            targets.append(F.interpolate(as_float, size, mode="nearest-exact").to(seg.dtype))
        return image, targets


def _channel_mask(channels: Sequence[int], count: int, device: torch.device) -> Tensor:
    """(count,) bool, True at ``channels``."""
    return constant(tuple(c in channels or c - count in channels for c in range(count)), device, torch.bool)


def _where_samples(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per sample: ``a`` where ``mask`` (B,) is True, else ``b``."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _require_always(transform, apply_probability: float) -> None:
    if apply_probability != 1:
        raise Untranslatable(f"{type(transform).__name__} inside RandomTransform(apply_probability="
                             f"{apply_probability}): the device pipeline applies it to every sample, as nnU-Net does")
