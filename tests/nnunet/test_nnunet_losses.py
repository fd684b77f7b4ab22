"""The losses the MobileViM trainers build, against nnU-Net's own (CPU, fp32, fixed data), and the
synthetic datasets with nnU-Net's label options (ignore label, regions).

A CUDA graph cannot hold a host sync, and ``torch.compile(..., fullgraph=True)`` refuses the same
data-dependent Python branches, so a fullgraph compile (eager backend, no GPU) stands in for capture.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_mobilevim.nnunet.losses import IgnoreLabelDC_and_CE_loss
from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM, nnUNetTrainerMobileViM_SGD
from nnunetv2_mobilevim.research.synthetic import write_dataset

IGNORE = 3  # two classes + background: nnU-Net's ignore label is the next value
POOLING = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]  # -> outputs at 1, 1/2, 1/4, 1/8


def dataset_json(tmp_path, **options) -> dict:
    """The dataset.json ``write_dataset`` writes (one tiny case)."""
    out = write_dataset(tmp_path / "ds", cases=1, test_cases=0, shape=(8, 8, 8), num_classes=2, **options)
    return json.loads((out / "dataset.json").read_text())


def loss_builder(tmp_path, cls=nnUNetTrainerMobileViM, deep_supervision=True, **options):
    """A trainer of ``cls`` holding just what ``_build_loss`` reads: the label manager from a real
    dataset.json and a configuration (batch dice, pooling) like a plan's."""
    trainer = cls.__new__(cls)  # no __init__: that needs a preprocessed dataset on disk
    dj = dataset_json(tmp_path, **options)
    trainer.label_manager = LabelManager(dj["labels"], dj.get("regions_class_order"))
    trainer.configuration_manager = SimpleNamespace(batch_dice=False, pool_op_kernel_sizes=POOLING)
    trainer.is_ddp, trainer.enable_deep_supervision, trainer.device = False, deep_supervision, torch.device("cpu")
    return trainer


def sparse_batch(all_ignored: bool = False):
    """Logits (2, 3, 16, 16, 16) and their 1/2, 1/4, 1/8 versions, and label maps (2, 1, ...) annotated on
    every fourth slice (the rest = IGNORE); sample 1 of the 1/8 target is ignored entirely."""
    g = torch.Generator().manual_seed(0)
    logits, targets = [], []
    for size in (16, 8, 4, 2):
        logits.append(torch.randn(2, 3, size, size, size, generator=g, requires_grad=True))
        labels = torch.randint(0, 3, (2, 1, size, size, size), generator=g).float()
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :, ::4] = True
        if size == 2:
            keep[1] = False
        targets.append(torch.where(keep & (not all_ignored), labels, torch.full_like(labels, IGNORE)))
    return logits, targets


def value_and_grads(loss, logits, targets):
    value = loss(logits, targets)
    return value, torch.autograd.grad(value, logits, allow_unused=True)  # None: an output with weight 0


def assert_same_grads(grads, ref_grads, rtol, atol):
    assert [g is None for g in grads] == [r is None for r in ref_grads]
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


def test_ignore_label_loss_is_capturable_and_equals_nnunets(tmp_path):
    """nnU-Net's per-output ignore-label loss cannot be traced whole (``num_fg > 0``); the one our trainer
    builds can, and with nnU-Net's deep-supervision wrapper and weights gives nnU-Net's value and gradients,
    also when every voxel is ignored."""
    trainer = loss_builder(tmp_path, ignore_label=True)
    assert trainer.label_manager.ignore_label == IGNORE
    theirs = nnUNetTrainer._build_loss(trainer)  # nnU-Net's method on our trainer: the loss before the fix
    ours = trainer._build_loss()
    assert type(theirs.loss) is DC_and_CE_loss
    assert type(ours.loss) is IgnoreLabelDC_and_CE_loss
    assert ours.weight_factors == theirs.weight_factors  # nnU-Net's deep-supervision weights, untouched
    assert (ours.loss.weight_ce, ours.loss.weight_dice, ours.loss.ignore_label) == (1, 1, IGNORE)

    # The per-output loss is what must trace whole. (The wrapper loops over host-side numpy weights, which
    # a CUDA graph never sees but Dynamo treats as tensors, so it cannot be compiled with fullgraph.)
    logits, targets = sparse_batch()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="num_fg > 0"):
        torch.compile(theirs.loss, backend="eager", fullgraph=True)(logits[0], targets[0])
    torch._dynamo.reset()
    compiled = DeepSupervisionWrapper(torch.compile(ours.loss, backend="eager", fullgraph=True), ours.weight_factors)

    ref, ref_grads = value_and_grads(theirs, logits, targets)
    for loss in (ours, compiled):
        value, grads = value_and_grads(loss, logits, targets)
        torch.testing.assert_close(value, ref, rtol=1e-6, atol=0)
        assert_same_grads(grads, ref_grads, rtol=1e-6, atol=0)

    # every voxel ignored (e.g. a patch outside the annotated slices): nnU-Net skips the CE, ours adds 0
    logits, targets = sparse_batch(all_ignored=True)
    ref, ref_grads = value_and_grads(theirs, logits, targets)
    for loss in (ours, compiled):
        value, grads = value_and_grads(loss, logits, targets)
        assert torch.isfinite(value) and value == ref
        assert_same_grads(grads, ref_grads, rtol=0, atol=0)


