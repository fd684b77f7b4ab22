"""The trainers' training and validation steps are nnU-Net's: on the CPU (fp32, deterministic), the step
function that the CUDA graph captures on a GPU (``_train_step_on_device``) against nnU-Net 2.8's own
``train_step``, and the validation step whose results stay on the device until the epoch ends against
nnU-Net's ``validation_step`` and what its epoch end logs. The replay of the training step is compared
with its eager run on the GPU (tests/acceleration/test_gpu_graphs.py)."""

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
        device=torch.device("cpu"), network=network, compiled_network=None, enable_deep_supervision=True,
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

    from nnunetv2_mobilevim.nnunet.base_trainer import outputs_on_host
    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    values = [0.75, -0.5, 1.25, 2.0]  # exact in float32; mean 0.875
    as_nnunet = [{"loss": np.array(v, dtype=np.float32)} for v in values]  # `l.detach().cpu().numpy()`
    on_device = [{"loss": torch.tensor(v)} for v in values]
    mixed = [on_device[0], as_nnunet[1], on_device[2], as_nnunet[3]]  # e.g. an eager step in between
    for outputs in (on_device, mixed):
        host = outputs_on_host(outputs)
        assert all(isinstance(o["loss"], np.ndarray) and o["loss"].shape == () for o in host)
        ours, theirs = collate_outputs(host)["loss"], collate_outputs(as_nnunet)["loss"]
        assert ours.dtype == theirs.dtype == np.float32 and np.array_equal(ours, theirs)
        assert all(torch.is_tensor(o["loss"]) for o in on_device)  # the caller's list is not modified
    assert outputs_on_host(as_nnunet) is as_nnunet

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


class _TinyDeepSupervision(torch.nn.Module):
    """A 3D conv with two deep-supervision outputs (full resolution, then half)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, channels, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return [y, torch.nn.functional.avg_pool3d(y, 2)]


def validation_state(labels: dict, regions_class_order, ignore: bool, epoch: int) -> SimpleNamespace:
    """What nnU-Net's validation_step and on_validation_epoch_end read from a trainer."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    label_manager = LabelManager(labels, regions_class_order)
    assert label_manager.has_ignore_label == ignore
    torch.manual_seed(0)
    network = _TinyDeepSupervision(label_manager.num_segmentation_heads).eval()
    weights = (1.0, 0.5)

    def loss(outputs, targets):  # any deterministic function of both: the steps must only call it alike
        return sum(w * o.float().square().mean() * (1 + t.float().mean()) for w, o, t in zip(weights, outputs, targets))

    return SimpleNamespace(
        device=torch.device("cpu"), network=network, enable_deep_supervision=True, label_manager=label_manager,
        loss=loss, is_ddp=False, current_epoch=epoch, logger=_Log())


def validation_batches(state, count: int) -> list:
    """``count`` batches as nnU-Net's validation loader gives them: (2, 1, 16^3) data, a target per
    deep-supervision output (label maps, or region maps with the ignore mask last)."""
    generator = torch.Generator().manual_seed(2)
    lm, batches = state.label_manager, []
    for _ in range(count):
        values = sorted({v for v in lm.all_labels} | ({lm.ignore_label} if lm.has_ignore_label else set()))
        labels = torch.tensor(values)[torch.randint(0, len(values), (2, 1, 16, 16, 16), generator=generator)]
        if lm.has_regions:
            maps = [torch.isin(labels, torch.tensor(r if isinstance(r, (list, tuple)) else [r]))
                    for r in lm.foreground_regions]
            if lm.has_ignore_label:
                maps.append(labels == lm.ignore_label)
            labels = torch.cat(maps, dim=1).to(torch.int16)  # nnU-Net's region conversion gives integer maps
        target = [labels.float() if not lm.has_regions else labels, labels[..., ::2, ::2, ::2]]
        batches.append({"data": torch.randn(2, 1, 16, 16, 16, generator=generator), "target": target})
    return batches


@pytest.mark.parametrize("labels,regions,ignore", [
    ({"background": 0, "a": 1, "b": 2}, None, False),
    ({"background": 0, "a": 1, "b": 2, "ignore": 3}, None, True),
    ({"background": 0, "ab": [1, 2], "b": 2}, [1, 2], False),
    ({"background": 0, "ab": [1, 2], "b": 2, "ignore": 3}, [1, 2], True),
], ids=["labels", "labels-ignore", "regions", "regions-ignore"])
def test_validation_on_device_gives_nnunets_outputs_and_logged_values(labels, regions, ignore):
    """Four validation steps of nnU-Net and of ours on copies of the same batches: every step's loss and
    Dice counts (read back as the epoch ends) are nnU-Net's arrays exactly (dtype, shape, values), and
    the epoch end logs the same pseudo Dice per class, its mean and the validation loss. The four
    label layouts cover the background's removal (softmax only), the ignore mask and region maps."""
    import numpy as np

    from nnunetv2_mobilevim.nnunet.base_trainer import outputs_on_host
    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    ref = validation_state(labels, regions, ignore, 5)
    ours = nnUNetTrainerMobileViM.__new__(nnUNetTrainerMobileViM)  # only what the two hooks read
    ours.__dict__.update(vars(validation_state(labels, regions, ignore, 5)))
    batches = validation_batches(ref, 4)
    expected = [nnunet_trainer.nnUNetTrainer.validation_step(ref, copy.deepcopy(b)) for b in batches]
    on_device = [ours.validation_step(copy.deepcopy(b)) for b in batches]
    assert all(torch.is_tensor(v) for out in on_device for v in out.values())
    for got, want in zip(outputs_on_host(on_device), expected):
        assert got.keys() == want.keys()
        for key in want:
            assert isinstance(got[key], np.ndarray) and got[key].dtype == want[key].dtype, key
            assert got[key].shape == want[key].shape and np.array_equal(got[key], want[key]), key
    assert sum(float(out["tp_hard"].sum()) for out in expected) > 0  # the counts are not all zero
    nnunet_trainer.nnUNetTrainer.on_validation_epoch_end(ref, expected)
    ours.on_validation_epoch_end(on_device)
    assert len(ours.logger.entries) == 3
    for (k1, v1, e1), (k2, v2, e2) in zip(ours.logger.entries, ref.logger.entries):
        assert (k1, e1) == (k2, e2) and np.array_equal(np.asarray(v1), np.asarray(v2), equal_nan=True), k1
