"""Train nnU-Net's default trainer and the MobileViM trainers on the same plans and schedule, then
predict held-out cases and report per-class Dice, epoch time and peak GPU memory.

    python -m nnunetv2_mobilevim.research.compare --dataset demo   --epochs 10 --iterations 50 --out results/demo.json
    python -m nnunetv2_mobilevim.research.compare --dataset shapes --epochs 10 --iterations 50 --out results/shapes.json

``demo``: the embedded brain-extraction set (3 training volumes, held-out real person).
``TRAINER:da=0`` / ``:da=1`` trains with NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION set for that run (nnU-Net's
CPU pipeline or the device pipeline), e.g. ``--trainers nnUNetTrainerMobileViM nnUNetTrainerMobileViM:da=0``.
``shapes``: ``synthetic.py``'s multi-class set (ellipsoids, rare small spheres, thin tubes, shells).
Every trainer trains fold ``all`` with the same number of epochs and iterations, each in a fresh
Python process (``train_in_fresh_process``); prediction uses
nnU-Net's CLI: ``checkpoint_final.pth`` with mirroring (``dice``), ``checkpoint_best.pth`` with and
without it (``dice_best``, ``dice_best_no_tta``). torch.compile is off for all, except nnU-Net's own trainer with
``--baseline-compile`` (nnU-Net 2.8's default on a GPU; the MobileViM trainers replay CUDA graphs).

A training longer than one sitting (a device call of at most 10 minutes): ``--time-limit SECONDS`` saves
``checkpoint_latest.pth`` after every epoch, stops after the last epoch that fits, records the trainer as
``"incomplete"`` (no prediction) and exits with status 3; the same command with ``--continue`` and the
same ``--workdir`` then goes on from that checkpoint, as ``nnUNetv2_train --c`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..nnunet import run as nnunet_run
from ..nnunet.switches import DEVICE_AUGMENTATION as SWITCH

TRAINERS = ["nnUNetTrainer", "nnUNetTrainerMobileViM", "nnUNetTrainerMobileViM_xs"]
SHAPES_ID, SHAPES = 502, "Dataset502_Shapes"


def dice_per_class(pred_dir: Path, ref_dir: Path, labels: Dict[str, int]) -> Dict[str, float]:
    import nibabel as nib

    scores: Dict[str, List[float]] = {name: [] for name, v in labels.items() if v != 0}
    for ref_file in sorted(ref_dir.glob("*.nii.gz")):
        ref = np.asanyarray(nib.load(str(ref_file)).dataobj)
        pred = np.asanyarray(nib.load(str(pred_dir / ref_file.name)).dataobj)
        for name, value in labels.items():
            if value == 0:
                continue
            scores[name].append(nnunet_run.dice(pred == value, ref == value))
    return {name: float(np.nanmean(v)) for name, v in scores.items()}


def prepare_dataset(name: str, root: Path, processes: int = 8) -> Tuple[str, int, Path]:
    """Write ``name`` ("demo" or "shapes") as an nnU-Net raw dataset under ``root/raw`` and plan and
    preprocess it into ``nnUNet_preprocessed`` (skipped if already done); returns (dataset, id, raw folder)."""
    from ..demo_data import DATASET as DEMO
    from ..demo_data import DATASET_ID as DEMO_ID
    from ..demo_data import write_raw_dataset
    from .synthetic import write_dataset

    dataset, dataset_id = (DEMO, DEMO_ID) if name == "demo" else (SHAPES, SHAPES_ID)
    raw = root / "raw" / dataset
    if not (raw / "dataset.json").exists():
        if name == "demo":
            write_raw_dataset(root / "raw")
        else:
            write_dataset(raw, cases=20, test_cases=6, shape=(96, 96, 96), num_classes=4, seed=1)
    if not (Path(os.environ["nnUNet_preprocessed"]) / dataset / "nnUNetPlans.json").exists():
        nnunet_run.plan_and_preprocess(["-d", dataset_id, "-c", "3d_fullres", "-np", processes])
    return dataset, dataset_id, raw


class OutOfTime(Exception):
    """Raised at the end of an epoch when another epoch as long would end after the deadline."""


def stop_before(trainer, deadline: float) -> None:
    """Make ``trainer`` save ``checkpoint_latest.pth`` after every epoch and raise ``OutOfTime`` at the
    end of an epoch when another epoch of the same length would end after ``deadline``
    (``time.monotonic()``). The epoch's checkpoint is written before the check, so nothing trained is lost."""
    trainer.save_every = 1
    on_epoch_start, on_epoch_end = trainer.on_epoch_start, trainer.on_epoch_end
    started = [time.monotonic()]

    def start():
        started[0] = time.monotonic()
        on_epoch_start()

    def end():
        on_epoch_end()
        now = time.monotonic()
        if trainer.current_epoch < trainer.num_epochs and now + (now - started[0]) > deadline:
            raise OutOfTime(trainer.current_epoch)

    trainer.on_epoch_start, trainer.on_epoch_end = start, end


