"""nnU-Net's training augmentation, batched on the batch's device (``pipeline.DeviceAugmentation``):
spatial (``spatial``), intensity (``intensity``) and label steps (``labels``), each translated from
nnU-Net's own transform objects; random draws for a batch at once (``sampling``)."""

from .pipeline import DeviceAugmentation, ReplayedAugmentation
from .sampling import Untranslatable

__all__ = ["DeviceAugmentation", "ReplayedAugmentation", "Untranslatable"]
