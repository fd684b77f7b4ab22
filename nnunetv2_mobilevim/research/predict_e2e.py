"""Prediction end to end as a user times it: stock ``nnUNetv2_predict`` against ``nnunetv2_mobilevim
predict``, on CT-sized synthetic volumes, fresh processes, mirroring on.

    python -m nnunetv2_mobilevim.research.predict_e2e --root DIR [--cases 10] [--shape 200 512 512]
        [--runs stock:nnUNetTrainer ours:nnUNetTrainer stock:nnUNetTrainerMobileViM ours:nnUNetTrainerMobileViM]
        [--device cuda]

The dataset (made once under ``--root``, reused by later calls): three training volumes of ``--shape``
(Z, Y, X) at 2.5 x 0.8 x 0.8 mm (varied slightly), planned with nnU-Net's default planner
(fingerprint and plan only, no preprocessing); the test folder: ``--cases`` volumes of ``--shape`` at
3.0 x 0.7 x 0.7 mm (so that both directions resample, separate-z) and one 256^3 volume at 1 mm.
Models are written untrained (a trainer's initialised weights saved as nnU-Net saves a checkpoint,
``research.predict_timing``): the time does not depend on the weights. For each run: the wall time of
the whole command on the test folder, and of the same command on an empty folder (process start,
imports, trainer search, model loading: the first-call cost), so that the warm time per case is
(whole - empty) / cases. Each finished run appends a row to ``$OUT/predict_e2e.json``; the outputs of
``ours`` and ``stock`` with the same model are compared (``research.prediction_agreement``).
``nnunetv2_mobilevim benchmark --predict-e2e`` runs all four with the defaults (``measure``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DATASET_ID, DATASET = 981, "Dataset981_CTSized"
RUNS = ("stock:nnUNetTrainer", "ours:nnUNetTrainer", "stock:nnUNetTrainerMobileViM", "ours:nnUNetTrainerMobileViM")
LABELS = {"background": 0, "liver": 1, "kidney": 2, "bone": 3}


def ct_volume(shape: Sequence[int], seed: int) -> np.ndarray:
    """A CT-like int16 volume (Z, Y, X): air, a body, organs and a spine, noise; zero outside a circular
    field of view (as scanners write it). Returns (image, label)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[tuple(slice(0, s) for s in shape)]
    z, y, x = z / shape[0] - 0.5, y / shape[1] - 0.5, x / shape[2] - 0.5
    label = np.zeros(shape, np.uint8)
    image = np.full(shape, -1000, np.int16)
    body = (y / 0.35) ** 2 + (x / 0.45) ** 2 < 1
    image[np.broadcast_to(body, shape)] = 30
    organs = [(1, (0.0, -0.05, -0.15), (0.35, 0.15, 0.15), 60), (2, (0.05, 0.1, 0.2), (0.15, 0.06, 0.06), 35),
              (3, (0.0, 0.2, 0.0), (0.5, 0.05, 0.05), 700)]
    for value, centre, radius, hu in organs:
        inside = sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radius)) < 1
        label[inside] = value
        image[inside] = hu
    image = image + rng.normal(0, 15, size=shape).astype(np.float32)
    image[np.broadcast_to(y ** 2 + x ** 2 > 0.25, shape)] = 0  # outside the field of view
    return np.round(image).astype(np.int16), label