def _finish_loaders(trainer) -> None:
    """Stop the augmentation workers of a training that ended early (nnU-Net's ``on_train_end`` would
    also write ``checkpoint_final.pth``, which an unfinished training must not have)."""
    from ..acceleration.prefetch import DevicePrefetcher

    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        loader = loader.loader if isinstance(loader, DevicePrefetcher) else loader
        if hasattr(loader, "_finish"):
            loader._finish()


def train_one(trainer_class: type, dataset: str, epochs: int, iterations: int, compile_network: bool,
              seconds_left: Optional[float] = None, resume: bool = False, device: str = "cuda") -> Dict:
    """Train ``trainer_class`` on ``dataset`` for ``epochs`` x ``iterations`` and return its figures.

    ``seconds_left``: stop after the last epoch that fits (``stop_before``) and return
    ``{"trainer", "incomplete": True, "epochs_done"}``. ``resume``: continue from the output folder's
    ``checkpoint_latest.pth`` as ``nnUNetv2_train --c`` does; a training already finished there
    (``checkpoint_final.pth`` only) is not repeated: its figures come from that checkpoint's log
    (``peak_gpu_gb`` and ``train_seconds`` then None)."""
    import torch

    trainer_name = trainer_class.__name__
    deadline = None if seconds_left is None else time.monotonic() + seconds_left
    torch.backends.cudnn.benchmark = True  # as nnUNetv2_train sets it before training
    trainer = nnunet_run.short_trainer(trainer_class, dataset, epochs, iterations, torch.device(device),
                                       continue_training=resume)
    os.environ["nnUNet_compile"] = "t" if compile_network else "f"  # read when the run initialises
    folder = Path(trainer.output_folder)
    resumed_at, finished = None, False
    try:
        if resume and (folder / "checkpoint_latest.pth").exists():
            trainer.load_checkpoint(str(folder / "checkpoint_latest.pth"))
            resumed_at = trainer.current_epoch
        elif resume and (folder / "checkpoint_final.pth").exists():
            trainer.load_checkpoint(str(folder / "checkpoint_final.pth"))
            resumed_at, finished = trainer.current_epoch, True
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if not finished:
            if deadline is not None:
                stop_before(trainer, deadline)
            try:
                trainer.run_training()
            except OutOfTime:
                _finish_loaders(trainer)
                return {"trainer": trainer_name, "incomplete": True, "epochs_done": trainer.current_epoch,
                        "resumed_at_epoch": resumed_at}
    finally:
        os.environ["nnUNet_compile"] = "f"
    logger = getattr(trainer.logger, "local_logger", trainer.logger)  # 2.8: MetaLogger wraps the local logger
    log = logger.my_fantastic_logging
    epoch_times = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    return {"trainer": trainer_name, "train_seconds": None if finished else time.perf_counter() - start,
            "epoch_seconds_median": float(np.median(epoch_times[1:] or epoch_times)),
            "first_epoch_seconds": float(epoch_times[0]), "torch_compile": compile_network,
            "cuda_graph_training": getattr(trainer, "graphed_train_step", None) is not None,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" and not finished else None,
            "final_train_loss": float(log["train_losses"][-1]),
            "any_nan_loss": bool(any(not np.isfinite(x) for x in log["train_losses"])),
            "params": sum(p.numel() for p in trainer.network.parameters()), "resumed_at_epoch": resumed_at}


def train_in_fresh_process(trainer_name: str, dataset: str, epochs: int, iterations: int,
                           compile_network: bool, seconds_left: Optional[float] = None, resume: bool = False,
                           device: str = "cuda") -> Dict:
    """``train_one`` for the trainer called ``trainer_name``, in a new Python process
    (``nnunet_run.in_fresh_process``)."""
    return nnunet_run.in_fresh_process(_train_by_name, trainer_name, dataset, epochs, iterations, compile_network,
                                       seconds_left, resume, device)


