"""Running nnU-Net from our own commands (demo, benchmark, the research tools).

- nnU-Net's folder variables for one work folder;
- nnU-Net's command-line entry points, each in a fresh Python process: no PATH lookup of the console
  scripts (they need not be on PATH, e.g. with ``pip install --target``), and no race between
  nnU-Net's trainer lookup (it iterates ``sys.modules``) and the data-loader threads that a
  finished in-process training may leave behind.
- a trainer built the way ``nnUNetv2_train`` builds it, with a short schedule, for in-process runs;
- such a run in a fresh Python process of its own;
- the Dice score of a predicted mask.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from .registration import ENV_VAR, ext_trainer_dir


def folder_variables(root: Path, preprocessed: str = "pre", results: str = "res") -> Dict[str, str]:
    """nnU-Net's variables for a work folder ``root``: ``nnUNet_raw`` = root/raw,
    ``nnUNet_preprocessed`` = root/PREPROCESSED, ``nnUNet_results`` = root/RESULTS, and
    ``nnUNet_extTrainer`` = the folder of our trainers. nnU-Net reads them when ``nnunetv2`` is first
    imported: put them into ``os.environ`` before that (subprocesses inherit them)."""
    root = Path(root)
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / preprocessed),
            "nnUNet_results": str(root / results), ENV_VAR: str(ext_trainer_dir())}


def _entry_point(module: str, function: str, args: Sequence, env: Optional[Mapping[str, str]],
                 check: bool) -> subprocess.CompletedProcess:
    code = f"from {module} import {function} as entry; entry()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=None if env is None else dict(env),
                          capture_output=True, text=True, check=check)


def plan_and_preprocess(args: Sequence, env: Optional[Mapping[str, str]] = None,
                        check: bool = True) -> subprocess.CompletedProcess:
    """``nnUNetv2_plan_and_preprocess ARGS``."""
    return _entry_point("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "plan_and_preprocess_entry",
                        args, env, check)


def train(args: Sequence, env: Optional[Mapping[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess:
    """``nnUNetv2_train ARGS``."""
    return _entry_point("nnunetv2.run.run_training", "run_training_entry", args, env, check)


def predict(args: Sequence, env: Optional[Mapping[str, str]] = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """``nnUNetv2_predict ARGS``."""
    return _entry_point("nnunetv2.inference.predict_from_raw_data", "predict_entry_point", args, env, check)


def short_trainer(trainer_class: type, dataset: str, epochs: int, iterations: int, device, fold="all",
                  continue_training: bool = False):
    """``trainer_class`` for ``dataset``'s 3d_fullres plan (read from ``nnUNet_preprocessed``), as
    ``nnUNetv2_train`` (with ``--c`` if ``continue_training``) would build it, with ``epochs`` x
    ``iterations`` (validation: a fifth, >= 2)."""
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / dataset
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = continue_training  # nnU-Net 2.8.1's run_training sets this before building one
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer = trainer_class(plans, "3d_fullres", fold, dataset_json, device)
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = max(2, iterations // 5)
    return trainer


def in_fresh_process(fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` in a new (spawned) Python process, for trainings that are compared: a training that
    ran earlier in a process leaves threads and CPU load behind (its data-loader threads, compiled
    code), which slowed the next trainer by up to ~1.7x on the GPU machine (docs/results.md, "Epoch
    time"); and nnU-Net's trainer lookup iterates ``sys.modules``, which races with such threads.
    ``fn`` and ``args`` must pickle (a module-level function)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape: 2|pred & ref| / (|pred| + |ref|); NaN when both are
    empty, as nnU-Net's evaluation (``nnunetv2.evaluation``) reports it. Computed here on masks already
    in memory, where nnU-Net's ``compute_metrics`` reads files."""
    total = pred.sum() + ref.sum()
    return float(2 * np.logical_and(pred, ref).sum() / total) if total else float("nan")
