"""research.compare's --time-limit / --continue on the CPU with a real nnU-Net trainer (MobileViM_xs) on the
tiny dataset: a training stopped at an epoch's end keeps checkpoint_latest.pth and no checkpoint_final.pth;
continuing finishes the schedule from there; continuing a finished training trains nothing."""

from __future__ import annotations

import shutil

import torch
from nnunet_commands import DATASET

from nnunetv2_mobilevim.nnunet import run as nnunet_run
from nnunetv2_mobilevim.research.compare import train_in_fresh_process

TRAINER = "nnUNetTrainerMobileViM_xs"


def test_a_stopped_training_continues_from_its_last_epoch(workspace, tmp_path, monkeypatch):
    root = tmp_path / "w"
    shutil.copytree(workspace / "raw", root / "raw")
    shutil.copytree(workspace / "preprocessed", root / "pre")
    for key, value in nnunet_run.folder_variables(root).items():
        monkeypatch.setenv(key, value)  # read by nnU-Net in the spawned training process
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    folder = root / "res" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_all"

    stopped = train_in_fresh_process(TRAINER, DATASET, 3, 2, False, seconds_left=0.0, device="cpu")
    assert stopped == {"trainer": TRAINER, "incomplete": True, "epochs_done": 1, "resumed_at_epoch": None}
    assert (folder / "checkpoint_latest.pth").exists() and not (folder / "checkpoint_final.pth").exists()
    latest = torch.load(folder / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1

    row = train_in_fresh_process(TRAINER, DATASET, 3, 2, False, seconds_left=None, resume=True, device="cpu")
    assert row["resumed_at_epoch"] == 1 and row.get("incomplete") is None
    assert (folder / "checkpoint_final.pth").exists() and not (folder / "checkpoint_latest.pth").exists()
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3  # nnU-Net stores the epoch to start from
    log = final["logging"]
    assert len(log["train_losses"]) == 3 and len(log["epoch_end_timestamps"]) == 3
    # epoch 0 is the first process's (a restart from scratch would have logged a new one)
    assert log["epoch_start_timestamps"][0] == latest["logging"]["epoch_start_timestamps"][0]
    assert log["train_losses"][0] == latest["logging"]["train_losses"][0]
    assert row["final_train_loss"] == log["train_losses"][-1] and row["train_seconds"] > 0

    again = train_in_fresh_process(TRAINER, DATASET, 3, 2, False, seconds_left=None, resume=True, device="cpu")
    assert again["resumed_at_epoch"] == 3 and again["train_seconds"] is None and again["peak_gpu_gb"] is None
    assert (again["epoch_seconds_median"], again["final_train_loss"]) == (row["epoch_seconds_median"],
                                                                         row["final_train_loss"])
    assert torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["current_epoch"] == 3
