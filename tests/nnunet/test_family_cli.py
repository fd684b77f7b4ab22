"""The field's Mamba networks through nnU-Net's real command line, on the CPU: a trainer trains a few
iterations, continues from its checkpoint with --c, and predicts, on the shared tiny dataset with
`nnUNetPlans_small`. Each runs as a short subclass in an extra trainer folder (as a user would shorten
one); nnU-Net finds the shipped ones through `nnunetv2_mobilevim ext-path`.

In CI (each ~1-1.5 min on 2 cores): one network of each family in 3D (U-Mamba Enc, BiSegMamba) and
MobileViM in 2D (without --c, which the 3D ones run); nnU-Net's own network on this package's machinery
(`nnUNetTrainer_Accelerated`) trains only (its continuation and prediction are the base trainer's, run
by the others; its prediction network: tests/nnunet/test_prediction_networks.py). Every other trainer,
every twin, the `_Paper` recipes, the whole cycle for `nnUNetTrainer_Accelerated` and more 2D networks
are marked `exhaustive`:
`pytest -m exhaustive tests/nnunet/test_family_cli.py` (log: docs/benchmarks/cpu_family_cli.txt).
"""

from __future__ import annotations

import json
import os

import pytest
from nnunet_commands import DATASET, DATASET_ID, nnunet_env, run

from nnunetv2_mobilevim.nnunet.registration import ext_trainer_dir

pytestmark = pytest.mark.slow

MAMBA = ["nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaEnc", "nnUNetTrainerTamingSegMamba", "nnUNetTrainerBiSegMamba",
         "nnUNetTrainerMultiSegMamba", "nnUNetTrainerSegMambaSkip"]
TWINS = [name + "_NoMamba" for name in MAMBA]
PAPER = [name + "_Paper" for name in MAMBA if "UMamba" not in name]  # Taming's own recipe (RAdam, linear)
IN_CI_3D = ["nnUNetTrainerUMambaEnc", "nnUNetTrainerBiSegMamba"]  # one per network family; the rest: exhaustive
IN_CI_2D = ["nnUNetTrainerMobileViM"]  # trains and predicts in CI; its whole cycle (with --c): exhaustive
ACCELERATED = "nnUNetTrainer_Accelerated"
PLANS = "nnUNetPlans_small"


@pytest.fixture(scope="module")
def family_env(workspace, tmp_path_factory):
    """nnU-Net's environment with an extra trainer folder holding a short subclass of every trainer here:
    1 epoch of 2 iterations, 1 validation iteration, the final validation without mirroring."""
    ext = tmp_path_factory.mktemp("family_ext")
    modules = {"nnunetv2_mobilevim.nnunet.umamba_trainers": [n for n in MAMBA + TWINS if "UMamba" in n],
               "nnunetv2_mobilevim.nnunet.taming_trainers": [n for n in MAMBA + TWINS + PAPER if "UMamba" not in n],
               "nnunetv2_mobilevim.nnunet.trainers": ["nnUNetTrainerMobileViM"],
               "nnunetv2_mobilevim.nnunet.nnunet_network_trainers": [ACCELERATED]}
    lines = []
    for module, names in modules.items():
        lines.append(f"from {module} import {', '.join(names)}")
    for name in sorted({n for names in modules.values() for n in names}):
        lines += ["", "", f"class {name}_short({name}):",
                  "    def __init__(self, plans, configuration, fold, dataset_json, device):",
                  "        super().__init__(plans, configuration, fold, dataset_json, device)",
                  "        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1",
                  "",
                  "    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):",
                  "        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()",
                  "        self.inference_allowed_mirroring_axes = None  # validation without test-time mirroring",
                  "        return out"]
    (ext / "family_short.py").write_text("\n".join(lines) + "\n")
    _write_small_plans(workspace)
    results = workspace / "results_family"
    return nnunet_env(workspace, nnUNet_results=str(results),
                      nnUNet_extTrainer=os.pathsep.join([str(ext_trainer_dir()), str(ext)])), results


