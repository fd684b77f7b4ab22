"""Learning-rate schedules for the trainers' recipes, next to nnU-Net's ``training/lr_scheduler/``."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler


class CosineLRScheduler(LRScheduler):
    """Cosine decay from ``initial_lr`` to ``initial_lr * final_fraction`` over ``max_steps`` epochs.

    Written to nnU-Net's scheduler interface (``step(current_epoch)``, like its PolyLRScheduler);
    torch's CosineAnnealingLR warns on every explicit-epoch ``step``.
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, final_fraction: float = 1e-2):
        self.initial_lr, self.max_steps, self.final_fraction, self.ctr = initial_lr, max_steps, final_fraction, 0
        super().__init__(optimizer, -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        progress = min(current_step / max(self.max_steps, 1), 1.0)
        floor = self.initial_lr * self.final_fraction
        new_lr = floor + 0.5 * (self.initial_lr - floor) * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class LinearLRScheduler(LRScheduler):
    """Linear decay from ``initial_lr`` at epoch 0 towards 0 at ``max_steps`` epochs (Taming Mambas'
    "linear learning rate scheduler"; the paper gives no warm-up or floor), nnU-Net's interface."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int):
        self.initial_lr, self.max_steps, self.ctr = initial_lr, max_steps, 0
        super().__init__(optimizer, -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        new_lr = self.initial_lr * max(1.0 - current_step / max(self.max_steps, 1), 0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


__all__ = ["CosineLRScheduler", "LinearLRScheduler"]