def _write(array: np.ndarray, spacing_zyx: Sequence[float], path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(image, str(path), useCompression=True, compressionLevel=1)


def make_dataset(root: Path, shape: Sequence[int], cases: int, cube: int) -> Path:
    raw = root / "raw" / DATASET
    if (raw / "dataset.json").exists():
        return raw
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / folder).mkdir(parents=True, exist_ok=True)
    for i, spacing in enumerate([(2.5, 0.8, 0.8), (2.4, 0.78, 0.78), (2.6, 0.82, 0.82)]):
        image, label = ct_volume(shape, seed=i)
        _write(image, spacing, raw / "imagesTr" / f"train{i}_0000.nii.gz")
        _write(label, spacing, raw / "labelsTr" / f"train{i}.nii.gz")
    for i in range(cases):
        _write(ct_volume(shape, seed=100 + i)[0], (3.0, 0.7, 0.7), raw / "imagesTs" / f"ct{i:02d}_0000.nii.gz")
    if cube:
        _write(ct_volume((cube,) * 3, seed=99)[0], (1.0, 1.0, 1.0), raw / "imagesTs" / f"cube{cube}_0000.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                  "numTraining": 3, "file_ending": ".nii.gz"}))
    return raw


def _exe(name: str) -> str:
    """A console script of the environment: next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def plan(env: dict) -> None:
    """nnU-Net's fingerprint and plan (no preprocessing: prediction needs the plans only)."""
    for cmd in (["nnUNetv2_extract_fingerprint", "-d", str(DATASET_ID), "-np", "8"],
                ["nnUNetv2_plan_experiment", "-d", str(DATASET_ID)]):
        subprocess.run([_exe(cmd[0]), *cmd[1:]], env=env, check=True, capture_output=True)
    # the trainer infers its dataset class from the preprocessed files' ending when it initialises
    folder = Path(env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans_3d_fullres"
    folder.mkdir(exist_ok=True)
    (folder / "placeholder.b2nd").touch()


def _timed(cmd: Sequence[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(list(cmd), env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def measure(root: Path, out_json: Path, cases: int = 10, shape: Sequence[int] = (200, 512, 512), cube: int = 256,
            runs: Sequence[str] = RUNS, device: str = "cuda", command: str = "") -> dict:
    """The dataset under ``root`` (made once), then each of ``runs`` ("stock|ours:TRAINER"): a row appended
    to ``out_json`` (kept across calls) as it finishes. Returns the whole result."""
    from ..nnunet import run as nnunet_run
    from .predict_timing import write_untrained_model

    env = {**os.environ, **nnunet_run.folder_variables(root), "nnUNet_compile": "f"}
    os.environ.update(env)
    start = time.perf_counter()
    raw = make_dataset(root, shape, cases, cube)
    if not (Path(env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json").exists():
        plan(env)
    made = time.perf_counter() - start
    result = json.loads(out_json.read_text()) if out_json.exists() else {
        "date": time.strftime("%Y-%m-%d"), "command": command,
        "cases": sorted(p.name for p in (raw / "imagesTs").iterdir()),
        "note": "untrained weights (timing); mirroring on; nnU-Net's defaults otherwise", "rows": []}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    result["dataset_seconds"] = round(made, 1)
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    for run in runs:
        which, trainer = run.split(":")
        if which not in ("stock", "ours"):
            raise ValueError(f"a run is stock:TRAINER or ours:TRAINER, got {run!r}")
        model = Path(env["nnUNet_results"]) / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"
        if not (model / "plans.json").exists():
            nnunet_run.in_fresh_process(write_untrained_model, trainer, DATASET)
        exe = [_exe("nnUNetv2_predict")] if which == "stock" else [sys.executable, "-m", "nnunetv2_mobilevim.cli",
                                                                   "predict"]
        flags = ["-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", trainer, "-f", "0", "-device", device]
        out = root / "out" / which / trainer
        shutil.rmtree(out, ignore_errors=True)
        first = _timed([*exe, "-i", str(empty), "-o", str(root / "out" / "empty"), *flags], env)
        whole = _timed([*exe, "-i", str(raw / "imagesTs"), "-o", str(out), *flags], env)
        n = len(list((raw / "imagesTs").iterdir()))
        row = {"command": which, "model": trainer, "cases": n, "wall_s": round(whole, 2),
               "first_call_s": round(first, 2), "per_case_s": round((whole - first) / n, 2)}
        other = root / "out" / ("stock" if which == "ours" else "ours") / trainer
        if other.exists() and len(list(other.glob("*.nii.gz"))) == n:
            from .prediction_agreement import compare_folders

            stock, ours = (other, out) if which == "ours" else (out, other)
            row["dice_agreement_min"] = compare_folders(stock, ours)["dice_agreement_min"]
        result["rows"].append(row)
        out_json.write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.predict_e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--cube", type=int, default=256, help="edge of the extra cubic test volume (0: none)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    out_json = Path(os.environ.get("OUT", str(args.root))) / "predict_e2e.json"
    measure(args.root, out_json, args.cases, args.shape, args.cube, args.runs, args.device,
            "python -m nnunetv2_mobilevim.research.predict_e2e " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