def _write_small_plans(workspace) -> None:
    """``nnUNetPlans_small``: the dataset's plans with a quarter of the features and a smaller patch, as a
    user edits plans; the same preprocessed data. Keeps eight-scan networks within a CPU's memory."""
    folder = workspace / "preprocessed" / DATASET
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    for name, patch in (("3d_fullres", [16, 24, 24]), ("2d", [32, 32])):
        configuration = plans["configurations"][name]
        configuration["patch_size"] = patch
        arch = configuration["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [max(4, f // 4) for f in arch["features_per_stage"]]
    (folder / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))


def _train(family_env, trainer: str, configuration: str):
    """``nnUNetv2_train`` of the short subclass: its command, fold folder and training log."""
    env, results = family_env
    name = f"{trainer}_short"
    train = ["nnUNetv2_train", DATASET_ID, configuration, "0", "-tr", name, "-p", PLANS, "-device", "cpu"]
    run(train, env)
    fold = results / DATASET / f"{name}__{PLANS}__{configuration}" / "fold_0"
    log = "".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    assert (fold / "checkpoint_final.pth").is_file() and "train_loss" in log
    assert "nan" not in log.split("train_loss", 1)[1].split("\n", 1)[0].lower()
    return train, fold, log


def _train_continue_predict(workspace, family_env, trainer: str, configuration: str, tmp_path,
                            continue_training: bool = True) -> None:
    env, _ = family_env
    train, fold, _ = _train(family_env, trainer, configuration)
    name = f"{trainer}_short"
    if continue_training:
        # --c on a finished run loads checkpoint_final.pth through the trainer's checks, then validates again
        run([*train, "--c"], env)
    summary = fold / "validation" / "summary.json"
    assert summary.is_file()
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", workspace / "raw" / DATASET / "imagesTs", "-o", out, "-d", DATASET_ID, "-c",
         configuration, "-tr", name, "-p", PLANS, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_tta", "-step_size", "1"], env)
    assert len(list(out.glob("*.nii.gz"))) == 2


@pytest.mark.parametrize("trainer", IN_CI_3D)
def test_trains_continues_and_predicts_in_3d(workspace, family_env, trainer, tmp_path):
    _train_continue_predict(workspace, family_env, trainer, "3d_fullres", tmp_path)


@pytest.mark.parametrize("trainer", IN_CI_2D)
def test_trains_and_predicts_in_2d(workspace, family_env, trainer, tmp_path):
    """Continuing (--c) is the base trainer's and the same in 2D; the 3D tests run it (here it would cost
    one more nnU-Net training process)."""
    _train_continue_predict(workspace, family_env, trainer, "2d", tmp_path, continue_training=False)


def test_nnunets_network_trains_on_the_package_machinery_in_3d(workspace, family_env):
    """nnU-Net's own network from the plan (PlainConvUNet here) in this package's trainer base."""
    _, _, log = _train(family_env, ACCELERATED, "3d_fullres")
    assert "network PlainConvUNet, no selective scan, torch.compile: False" in log and "selective scan:" not in log


@pytest.mark.exhaustive
@pytest.mark.parametrize("trainer", [t for t in MAMBA + TWINS + PAPER + [ACCELERATED] if t not in IN_CI_3D])
def test_every_other_trainer_in_3d(workspace, family_env, trainer, tmp_path):
    _train_continue_predict(workspace, family_env, trainer, "3d_fullres", tmp_path)


@pytest.mark.exhaustive
@pytest.mark.parametrize("trainer", [*IN_CI_2D, "nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaEnc",
                                     "nnUNetTrainerTamingSegMamba", "nnUNetTrainerMultiSegMamba",
                                     "nnUNetTrainerSegMambaSkip"])
def test_more_networks_in_2d(workspace, family_env, trainer, tmp_path):
    _train_continue_predict(workspace, family_env, trainer, "2d", tmp_path)
