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


def run(cmd, env, timeout=900, check=True):
    """``cmd[0]`` from this Python's bin folder; with ``check`` an AssertionError carrying its output."""
    cmd = [str(BIN / cmd[0]), *map(str, cmd[1:])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res
