"""nnU-Net's label options with the MobileViM trainers, on the CPU: a sparsely annotated dataset (ignore
label) and a region-based one (BraTS-style nested regions), each planned once.

Through the real command line: nnUNetTrainerMobileViM_smoke trains fold 0 (with nnU-Net's validation)
and nnUNetv2_predict segments the test cases. In-process: each of the four real trainers (same code,
other network size or optimiser; a command-line run each would be too slow here) takes one training
step on a batch from nnU-Net's own dataloader.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from nnunet_commands import nnunet_env, run

from nnunetv2_mobilevim.research.synthetic import write_dataset

pytestmark = pytest.mark.slow

SHAPE, CASES, TEST_CASES = (24, 28, 24), 5, 2
# name -> (id, dataset folder, write_dataset options, label values a prediction may hold)
DATASETS = {
    "ignore_label": (511, "Dataset511_SparseLabels", {"num_classes": 2, "ignore_label": True}, {0, 1, 2}),
    "regions": (512, "Dataset512_Regions", {"num_classes": 3, "regions": True, "seed": 1}, {0, 1, 2, 3}),
}
IGNORE = 3  # Dataset511: background + 2 classes, so the ignore label is 3
TRAINER = "nnUNetTrainerMobileViM_smoke"
TRAINERS = ["nnUNetTrainerMobileViM", "nnUNetTrainerMobileViM_xs", "nnUNetTrainerMobileViM_SGD",
            "nnUNetTrainerMobileViM_xs_SGD"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_labels")
    for _, folder, options, _ in DATASETS.values():
        write_dataset(root / "raw" / folder, cases=CASES, test_cases=TEST_CASES, shape=SHAPE, **options)
    # planning with nnUNet_n_proc_DA=0 breaks 2.8.1's planner (torch.set_num_threads(0)), so use 1 here
    run(["nnUNetv2_plan_and_preprocess", "-d", *(i for i, *_ in DATASETS.values()), "-c", "3d_fullres",
         "-np", "1", "-npfp", "1", "--verify_dataset_integrity"], nnunet_env(root, nnUNet_n_proc_DA="1"))
    return root


def read_image(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("name", list(DATASETS))
def test_ignore_label_and_regions_train_and_predict_through_the_cli(workspace, name):
    """Fold 0 trains to the end (finite losses, nnU-Net's validation written); the predictions have the
    test images' shape and only real label values (never the ignore label; regions written back as
    labels through regions_class_order), and follow the saved probabilities as nnU-Net defines them."""
    dataset_id, folder, _, allowed = DATASETS[name]
    env = nnunet_env(workspace)
    run(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env)
    fold = workspace / "results" / folder / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    log = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    losses = [float(v) for v in re.findall(r"train_loss (\S+)", log)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), log[-2000:]
    assert "Dice" in json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]

    images, out = workspace / "raw" / folder / "imagesTs", workspace / "pred" / name
    # -npp 0 -nps 0: nnU-Net's sequential path (no worker processes to start)
    run(["nnUNetv2_predict", "-i", images, "-o", out, "-d", dataset_id, "-c", "3d_fullres", "-tr", TRAINER,
         "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta",
         "--save_probabilities"], env)
    dataset_json = json.loads((workspace / "raw" / folder / "dataset.json").read_text())
    predictions = sorted(out.glob("*.nii.gz"))
    assert len(predictions) == TEST_CASES
    for path in predictions:
        seg = read_image(path)
        assert seg.shape == read_image(images / path.name.replace(".nii.gz", "_0000.nii.gz")).shape
        assert set(np.unique(seg).tolist()) <= allowed
        probabilities = np.load(path.with_name(path.name.replace(".nii.gz", ".npz")))["probabilities"]
        assert probabilities.shape == (3, *seg.shape)  # 3 regions / background + 2 classes: no ignore channel
        if name == "regions":  # sigmoid per region, later regions in regions_class_order drawn over earlier
            expected = np.zeros(seg.shape, dtype=seg.dtype)
            for channel, label in enumerate(dataset_json["regions_class_order"]):
                expected[probabilities[channel] > 0.5] = label
        else:
            expected = probabilities.argmax(0).astype(seg.dtype)
        np.testing.assert_array_equal(seg, expected)


@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("trainer_name", TRAINERS)
def test_ignore_label_and_regions_train_step_every_trainer(workspace, monkeypatch, trainer_name, name):
    """Each trainer, initialised by nnU-Net's initialize() on the plan nnU-Net made, builds the loss
    the dataset needs (ours for the ignore label, nnU-Net's for regions; nnU-Net's deep-supervision
    weights) and takes a finite training step that moves the weights, on a batch from nnU-Net's
    dataloader (with ignored voxels / region targets). on_train_start is left out: it only adds logging,
    file copies and unpacking that the dataloader does not need."""
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_mobilevim.nnunet.losses import IgnoreLabelDC_and_CE_loss

    for var, value in nnunet_env(workspace).items():
        if var.startswith("nnUNet_"):
            monkeypatch.setenv(var, value)
    _, folder, _, _ = DATASETS[name]
    plans = json.loads((workspace / "preprocessed" / folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((workspace / "preprocessed" / folder / "dataset.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training sets this before building a trainer
    trainer = recursive_find_trainer_class_by_name(trainer_name)(plans, "3d_fullres", 0, dataset_json,
                                                                torch.device("cpu"))
    trainer.initialize()
    if name == "ignore_label":
        assert type(trainer.loss.loss) is IgnoreLabelDC_and_CE_loss and trainer.loss.loss.ignore_label == IGNORE
    else:
        assert type(trainer.loss.loss) is DC_and_BCE_loss and not trainer.loss.loss.use_ignore_label
    assert trainer.loss.weight_factors == nnUNetTrainer._build_loss(trainer).weight_factors

    dataloader_train, _ = trainer.get_dataloaders()
    batch = next(dataloader_train)
    target = batch["target"][0]
    if name == "ignore_label":
        assert (target == IGNORE).any() and (target != IGNORE).any()
    else:
        assert target.dtype == torch.bool and target.shape[1] == 3  # one channel per region

    trainer.network.train()
    before = [p.detach().clone() for p in trainer.network.parameters()]
    loss = trainer.train_step(batch)["loss"]
    assert np.isfinite(loss)
    trained = [p for p in trainer.network.parameters() if p.grad is not None and p.grad.any()]
    assert len(trained) > len(before) // 2
    moved = {id(p) for p, b in zip(trainer.network.parameters(), before) if not torch.equal(p, b)}
    assert all(id(p) in moved for p in trained)
