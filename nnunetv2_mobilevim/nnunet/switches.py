"""The plugin's environment switches, each read once per process (the first time it is asked)."""

from __future__ import annotations

import functools
import os
from typing import Optional

CUDA_GRAPHS = "NNUNETV2_MOBILEVIM_CUDA_GRAPHS"
DEVICE_AUGMENTATION = "NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION"
_OFF, _ON = ("0", "false", "f", "no", "off"), ("1", "true", "t", "yes", "on")


@functools.lru_cache(maxsize=1)
def cuda_graphs_enabled() -> bool:
    """``NNUNETV2_MOBILEVIM_CUDA_GRAPHS``: 0/false/no turns every CUDA-graph replay off, in training (the
    step, validation, the device augmentation) and in prediction."""
    return os.environ.get(CUDA_GRAPHS, "1").strip().lower() not in _OFF


@functools.lru_cache(maxsize=1)
def device_augmentation_switch() -> Optional[bool]:
    """``NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION``: False (0/false/no), True (1/true/yes) or None (unset:
    each trainer's own choice)."""
    value = os.environ.get(DEVICE_AUGMENTATION, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"{DEVICE_AUGMENTATION}={value!r}: use 0 (nnU-Net's augmentation in its worker processes), "
                     "1 (on the training device) or leave it unset")