def _train_by_name(trainer_name: str, dataset: str, epochs: int, iterations: int, compile_network: bool,
                   seconds_left: Optional[float], resume: bool, device: str) -> Dict:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return train_one(recursive_find_trainer_class_by_name(trainer_name), dataset, epochs, iterations,
                     compile_network, seconds_left, resume, device)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.compare",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["demo", "shapes"], required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--trainers", nargs="+", default=TRAINERS)
    parser.add_argument("--baseline-compile", action="store_true",
                        help="train nnUNetTrainer with torch.compile (nnU-Net 2.8's GPU default)")
    parser.add_argument("--final-only", action="store_true",
                        help="predict with checkpoint_final.pth only (the main figure), not also checkpoint_best.pth")
    parser.add_argument("--shared-gpu", action="store_true",
                        help="another training shares this GPU: recorded, as its epoch times are not comparable")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write, plan and preprocess the dataset under --workdir, then stop (before parts "
                        "that run side by side)")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="stop training after the last epoch that fits in SECONDS from this command's start "
                        "(checkpoint_latest.pth after every epoch), record the unfinished trainers and exit with "
                        "status 3; the same command with --continue goes on")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="continue each trainer from its checkpoint_latest.pth under --workdir (nnUNetv2_train "
                        "--c); one that finished there is predicted, not trained again")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.out is None and not args.prepare_only:
        parser.error("--out is required (unless --prepare-only)")

    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="mobilevim-compare-"))).resolve()
    os.environ.update(nnunet_run.folder_variables(root), nnUNet_compile="f")
    dataset, dataset_id, raw = prepare_dataset(args.dataset, root)
    if args.prepare_only:
        print(f"[compare] {dataset} prepared under {root}", flush=True)
        return
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    plans_file = Path(os.environ["nnUNet_preprocessed"]) / dataset / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())["configurations"]["3d_fullres"]
    result = {"dataset": args.dataset, "epochs": args.epochs, "iterations_per_epoch": args.iterations,
              "command": "python -m nnunetv2_mobilevim.research.compare " + " ".join(argv),
              "patch": plans["patch_size"], "batch": plans["batch_size"], "gpu_shared": args.shared_gpu, "rows": []}
    unfinished = []
    for spec in args.trainers:
        name, _, options = spec.partition(":")
        switch = {"da=0": "0", "da=1": "1"}.get(options)  # the device-augmentation switch for that run
        if options and switch is None:
            raise SystemExit(f"unknown option {options!r} in {spec!r}: use TRAINER, TRAINER:da=0 or TRAINER:da=1")
        seconds_left = None if deadline is None else deadline - time.monotonic()
        if seconds_left is not None and seconds_left <= 0:
            row = {"trainer": name, "incomplete": True, "epochs_done": None}  # not started
        else:
            print(f"[compare] {args.dataset}: training {spec} ({args.epochs} x {args.iterations})", flush=True)
            saved = os.environ.get(SWITCH)
            if switch is not None:
                os.environ[SWITCH] = switch  # the fresh process reads it once
            try:
                row = train_in_fresh_process(name, dataset, args.epochs, args.iterations,
                                             args.baseline_compile and name == "nnUNetTrainer", seconds_left,
                                             args.resume)
            finally:
                if saved is None:
                    os.environ.pop(SWITCH, None)
                else:
                    os.environ[SWITCH] = saved
        row["spec"], row["device_augmentation_switch"] = spec, switch
        if row.get("incomplete"):
            unfinished.append(spec)
            result["rows"].append(row)
            _write(args.out, result)
            done = "not started" if row["epochs_done"] is None else f"after epoch {row['epochs_done']} of {args.epochs}"
            print(f"[compare] {spec}: out of time, {done}", flush=True)
            continue
        # the main figure: checkpoint_final with mirroring; then checkpoint_best with and without it
        predictions = (("dice", "checkpoint_final.pth", []),
                       ("dice_best", "checkpoint_best.pth", []),
                       ("dice_best_no_tta", "checkpoint_best.pth", ["--disable_tta"]))
        for key, checkpoint, extra in predictions[:1] if args.final_only else predictions:
            out = root / f"pred_{spec.replace(':', '_')}_{key}"
            nnunet_run.predict(["-i", raw / "imagesTs", "-o", out, "-d", dataset_id, "-c", "3d_fullres", "-tr", name,
                                "-f", "all", "-chk", checkpoint, *extra])
            row[key] = dice_per_class(out, raw / "labelsTs", labels)
            row[f"{key}_mean"] = float(np.mean(list(row[key].values())))
        result["rows"].append(row)
        _write(args.out, result)
        best = "" if args.final_only else (f" (best checkpoint: {row['dice_best_mean']:.4f}, "
                                           f"without mirroring {row['dice_best_no_tta_mean']:.4f})")
        peak = "" if row["peak_gpu_gb"] is None else f", peak {row['peak_gpu_gb']:.2f} GB"
        print(f"[compare] {spec}: Dice {row['dice']} mean {row['dice_mean']:.4f}{best}, "
              f"epoch {row['epoch_seconds_median']:.2f} s{peak}", flush=True)
    if unfinished:
        print(f"[compare] not finished within --time-limit: {', '.join(unfinished)}; run the same command with "
              "--continue (and the same --workdir) to go on", flush=True)
        raise SystemExit(3)


def _write(path: Path, result: dict) -> None:
    """The results so far, after every trainer: a stopped run keeps what it has."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
