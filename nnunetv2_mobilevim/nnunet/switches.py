"""The plugin's environment switches, each read once per process (the first time it is asked)."""

from __future__ import annotations

import functools
import os
from typing import Optional

CUDA_GRAPHS = "NNUNETV2_MOBILEVIM_CUDA_GRAPHS"
DEVICE_AUGMENTATION = "NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION"
DEVICE_PIPELINE = "NNUNETV2_MOBILEVIM_DEVICE_PIPELINE"
BACKGROUND_PLOT = "NNUNETV2_MOBILEVIM_BACKGROUND_PLOT"
_OFF, _ON = ("0", "false", "f", "no", "off"), ("1", "true", "t", "yes", "on")


@functools.lru_cache(maxsize=1)
def cuda_graphs_enabled() -> bool:
    """``NNUNETV2_MOBILEVIM_CUDA_GRAPHS``: 0/false/no turns every CUDA-graph replay off, in training (the
    step, validation, the device augmentation) and in prediction."""
    return os.environ.get(CUDA_GRAPHS, "1").strip().lower() not in _OFF


def _tri_state(name: str, off: str, on: str) -> Optional[bool]:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"{name}={value!r}: use 0 ({off}), 1 ({on}) or leave it unset")


@functools.lru_cache(maxsize=1)
def device_augmentation_switch() -> Optional[bool]:
    """``NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION``: False (0/false/no), True (1/true/yes) or None (unset:
    each trainer's own choice)."""
    return _tri_state(DEVICE_AUGMENTATION, "nnU-Net's augmentation in its worker processes", "on the training device")


@functools.lru_cache(maxsize=1)
def device_pipeline_switch() -> Optional[bool]:
    """``NNUNETV2_MOBILEVIM_DEVICE_PIPELINE`` (``nnunetv2_mobilevim predict``): False (nnU-Net's own
    preprocessing and export), True (the device pipeline, an error where it cannot run) or None (unset: the
    device pipeline wherever it reproduces the configuration)."""
    return _tri_state(DEVICE_PIPELINE, "nnU-Net's preprocessing and export", "preprocessing and export on the device")


@functools.lru_cache(maxsize=1)
def background_plot_switch() -> Optional[bool]:
    """``NNUNETV2_MOBILEVIM_BACKGROUND_PLOT``: False (0/false/no: nnU-Net's progress.png drawn in the training
    process), True (1/true/yes: in a worker process) or None (unset: in a worker process when training on
    CUDA)."""
    return _tri_state(BACKGROUND_PLOT, "draw progress.png in the training process", "draw it in a worker process")
