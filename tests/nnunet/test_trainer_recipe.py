"""Trainer recipes, checked without training: what the optimiser and the schedule do."""

import math

import pytest
import torch

from nnunetv2_mobilevim.nnunet.lr_schedulers import CosineLRScheduler


def test_cosine_schedule_follows_nnunet_step_interface():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = CosineLRScheduler(opt, 1e-3, max_steps=100, final_fraction=0.01)
    lrs = []
    for epoch in range(101):
        sched.step(epoch)  # nnU-Net calls step(current_epoch) at every epoch start
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[50] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lrs[100] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    assert sched.get_last_lr() == [lrs[-1]]
    assert not math.isnan(sum(lrs))


def test_taming_paper_recipe_linear_schedule():
    """Taming Mambas' recipe: lr 3e-4 decaying linearly to 0 at epoch 300, nnU-Net's step(epoch) interface."""
    from nnunetv2_mobilevim.nnunet.lr_schedulers import LinearLRScheduler

    opt = torch.optim.RAdam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LinearLRScheduler(opt, 3e-4, 300)
    for epoch, expected in ((0, 3e-4), (150, 1.5e-4), (299, 1e-6), (300, 0.0), (400, 0.0)):
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), epoch
