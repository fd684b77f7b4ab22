"""``nnunetv2_mobilevim predict`` against ``nnUNetv2_predict`` (issue 15): with the same model, folds and
flags both commands write the same files, with the same image geometry, pixel type and properties,
labels with Dice >= 0.999 per class and probabilities within a float16 step or two of each logit; and
``nnUNetv2_ensemble`` gives the same on our probability folders as on nnU-Net's. On the CPU, through
the real command lines, for nnU-Net's own trainer and a MobileViM trainer, each trained briefly by
``nnUNetv2_train`` (a short subclass in an extra trainer folder, as a user would shorten one).

Data: CT-like anisotropic cases (``research.synthetic.write_ct_dataset``: pixels 0.7-0.9 mm, slices
2.2-3.2 mm, every case its own spacing, four foreground classes, CT normalisation, a zero border that
nnU-Net's crop to the non-zero region removes); ``test_ct_dataset_exercises_the_hard_paths`` checks in
the plan that prediction really resamples each case to and from the target spacing with the coarse axis
separately, crops, and slides over more than one tile. The demo's held-out person (real MRI) is
compared as well, under ``exhaustive`` (its patch makes MobileViM training minutes long on a CPU).

The probability tolerances: nnU-Net accumulates the sliding window's logits in float16 and its export
resamples them in float16 (``resample_data_or_seg`` keeps the input's dtype), so a logit computed with
other, equally exact rounding (float32 products where nnU-Net uses float64, BatchNorm folded into the
convolution) can round to the neighbouring float16 value, and more than once along the accumulation.
How far that moves a probability depends on the logit's magnitude (one float16 step is 2^-10 of it) and
on the probability (little near 0 or 1): a bound on the probabilities' difference is loose where they
saturate and flaky where they do not (one such bound, 2^-8, held on this machine and failed on CI's,
whose briefly trained model had larger logits). So the probabilities are compared as the logit change
that explains them (``research.prediction_agreement.implied_logit_difference``), within two float16 steps
of a logit below 64 and, on average over a case, 2^-8 (``nnunet_commands.LOGIT_TOLERANCE``). Real defects
move saturated probabilities, by orders of magnitude more: even a linear instead of a cubic spline in
the resampling, or the coarse axis resampled with another coordinate convention
(tests/planted/resampling_*.patch), fail here. ``pytest -s`` prints the measured numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from nnunet_commands import BIN, assert_predictions_agree, nnunet_env, run

from nnunetv2_mobilevim.nnunet.registration import ext_trainer_dir
from nnunetv2_mobilevim.research.prediction_agreement import compare_folders
from nnunetv2_mobilevim.research.synthetic import write_ct_dataset

pytestmark = pytest.mark.slow

CT_ID, CT = 521, "Dataset521_CTParity"
NNUNET, MOBILEVIM = "nnUNetTrainer_parity", "nnUNetTrainerMobileViM_parity"
DICE_MIN = 0.999
FLAGS = {  # the same for both commands; -npp 0 -nps 0 spares nnU-Net's command its worker processes' start
    "tta": ["--save_probabilities", "-npp", "0", "-nps", "0"],
    "notta": ["--save_probabilities", "--disable_tta", "-step_size", "0.75", "-npp", "0", "-nps", "0"],
}
# the test cases (z, y, x): cropped and resampled to the target spacing, the first needs 2 x 2 tiles in plane,
# the second one; each changes its size on every axis, both ways (test_ct_dataset_exercises_the_hard_paths)
CT_TEST_SHAPES, CT_TEST_SPACINGS = [(20, 48, 48), (16, 40, 40)], [(2.95, 0.9, 0.9), (2.3, 0.72, 0.72)]
SHORT_TRAINERS = f'''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM


class {NNUNET}(nnUNetTrainer):
    """nnU-Net's trainer, 1 epoch of 5 iterations, no final validation."""
    def __init__(self, plans, configuration, fold, dataset_json, device):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 5, 1

    def perform_actual_validation(self, save_probabilities=False):
        pass


class {MOBILEVIM}(nnUNetTrainerMobileViM):
    """MobileViM_s, 1 epoch of 2 iterations, no final validation."""
    def __init__(self, plans, configuration, fold, dataset_json, device):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1

    def perform_actual_validation(self, save_probabilities=False):
        pass
