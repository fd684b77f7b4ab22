"""Random draws for a whole batch at once, on the batch's device, with the distributions of
batchgeneratorsv2's per-sample draws (``sample_scalar``, ``BGContrast``, ``RandomTransform``).

nnU-Net draws each parameter per sample (and per channel or axis) with NumPy on the CPU; here one call
draws a tensor of them, so that a batch is augmented without a host round trip per sample.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

Range = Union[float, int, Tuple[float, float]]


class Untranslatable(ValueError):
    """An nnU-Net transform (or one of its settings) that the device pipeline does not reproduce."""


@functools.lru_cache(maxsize=256)
def constant(values: Tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A small constant tensor on ``device``, made once and then reused: copying a Python list to the GPU
    synchronises with it, and is not allowed while a CUDA graph captures. Do not modify the result."""
    return torch.tensor(values, dtype=dtype).to(device)


def coin(p: float, shape: Sequence[int], device: torch.device) -> Tensor:
    """Bool tensor of ``shape``, each entry True with probability ``p`` (``np.random.uniform() < p``)."""
    return torch.rand(tuple(shape), device=device) < p


def uniform(low: float, high: float, shape: Sequence[int], device: torch.device) -> Tensor:
    """float32 tensor of ``shape``, uniform in [low, high)."""
    return torch.empty(tuple(shape), device=device).uniform_(float(low), float(high))


def bg_contrast(contrast_range: Tuple[float, float], shape: Sequence[int], device: torch.device) -> Tensor:
    """batchgeneratorsv2's ``BGContrast``: with probability 1/2 (when the range reaches below 1) a factor
    uniform in [low, 1), otherwise uniform in [max(low, 1), high): shrinking and enlarging equally often."""
    low, high = (float(v) for v in contrast_range)
    below = uniform(low, 1.0, shape, device) if low < 1 else None
    above = uniform(max(low, 1.0), high, shape, device)
    if below is None:
        return above
    return torch.where(coin(0.5, shape, device), below, above)


def check_random_scalar(spec, what: str) -> None:
    """``Untranslatable`` when a transform is built (not at its first batch) for a draw that
    ``random_scalar`` cannot reproduce; ``what`` names the parameter."""
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast

    if isinstance(spec, bool):
        pass  # a bool is an int to Python, but never a meaningful range
    elif isinstance(spec, (int, float)):
        return
    elif isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(v, (int, float)) for v in spec):
        if spec[0] > spec[1]:
            raise Untranslatable(f"{what} range {spec!r} has low > high")
        return
    elif (isinstance(spec, BGContrast) and isinstance(spec.contrast_range, (list, tuple))
          and len(spec.contrast_range) == 2):
        return
    raise Untranslatable(f"{what} is drawn by {spec!r}, which the device pipeline cannot reproduce "
                         "(it draws numbers, (low, high) ranges and BGContrast ranges)")


def random_scalar(spec, shape: Sequence[int], device: torch.device, what: str = "a parameter") -> Tensor:
    """Draws of a batchgeneratorsv2 ``RandomScalar`` as nnU-Net's training transforms use it: a number
    (constant), a ``(low, high)`` range (uniform; ``low == high`` is that constant) or ``BGContrast``.
    Any other callable cannot be drawn on the device: ``Untranslatable`` naming ``what``."""
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast

    if isinstance(spec, (int, float)):
        return torch.full(tuple(shape), float(spec), device=device)
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        low, high = (float(v) for v in spec)
        return torch.full(tuple(shape), low, device=device) if low == high else uniform(low, high, shape, device)
    if isinstance(spec, BGContrast) and isinstance(spec.contrast_range, (list, tuple)):
        return bg_contrast(spec.contrast_range, shape, device)
    raise Untranslatable(f"{what} is drawn by {spec!r}, which the device pipeline cannot reproduce "
                         "(it draws numbers, (low, high) ranges and BGContrast ranges)")
