"""The trainers' training step is nnU-Net's: on the CPU (fp32, deterministic), the step function that the
CUDA graph captures on a GPU (``_train_step_on_device``) against nnU-Net 2.8's own ``train_step``.
The replay of that function is compared with its eager run on the GPU (tests/acceleration/test_gpu_graphs.py)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from nnunetv2_mobilevim import MobileViM

nnunet_trainer = pytest.importorskip("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")


def trainer_state(network: torch.nn.Module, loss_scale: float, scaler: bool) -> SimpleNamespace:
    """What both steps read from a trainer: nnU-Net's DC+CE deep-supervision loss (scaled by
    ``loss_scale`` so that gradient clipping at 12 engages), SGD with nnU-Net's settings, a GradScaler."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    weights = torch.tensor([1.0, 0.5, 0.25, 0.0])
    dc_ce = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                           weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    loss = DeepSupervisionWrapper(dc_ce, (weights / weights.sum()).tolist())
    return SimpleNamespace(
        device=torch.device("cpu"), network=network, enable_deep_supervision=True,
        optimizer=torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5),
        grad_scaler=torch.amp.GradScaler("cpu") if scaler else None,
        loss=lambda output, target: loss_scale * loss(output, target))


def flat(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("scaler", [True, False])
def test_train_step_on_device_equals_nnunets_train_step(scaler):
    """Three steps of both, from the same weights and batches, with a learning-rate change after two:
    the same parameters after every step. The loss is scaled so that clipping engages (checked), and
    SGD's update is proportional to the gradient, so a step that forgot to unscale (65536x) or to clip
    breaks the comparison by orders of magnitude."""
    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    torch.manual_seed(0)
    net = MobileViM(input_channels=1, num_classes=3, variant="xs", deep_supervision=True).train()
    ref, ours = trainer_state(net, 100.0, scaler), trainer_state(copy.deepcopy(net), 100.0, scaler)
    generator = torch.Generator().manual_seed(1)
    for i in range(3):
        if i == 2:
            for s in (ref, ours):
                s.optimizer.param_groups[0]["lr"] = 4e-3
        labels = torch.randint(0, 3, (2, 1, 32, 32, 32), generator=generator).float()
        data = torch.randn(2, 1, 32, 32, 32, generator=generator)
        target = [labels[..., ::f, ::f, ::f].contiguous() for f in (1, 2, 4, 8)]
        before = flat(ref.network)
        nnunet_trainer.nnUNetTrainer.train_step(ref, {"data": data, "target": target})
        clipped_norm = torch.cat([p.grad.flatten() for p in ref.network.parameters() if p.grad is not None]).norm()
        ours.optimizer.zero_grad(set_to_none=True)  # GraphedTrainStep's contract: gradients start as None
        nnUNetTrainerMobileViM._train_step_on_device(ours, data, *target)
        assert clipped_norm == pytest.approx(12.0, rel=1e-3), "the loss scale no longer makes clipping engage"
        update = flat(ref.network) - before
        torch.testing.assert_close(flat(ours.network) - before, update, rtol=1e-5, atol=1e-9)
        assert update.abs().max() > 0
    if scaler:
        assert ours.grad_scaler.get_scale() == ref.grad_scaler.get_scale()


class _Log:
    """nnU-Net's logger as far as on_train_epoch_end uses it."""

    def __init__(self):
        self.entries = []

    def log(self, key, value, epoch):
        self.entries.append((key, value, epoch))


def test_losses_kept_on_the_device_are_logged_as_nnunet_logs_host_losses():
    """The graphed step returns its loss as a device tensor (no host sync per step); the epoch's end reads
    them back at once. What nnU-Net collates and logs must not change: the same 0-d float32 arrays its own
    train_step returns, in the same order, and the same mean (hand-computed here)."""
    import numpy as np
    from nnunetv2.utilities.collate_outputs import collate_outputs

    from nnunetv2_mobilevim.nnunet.base_trainer import losses_on_host
    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    values = [0.75, -0.5, 1.25, 2.0]  # exact in float32; mean 0.875
    as_nnunet = [{"loss": np.array(v, dtype=np.float32)} for v in values]  # `l.detach().cpu().numpy()`
    on_device = [{"loss": torch.tensor(v)} for v in values]
    mixed = [on_device[0], as_nnunet[1], on_device[2], as_nnunet[3]]  # e.g. an eager step in between
    for outputs in (on_device, mixed):
        host = losses_on_host(outputs)
        assert all(isinstance(o["loss"], np.ndarray) and o["loss"].shape == () for o in host)
        ours, theirs = collate_outputs(host)["loss"], collate_outputs(as_nnunet)["loss"]
        assert ours.dtype == theirs.dtype == np.float32 and np.array_equal(ours, theirs)
        assert all(torch.is_tensor(o["loss"]) for o in on_device)  # the caller's list is not modified
    assert losses_on_host(as_nnunet) is as_nnunet

    trainer = nnUNetTrainerMobileViM.__new__(nnUNetTrainerMobileViM)  # only what on_train_epoch_end reads
    trainer.is_ddp, trainer.current_epoch, trainer.logger = False, 3, _Log()
    trainer.on_train_epoch_end(on_device)
    assert trainer.logger.entries == [("train_losses", 0.875, 3)]


def test_run_ahead_needs_a_step_and_does_nothing_off_cuda():
    from nnunetv2_mobilevim.acceleration.training import RunAhead

    with pytest.raises(ValueError, match="steps >= 1"):
        RunAhead(0)
    ahead = RunAhead(1)
    for _ in range(3):
        ahead.step_queued(torch.device("cpu"))
    assert len(ahead) == 0