def test_ignore_label_ce_is_nnunets_mean_with_ignore_index_and_zero_when_all_ignored():
    """The CE alone: nnU-Net's CrossEntropyLoss mean over non-ignored voxels; 0 (where torch's mean
    is 0/0 = NaN) with zero gradients when nothing is labelled."""
    ce_only = IgnoreLabelDC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                        weight_ce=1, weight_dice=0, ignore_label=IGNORE,
                                        dice_class=MemoryEfficientSoftDiceLoss)
    nnunet_ce = RobustCrossEntropyLoss(ignore_index=IGNORE)
    (logits, *_), (target, *_) = sparse_batch()
    assert 0 < (target != IGNORE).sum() < target.numel()
    value, (grad,) = value_and_grads(ce_only, logits, target)
    ref, (ref_grad,) = value_and_grads(nnunet_ce, logits, target)
    torch.testing.assert_close(value, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=0)

    (logits, *_), (target, *_) = sparse_batch(all_ignored=True)
    assert torch.isnan(nnunet_ce(logits, target))
    value, (grad,) = value_and_grads(ce_only, logits, target)
    assert value.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("options,expected", [({}, DC_and_CE_loss),
                                              ({"regions": True}, DC_and_BCE_loss),
                                              ({"regions": True, "ignore_label": True}, DC_and_BCE_loss)])
def test_ignore_label_build_loss_keeps_nnunets_loss_elsewhere(tmp_path, options, expected):
    """Without an ignore label, and for regions (with or without one), the trainer keeps nnU-Net's
    loss object as nnU-Net builds it; the region loss traces whole (no host sync)."""
    trainer = loss_builder(tmp_path, cls=nnUNetTrainerMobileViM_SGD, **options)
    assert trainer.label_manager.has_regions == ("regions" in options)
    loss = trainer._build_loss()
    assert type(loss.loss) is expected
    assert loss.weight_factors == nnUNetTrainer._build_loss(trainer).weight_factors
    if expected is DC_and_BCE_loss:
        assert loss.loss.use_ignore_label == ("ignore_label" in options)
        g = torch.Generator().manual_seed(1)
        channels = 2 + ("ignore_label" in options)  # regions (+ nnU-Net's ignore channel)
        logits = [torch.randn(2, 2, s, s, s, generator=g) for s in (16, 8, 4, 2)]
        targets = [torch.rand(2, channels, s, s, s, generator=g) > 0.5 for s in (16, 8, 4, 2)]
        torch._dynamo.reset()
        compiled = torch.compile(loss.loss, backend="eager", fullgraph=True)
        for x, t in zip(logits, targets):
            torch.testing.assert_close(compiled(x, t), loss.loss(x, t), rtol=1e-6, atol=0)


def test_ignore_label_loss_without_deep_supervision(tmp_path):
    trainer = loss_builder(tmp_path, deep_supervision=False, ignore_label=True)
    loss = trainer._build_loss()
    assert type(loss) is IgnoreLabelDC_and_CE_loss
    (logits, *_), (target, *_) = sparse_batch()
    torch.testing.assert_close(loss(logits, target), nnUNetTrainer._build_loss(trainer)(logits, target),
                               rtol=1e-6, atol=0)


