"""Wall time of a whole prediction command, stock ``nnUNetv2_predict`` against ``nnunetv2_mobilevim
predict``, each with nnU-Net's default model and with MobileViM_s, as a user times it (a fresh process,
imports and trainer search included).

    python -m nnunetv2_mobilevim.research.predict_timing demo|shapes [--device cpu|cuda] [--repeats N]

The models are written without training (initialised weights, a checkpoint saved as nnU-Net saves
one, mirroring axes as its trainer sets them): the time of a prediction does not depend on the
weights. Each command runs ``--repeats`` times in turn (stock and ours interleaved); the median is
reported. Writes ``$OUT/predict_timing_DATASET_DEVICE.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from ..nnunet import run as nnunet_run

TRAINERS = ("nnUNetTrainer", "nnUNetTrainerMobileViM")


def write_untrained_model(trainer_name: str, dataset: str) -> Path:
    """A model folder as ``nnUNetv2_train`` leaves it (plans, dataset.json, fold_0/checkpoint_final.pth)
    with the trainer's initialised weights."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer = nnunet_run.short_trainer(recursive_find_trainer_class_by_name(trainer_name), dataset, 1, 1,
                                       torch.device("cpu"), fold=0)
    trainer.initialize()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the mirroring axes
    Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / dataset
    base = Path(trainer.output_folder_base)
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy(preprocessed / name, base / name)
    shutil.copy(preprocessed / "nnUNetPlans.json", base / "plans.json")
    return base


def timed(cmd: Sequence[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(list(cmd), env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.predict_timing",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["demo", "shapes"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from .compare import prepare_dataset

    root = Path(tempfile.mkdtemp(prefix="predict-timing-"))
    env = {**os.environ, **nnunet_run.folder_variables(root), "nnUNet_compile": "f"}
    os.environ.update(env)
    dataset, dataset_id, raw = prepare_dataset(args.dataset, root, processes=os.cpu_count() or 1)
    for trainer in TRAINERS:
        nnunet_run.in_fresh_process(write_untrained_model, trainer, dataset)
    images = raw / "imagesTs"
    bin_dir = Path(sys.executable).parent
    commands = {}
    for trainer in TRAINERS:
        flags = ["-i", str(images), "-d", str(dataset_id), "-c", "3d_fullres", "-tr", trainer, "-f", "0",
                 "-device", args.device]
        commands[f"stock nnUNetv2_predict, {trainer}"] = [str(bin_dir / "nnUNetv2_predict"), "-o",
                                                          str(root / "out" / "stock" / trainer), *flags]
        commands[f"nnunetv2_mobilevim predict, {trainer}"] = [str(bin_dir / "nnunetv2_mobilevim"), "predict", "-o",
                                                              str(root / "out" / "ours" / trainer), *flags]
    seconds = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            seconds[name].append(timed(cmd, env))
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    base = statistics.median(seconds["stock nnUNetv2_predict, nnUNetTrainer"])
    rows = {name: {"seconds": s, "median_s": statistics.median(s), "vs_stock_nnunet": statistics.median(s) / base}
            for name, s in seconds.items()}
    result = {"dataset": args.dataset, "device": args.device, "cases": len(list(images.glob("*_0000.*"))),
              "host_cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "command": "python -m nnunetv2_mobilevim.research.predict_timing " + " ".join(argv or sys.argv[1:]),
              "note": "untrained weights (timing only); mirroring on; npp/nps at nnU-Net's defaults", "rows": rows}
    out = Path(os.environ.get("OUT", "/tmp")) / f"predict_timing_{args.dataset}_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for name, row in rows.items():
        print(f"{name:55s} {row['median_s']:6.1f} s  {row['vs_stock_nnunet']:.2f}x")


if __name__ == "__main__":
    main()