'''


def _env(root: Path, ext: Path) -> dict:
    """nnU-Net's variables for ``root`` with the short trainers' folder; this command's defaults (no
    pipeline switch inherited from the caller)."""
    return nnunet_env(root, nnUNet_extTrainer=os.pathsep.join([str(ext_trainer_dir()), str(ext)]),
                      NNUNETV2_MOBILEVIM_DEVICE_PIPELINE=None)


def _plan(root: Path, dataset_id: int, env: dict) -> None:
    # planning with nnUNet_n_proc_DA=0 breaks 2.8.1's planner (torch.set_num_threads(0)), so use 1 here
    run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
        {**env, "nnUNet_n_proc_DA": "1"})


def _run_together(commands, env) -> list:
    """Start every command at once (they share the two CPU cores; most of each is start-up and I/O) and
    wait; an AssertionError with the output of any that failed."""
    procs = [subprocess.Popen([str(BIN / c[0]), *map(str, c[1:])], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for command, proc, out in zip(commands, procs, outputs):
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, command))} failed ({proc.returncode}):\n{out[-4000:]}")
    return outputs


def _predict_both(root: Path, env: dict, dataset_id: int, trainer: str, folds, flags, out: Path) -> dict:
    """``nnUNetv2_predict`` (into out/stock) and ``nnunetv2_mobilevim predict`` (into out/ours) with the
    same arguments; the agreement summary of ours against stock's."""
    images = next((root / "raw").glob(f"Dataset{dataset_id}_*")) / "imagesTs"
    args = ["-i", images, "-d", dataset_id, "-c", "3d_fullres", "-tr", trainer, "-f", *folds, "-device", "cpu",
            *flags]
    _, ours_output = _run_together([["nnUNetv2_predict", "-o", out / "stock", *args],
                                    ["nnunetv2_mobilevim", "predict", "-o", out / "ours", *args]], env)
    assert "nnunetv2_mobilevim predict: " in ours_output and "device cpu" in ours_output, ours_output
    return compare_folders(out / "stock", out / "ours")


def _assert_agreement(summary: dict, images: Path, label: str, dice_min: float = DICE_MIN) -> None:
    """The parity criteria (``assert_predictions_agree``) on an agreement summary, every case predicted, its
    .npz and .pkl written, and every output's geometry its input image's."""
    import SimpleITK as sitk

    report = {k: summary[k] for k in ("dice_agreement_min", "max_abs_probability_difference",
                                      "max_implied_logit_difference", "mean_implied_logit_difference_max")}
    report["labels_predicted"] = sorted({int(k) for f in summary["files"].values() for k in f["dice"]})
    print(f"\nparity {label}: {json.dumps(report)}")
    assert summary["compared"] == len(list(images.glob("*_0000.nii.gz")))  # every case predicted
    reference = Path(summary["reference"])
    for case in summary["files"]:
        assert {f"{case}.npz", f"{case}.pkl"} <= {p.name for p in reference.iterdir()}  # so in ours too
    assert_predictions_agree(summary, dice_min=dice_min)
    for case, result in summary["files"].items():
        source = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        expected = {"size": list(source.GetSize()), "spacing": list(source.GetSpacing()),
                    "origin": list(source.GetOrigin()), "direction": list(source.GetDirection())}
        assert result["candidate_geometry"] == expected, case


# --- the CT-like anisotropic dataset ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """(root, env): the CT-like dataset planned and preprocessed (3d_fullres), the short trainers' folder."""
    root = tmp_path_factory.mktemp("ct_parity")
    ext = root / "ext"
    ext.mkdir()
    (ext / "parity_short.py").write_text(SHORT_TRAINERS)
    write_ct_dataset(root / "raw" / CT, cases=5, test_cases=2, test_shapes=CT_TEST_SHAPES,
                     test_spacings=CT_TEST_SPACINGS)
    env = _env(root, ext)
    _plan(root, CT_ID, env)
    return root, env


@pytest.fixture(scope="module")
def ct_predictions(ct):
    """A function (trainer, flags) -> the agreement summary of both commands' predictions of the test cases;
    it trains the model and predicts on first use."""
    root, env = ct
    trained, made = set(), {}

    def predictions(trainer: str, flags: str) -> dict:
        if trainer not in trained:
            run(["nnUNetv2_train", CT_ID, "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
            trained.add(trainer)
        if (trainer, flags) not in made:
            made[trainer, flags] = _predict_both(root, env, CT_ID, trainer, ["0"], FLAGS[flags],
                                                 root / "pred" / trainer / flags)
        return made[trainer, flags]

    return predictions


def test_ct_dataset_exercises_the_hard_paths(ct):
    """The plan resamples every case to and from the target spacing with the coarse axis (z) separately,
    normalises as CT, crops the zero border on every axis; resampling changes the test cases' size on every
    axis (the coarse one too, where the separate resampling differs from a plain 3D one), and one of them
    needs more than one tile in plane."""
    import SimpleITK as sitk
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, determine_do_sep_z_and_axis

    root, _ = ct
    plans = json.loads((root / "preprocessed" / CT / "nnUNetPlans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert config["normalization_schemes"] == ["CTNormalization"] and plans["transpose_forward"] == [0, 1, 2]
    target, patch = config["spacing"], config["patch_size"]
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        assert config[key] == "resample_data_or_seg_to_shape"
    force = config["resampling_fn_data_kwargs"]["force_separate_z"]
    assert force is None and config["resampling_fn_probabilities_kwargs"]["force_separate_z"] is None
    tiles = []
    for image_file in sorted((root / "raw" / CT).glob("images*/*.nii.gz")):
        image = sitk.ReadImage(str(image_file))
        spacing = list(reversed(image.GetSpacing()))  # (z, y, x) as the arrays
        for current, new in ((spacing, target), (target, spacing)):  # preprocessing, then export
            assert determine_do_sep_z_and_axis(force, current, new) == (True, 0), (image_file.name, current, new)
        nonzero = np.argwhere(sitk.GetArrayFromImage(image) != 0)
        box = nonzero.max(0) + 1 - nonzero.min(0)
        assert all(b < s for b, s in zip(box, image.GetSize()[::-1])), (image_file.name, box)
        if image_file.parent.name == "imagesTs":
            resampled = compute_new_shape(box, spacing, target)
            assert all(n != b for n, b in zip(resampled, box)), (image_file.name, box, resampled)
            tiles.append([int(n) / p for n, p in zip(resampled, patch)])
    assert len(tiles) == 2 and any(t[1] > 1 and t[2] > 1 for t in tiles) and all(t[0] <= 1 for t in tiles), tiles


# in CI each model once, with and without mirroring; the other two combinations are `exhaustive`
CASES = [pytest.param(NNUNET, "tta", id="nnunet-tta"), pytest.param(MOBILEVIM, "notta", id="mobilevim-notta"),
         pytest.param(NNUNET, "notta", id="nnunet-notta", marks=pytest.mark.exhaustive),
         pytest.param(MOBILEVIM, "tta", id="mobilevim-tta", marks=pytest.mark.exhaustive)]


@pytest.mark.parametrize("trainer,flags", CASES)
def test_predict_matches_nnunet_on_anisotropic_ct(ct, ct_predictions, trainer, flags):
    """Both commands on the CT-like test cases with the model of ``trainer``, fold 0, ``FLAGS[flags]``."""
    summary = ct_predictions(trainer, flags)
    _assert_agreement(summary, ct[0] / "raw" / CT / "imagesTs", f"CT {trainer} {flags}")


def test_ensemble_of_our_probabilities_matches_nnunets(ct, ct_predictions):
    """``nnUNetv2_ensemble --save_npz`` of our two prediction folders (nnU-Net's network with mirroring,
    MobileViM without) gives what it gives on nnU-Net's two: the probabilities within the same tolerances.
    The labels of an average of two briefly trained, different networks sit at near-ties wherever the two
    disagree, so a float16 rounding step flips single voxels there (measured: one class at Dice 0.9989);
    the labels must agree to Dice 0.99, the probabilities as tightly as the predictions'."""
    root, env = ct
    folders = [Path(ct_predictions(trainer, flags)["reference"]).parent
               for trainer, flags in ((NNUNET, "tta"), (MOBILEVIM, "notta"))]
    out = root / "ensemble"
    _run_together([["nnUNetv2_ensemble", "-i", *[f / who for f in folders], "-o", out / who, "-np", "1",
                    "--save_npz"] for who in ("stock", "ours")], env)
    _assert_agreement(compare_folders(out / "stock", out / "ours"), root / "raw" / CT / "imagesTs", "CT ensemble",
                      dice_min=0.99)


# --- the demo's held-out person (real MRI) -------------------------------------------------------------

@pytest.mark.exhaustive
def test_predict_matches_nnunet_on_the_demo_person(tmp_path):
    """MobileViM trained briefly (fold all, as the demo trains) on the demo's three brains; the held-out
    person predicted by both commands with mirroring and probabilities."""
    from nnunetv2_mobilevim.demo_data import DATASET_ID, write_raw_dataset

    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "parity_short.py").write_text(SHORT_TRAINERS)
    raw = write_raw_dataset(tmp_path / "raw")
    env = _env(tmp_path, ext)
    _plan(tmp_path, DATASET_ID, env)
    run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", MOBILEVIM, "-device", "cpu"], env)
    summary = _predict_both(tmp_path, env, DATASET_ID, MOBILEVIM, ["all"], FLAGS["tta"], tmp_path / "pred")
    _assert_agreement(summary, raw / "imagesTs", "demo MobileViM tta")
