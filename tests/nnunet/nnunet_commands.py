"""Running nnU-Net's real command-line entry points from the CLI tests, with their folders in one root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nnunetv2_mobilevim.nnunet.registration import ext_trainer_dir

BIN = Path(sys.executable).parent
DATASET_ID, DATASET = 501, "Dataset501_Tiny"  # the tiny dataset of the `workspace` fixture (conftest.py)


def nnunet_env(root: Path, ext_trainer: bool = True, **extra) -> dict:
    """The environment for nnU-Net commands on the CPU with nnU-Net's folders under ``root`` (a value of
    None in ``extra`` removes that variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_def_n_proc="1", nnUNet_compile="f",
               nnUNet_n_proc_DA="0", OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    if ext_trainer:
        env["nnUNet_extTrainer"] = str(ext_trainer_dir())
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


# Two predictions of one model from float16 logits (nnU-Net's sliding window accumulates them in float16,
# and both commands run it) agree to within a float16 step or two of each logit: the implied logit
# difference (research.prediction_agreement) is bounded, whatever the probabilities, and its mean is tiny
# because only the few logits near a rounding boundary move. 2^-4 is two steps of a logit below 64 in
# magnitude (these briefly trained models' logits are far smaller); a real defect (a voxel set to background,
# a shifted or linear resampling) moves saturated probabilities and gives values of order 1 or inf.
LOGIT_TOLERANCE = 2.0 ** -4
MEAN_LOGIT_TOLERANCE = 2.0 ** -8


def assert_predictions_agree(summary: dict, dice_min: float = 0.999, probabilities: bool = True,
                             same_files: bool = True) -> None:
    """The parity criteria on a ``compare_folders(reference, candidate)`` summary: the same files (with
    ``same_files=False`` only the reference's cases need to be in the candidate), every case compared with
    the same geometry, pixel type and stored properties, Dice >= dice_min for every label, and with
    ``probabilities`` every case's .npz within the logit tolerances above."""
    files = summary["files"]
    if same_files:
        assert summary["same_files"], (summary["missing_in_candidate"], summary["extra_in_candidate"])
    assert summary["compared"] == summary["cases"] > 0
    assert summary["geometry_equal"] and summary["dtype_equal"] and summary["properties_equal"], files
    assert summary["dice_agreement_min"] >= dice_min, {c: f["dice"] for c, f in files.items()}
    if probabilities:
        assert summary["probability_pairs"] == summary["compared"], files
        assert summary["max_implied_logit_difference"] <= LOGIT_TOLERANCE, files
        assert summary["mean_implied_logit_difference_max"] <= MEAN_LOGIT_TOLERANCE, files


def run(cmd, env, timeout=900, check=True):
    """``cmd[0]`` from this Python's bin folder; with ``check`` an AssertionError carrying its output."""
    cmd = [str(BIN / cmd[0]), *map(str, cmd[1:])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res