def test_ignore_label_and_regions_synthetic_datasets(tmp_path):
    """write_dataset's label options: the ignore label is the highest value and fills all but every third
    slice of the training labels (test labels fully annotated); regions nest (k..num_classes) and
    regions_class_order writes each region's label back; nnU-Net's LabelManager accepts both."""
    import SimpleITK as sitk

    def labels(out, split):
        return [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in sorted((out / f"labels{split}").iterdir())]

    plain = write_dataset(tmp_path / "plain", cases=2, test_cases=1, shape=(9, 8, 8), num_classes=2)
    sparse = write_dataset(tmp_path / "sparse", cases=2, test_cases=1, shape=(9, 8, 8), num_classes=2,
                           ignore_label=True)
    dj = json.loads((sparse / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "ellipsoid": 1, "small_sphere": 2, "ignore": IGNORE}
    assert LabelManager(dj["labels"], None).ignore_label == IGNORE
    for full, part in zip(labels(plain, "Tr"), labels(sparse, "Tr")):  # same seed: same cases
        np.testing.assert_array_equal(part[::3], full[::3])
        assert (part[1::3] == IGNORE).all() and (part[2::3] == IGNORE).all()
    for full, test in zip(labels(plain, "Ts"), labels(sparse, "Ts")):
        np.testing.assert_array_equal(test, full)

    regions = write_dataset(tmp_path / "regions", cases=1, test_cases=0, shape=(8, 8, 8), num_classes=3,
                            regions=True)
    dj = json.loads((regions / "dataset.json").read_text())
    assert list(dj["labels"].values()) == [0, [1, 2, 3], [2, 3], 3] and dj["regions_class_order"] == [1, 2, 3]
    manager = LabelManager(dj["labels"], dj["regions_class_order"])
    assert manager.has_regions and manager.foreground_regions == [(1, 2, 3), (2, 3), 3]
    assert json.loads((plain / "dataset.json").read_text())["labels"] == {"background": 0, "ellipsoid": 1,
                                                                         "small_sphere": 2}


class TinyDeepSupervisionNet(torch.nn.Module):
    """(B, 1, 16, 16, 16) -> logits (B, 3, s, s, s) for s = 16, 8, 4, 2 (the shapes of POOLING's outputs)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.downs = torch.nn.ModuleList(torch.nn.Conv3d(8, 8, 3, stride=2, padding=1) for _ in range(3))
        self.heads = torch.nn.ModuleList(torch.nn.Conv3d(8, 3, 1) for _ in range(4))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        outputs = [self.heads[0](h)]
        for down, head in zip(self.downs, self.heads[1:]):
            h = torch.relu(down(h))
            outputs.append(head(h))
        return outputs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ignore_label_whole_step_graph_captures_and_matches_nnunets_step(tmp_path, deterministic_cuda):
    """The trainer's whole training step (fp16 autocast, the loss it builds, GradScaler, clipping, fused
    AdamW) replayed from one CUDA graph with the ignore label: the same weights as nnU-Net's eager
    ``train_step`` with nnU-Net's loss, also after a batch where every voxel is ignored. With nnU-Net's
    loss in the graph the capture fails (``num_fg > 0`` syncs with the host) and leaves the process's CUDA
    generator unusable, so that failure is not provoked here."""
    import copy

    from nnunetv2_mobilevim.acceleration.training import GraphedTrainStep

    trainer = loss_builder(tmp_path, ignore_label=True)
    torch.manual_seed(0)
    net = TinyDeepSupervisionNet().cuda()

    def trainer_state(network, loss):
        return SimpleNamespace(device=torch.device("cuda"), network=network, compiled_network=None,
                               enable_deep_supervision=True,
                               optimizer=torch.optim.AdamW(network.parameters(), lr=1e-2, fused=True),
                               grad_scaler=torch.amp.GradScaler("cuda"), loss=loss)

    ref = trainer_state(net, nnUNetTrainer._build_loss(trainer))
    graphed = trainer_state(copy.deepcopy(net), trainer._build_loss())
    step = GraphedTrainStep(lambda *t: nnUNetTrainerMobileViM._train_step_on_device(graphed, *t), [graphed.optimizer])
    g = torch.Generator().manual_seed(0)
    for i in range(7):  # 3 eager warm-up steps, capture + replay, replays; step 5 has no labelled voxel
        _, targets = sparse_batch(all_ignored=(i == 5))
        batch = {"data": torch.randn(2, 1, 16, 16, 16, generator=g), "target": targets}
        losses = (float(nnUNetTrainer.train_step(ref, batch)["loss"]), step(batch["data"], *targets).item())
        assert np.isfinite(losses).all()
        assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=0), i
        for p, q in zip(ref.network.parameters(), graphed.network.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"step {i}")
    assert len(step) == 1  # captured once, replayed after
