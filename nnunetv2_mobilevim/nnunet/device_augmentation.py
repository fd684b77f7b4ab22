"""nnU-Net's training augmentation on the training device, for any nnU-Net trainer.

    class MyTrainer(DeviceAugmentation, nnUNetTrainer): ...        # the mixin goes first
    # and in its train_step:  batch = self.augment_batch(batch)

nnU-Net's worker processes then only load each case and crop the enlarged initial patch (its
foreground oversampling unchanged); the transforms nnU-Net built (``get_training_transforms``, with
the trainer's own settings) run batched where the network trains, translated one by one
(``acceleration.augmentation.DeviceAugmentation.from_nnunet``). Validation keeps nnU-Net's pipeline.

On a GPU the pipeline is replayed from a CUDA graph (``ReplayedAugmentation``; off with
``NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0``), and the next batch is copied and augmented on a side stream
while the current step trains (``acceleration.prefetch.DevicePrefetcher``, wrapped around nnU-Net's
training loader from ``on_train_start`` to ``on_train_end``; the same batches in the same order).

``NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION`` (read once per process): ``0`` nnU-Net's CPU pipeline;
``1`` the device pipeline, also on the CPU, and an error when a transform cannot be translated;
unset: the trainer's own choice (``device_augmentation``): ``"auto"`` uses it on CUDA and otherwise,
or when a transform cannot be translated, says why in the log and keeps nnU-Net's pipeline;
``"on"`` is an explicit request (``nnUNetTrainer_DeviceAug``) and never falls back.
"""

from __future__ import annotations

from typing import Optional

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..acceleration.augmentation.pipeline import DeviceAugmentation as _Pipeline
from ..acceleration.augmentation.pipeline import ReplayedAugmentation
from ..acceleration.augmentation.sampling import Untranslatable
from ..acceleration.prefetch import DevicePrefetcher
from .switches import DEVICE_AUGMENTATION as SWITCH
from .switches import cuda_graphs_enabled, device_augmentation_switch

_AUGMENTED = "device_augmented"  # marks a batch the pipeline already augmented


class DeviceAugmentation:
    """Mixin for nnU-Net trainers: the training transforms run on the device (see the module docstring).
    ``device_augmentation``: ``"auto"`` (on CUDA, falling back with a log line) or ``"on"`` (required)."""

    device_augmentation = "auto"
    device_pipeline: Optional[_Pipeline] = None
    _augment = None  # the pipeline, replayed from CUDA graphs where possible

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        # nnU-Net calls self.get_training_transforms(...): an instance method here receives the same arguments
        transforms = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        switch = device_augmentation_switch()
        required = switch is True or (switch is None and self.device_augmentation == "on")
        if switch is False:
            self.print_to_log_file(f"data augmentation: nnU-Net's pipeline in the worker processes ({SWITCH}=0)")
            return transforms
        if not required and self.device.type != "cuda":
            self.print_to_log_file("data augmentation: nnU-Net's pipeline in the worker processes (training on "
                                   f"{self.device.type}; {SWITCH}=1 runs it batched on this device instead)")
            return transforms
        lm = self.label_manager  # every value a label map can hold, and the loader's padding -1
        labels = [-1, *lm.all_labels] + ([lm.ignore_label] if lm.ignore_label is not None else [])
        try:
            self.device_pipeline = _Pipeline.from_nnunet(transforms, labels=labels)
        except Untranslatable as err:
            if required:
                raise RuntimeError(
                    f"{type(self).__name__}: the data augmentation cannot run on the device. {err}\n"
                    f"Set {SWITCH}=0 to train with nnU-Net's augmentation in the worker processes.") from err
            self.print_to_log_file(f"data augmentation: nnU-Net's pipeline in the worker processes, because {err}")
            return transforms
        replayed = self.device.type == "cuda" and cuda_graphs_enabled()
        self._augment = ReplayedAugmentation(self.device_pipeline) if replayed else self.device_pipeline
        self.print_to_log_file(f"data augmentation: batched on {self.device} ({self.device_pipeline.describe()}"
                               f"{', replayed from a CUDA graph' if replayed else ''}); "
                               "the worker processes load and crop only")
        return None  # nnU-Net's loader then returns the cropped initial patches as they are

    def on_train_start(self):
        super().on_train_start()
        if self.device_pipeline is not None:
            self.dataloader_train = DevicePrefetcher(self.dataloader_train, self._augment_on_device, self.device)

    def on_train_end(self):
        if isinstance(self.dataloader_train, DevicePrefetcher):  # nnU-Net shuts down its own loader type
            self.dataloader_train = self.dataloader_train.loader
        super().on_train_end()

    def augment_batch(self, batch: dict) -> dict:
        """A loader batch (data ``(B, C, *initial_patch)``, target ``(B, 1, *initial_patch)``) augmented on the
        device; unchanged when nnU-Net's pipeline already ran in the workers or the prefetcher augmented it."""
        if self.device_pipeline is None or batch.get(_AUGMENTED):
            return batch
        return self._augment_on_device(batch)

    def prefetch_next_batch(self) -> None:
        """Start copying and augmenting the next training batch (call it once this step is queued)."""
        if isinstance(self.dataloader_train, DevicePrefetcher):
            self.dataloader_train.prefetch()

    def _augment_on_device(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        seg = batch["target"].to(self.device, non_blocking=True)
        with torch.no_grad():
            data, target = self._augment(data, seg)
        return {**batch, "data": data.contiguous(), "target": target, _AUGMENTED: True}


class nnUNetTrainer_DeviceAug(DeviceAugmentation, nnUNetTrainer):
    """nnU-Net's default trainer (its network, loss, optimiser and schedule unchanged) with its training
    augmentation on the device: ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainer_DeviceAug``."""

    device_augmentation = "on"

    def train_step(self, batch: dict) -> dict:
        batch = self.augment_batch(batch)
        self.prefetch_next_batch()  # nnU-Net's step launches its kernels as it goes: the next batch fills the gaps
        return super().train_step(batch)
