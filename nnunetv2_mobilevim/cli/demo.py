"""``nnunetv2_mobilevim demo``: the whole nnU-Net workflow with MobileViM on real anatomy, in minutes.

1. writes the embedded brain-extraction dataset (demo_data/, 3 training volumes, 1 held-out person)
   as an nnU-Net raw dataset,
2. runs nnU-Net's ``nnUNetv2_plan_and_preprocess``,
3. trains ``nnUNetTrainerMobileViM`` (MobileViM_s) briefly on fold ``all`` (GPU if there is one),
4. predicts the held-out person with nnU-Net's predictor (sliding window, mirroring),
5. prints the Dice and writes a PNG with the prediction over three orthogonal slices.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..demo_data import DATA, DATASET, DATASET_ID, write_raw_dataset
from ..nnunet import run as nnunet_run


def _step(msg: str, t0: float) -> None:
    print(f"[demo {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)


def save_overlay(image: np.ndarray, pred: np.ndarray, ref: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = [s // 2 for s in image.shape]
    views = [(np.s_[centre[0], :, :], "axis 0"), (np.s_[:, centre[1], :], "axis 1"), (np.s_[:, :, centre[2]], "axis 2")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (sl, name) in zip(axes, views):
        ax.imshow(image[sl].T, cmap="gray", origin="lower", interpolation="nearest")
        ax.imshow(np.ma.masked_where(pred[sl].T == 0, pred[sl].T), cmap="autumn", alpha=0.35, origin="lower",
                  interpolation="nearest")
        ax.contour(ref[sl].T, levels=[0.5], colors="cyan", linewidths=1.2)
        ax.set_title(f"mid-slice, {name}", fontsize=10)
        ax.axis("off")
    fig.suptitle(title + "\norange: MobileViM prediction, cyan outline: reference mask", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run_demo(workdir: Optional[str] = None, epochs: Optional[int] = None, iterations: Optional[int] = None,
             device: str = "auto", trainer: str = "nnUNetTrainerMobileViM") -> int:
    import torch

    t0 = time.perf_counter()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        print("nnunetv2_mobilevim demo: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    epochs = epochs or (20 if use_cuda else 4)
    iterations = iterations or (50 if use_cuda else 25)
    root = Path(workdir or tempfile.mkdtemp(prefix="mobilevim-demo-")).resolve()
    # nnU-Net reads these when it is first imported: set them before any nnunetv2 import.
    os.environ.update(nnunet_run.folder_variables(root, preprocessed="preprocessed", results="results"))
    os.environ.setdefault("nnUNet_compile", "f")
    if not use_cuda:
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
    _step(f"work folder {root}; device {'cuda: ' + torch.cuda.get_device_name(0) if use_cuda else 'cpu'}; "
          f"{trainer}, {epochs} epochs x {iterations} iterations", t0)

    raw = write_raw_dataset(root / "raw")
    _step(f"dataset: {len(list((raw / 'imagesTr').iterdir()))} training volumes, held-out person 'itkperson' "
          f"(provenance: {DATA / 'PROVENANCE.md'})", t0)
    plan = nnunet_run.plan_and_preprocess(["-d", DATASET_ID, "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
                                          env={**os.environ, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"},
                                          check=False)
    if plan.returncode != 0:
        print(plan.stdout[-2000:], plan.stderr[-2000:], file=sys.stderr)
        return 1
    cfg = json.loads((root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    _step(f"nnUNetv2_plan_and_preprocess done: patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
          f"spacing {cfg['spacing']}", t0)

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    net_trainer = nnunet_run.short_trainer(recursive_find_trainer_class_by_name(trainer), DATASET, epochs, iterations,
                                           torch.device("cuda" if use_cuda else "cpu"))
    _step("training (nnU-Net prints one block per epoch)", t0)
    net_trainer.run_training()
    model_dir = Path(net_trainer.output_folder).parent
    _step(f"training done: {model_dir}", t0)

    pred_dir = root / "prediction"  # nnUNetv2_predict, in a fresh process (see nnunet/run.py)
    predict = nnunet_run.predict(["-i", raw / "imagesTs", "-o", pred_dir, "-d", DATASET_ID, "-c", "3d_fullres",
                                  "-tr", trainer, "-f", "all", "-chk", "checkpoint_final.pth",
                                  "-device", "cuda" if use_cuda else "cpu", "-npp", "1", "-nps", "1"], check=False)
    if predict.returncode != 0:
        print(predict.stdout[-2000:], predict.stderr[-3000:], file=sys.stderr)
        return 1
    import nibabel as nib

    image = np.asanyarray(nib.load(str(raw / "imagesTs" / "itkperson_0000.nii.gz")).dataobj)
    ref = np.asanyarray(nib.load(str(raw / "labelsTs" / "itkperson.nii.gz")).dataobj) > 0
    pred = np.asanyarray(nib.load(str(pred_dir / "itkperson.nii.gz")).dataobj) > 0
    score = nnunet_run.dice(pred, ref)
    png = root / "demo_prediction.png"
    save_overlay(image, pred, ref, png, f"held-out person 'itkperson': Dice {score:.3f} "
                                        f"({trainer}, {epochs}x{iterations} iterations)")
    _step(f"prediction of the held-out person: {pred_dir / 'itkperson.nii.gz'}", t0)
    print(f"\nDice (brain) on the held-out real person 'itkperson': {score:.3f}")
    print(f"picture: {png}")
    (root / "demo_result.json").write_text(json.dumps({
        "dice_brain_itkperson": score, "trainer": trainer, "epochs": epochs, "iterations_per_epoch": iterations,
        "device": torch.cuda.get_device_name(0) if use_cuda else "cpu", "seconds": time.perf_counter() - t0,
        "png": str(png)}, indent=2))
    return 0
