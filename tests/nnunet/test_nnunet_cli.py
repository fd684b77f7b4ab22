"""End to end through nnU-Net's real command line (no mocks), on a tiny synthetic dataset, on the CPU.

plan_and_preprocess -> train (fold 0, stopped and continued with --c; fold all) -> --val --npz ->
predict (-chk, --disable_tta, -step_size) -> evaluate_folder -> find_best_configuration ->
ensemble -> apply_postprocessing; and the errors a user can run into.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from nnunet_commands import BIN, DATASET, DATASET_ID, assert_predictions_agree, nnunet_env, run

from nnunetv2_mobilevim.nnunet.registration import ext_trainer_dir
from nnunetv2_mobilevim.research.prediction_agreement import compare_folders

pytestmark = pytest.mark.slow

TRAINER = "nnUNetTrainerMobileViM_smoke"
MODEL = f"{TRAINER}__nnUNetPlans__3d_fullres"


def model_dir(root: Path) -> Path:
    return root / "results" / DATASET / MODEL


@pytest.fixture(scope="module")
def trained_fold0(workspace):
    """Fold 0 trained as a user whose run died would: killed once epoch 1 started, continued with --c."""
    env = nnunet_env(workspace)
    cmd = [str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    fold = model_dir(workspace) / "fold_0"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    try:  # stop the run once epoch 0's checkpoint is written and epoch 1 has started
        for line in proc.stdout:
            seen.append(line)
            if line.rstrip().endswith("Epoch 1"):
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    stopped = {"latest": (fold / "checkpoint_latest.pth").is_file(), "final": (fold / "checkpoint_final.pth").exists(),
               "output": "".join(seen[-40:])}
    run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--c"], env)
    return fold, stopped


@pytest.fixture(scope="module")
def trained_fold_all(workspace):
    env = nnunet_env(workspace, NNUNETV2_MOBILEVIM_BACKGROUND_PLOT="1")  # on a CPU only when asked
    run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu"], env)
    return model_dir(workspace) / "fold_all"


@pytest.fixture(scope="module")
def predictions(workspace, trained_fold0):
    """Fold 0's predictions of the test cases, with and without test-time mirroring, probabilities saved."""
    env = nnunet_env(workspace)
    images, out = workspace / "raw" / DATASET / "imagesTs", workspace / "pred"
    for name, extra in [("tta", []), ("notta", ["--disable_tta", "-step_size", "0.8"])]:
        run(["nnUNetv2_predict", "-i", images, "-o", out / name, "-d", DATASET_ID, "-c", "3d_fullres", "-tr", TRAINER,
             "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1", "-nps", "1",
             "--save_probabilities", *extra], env)
    return out


def test_train_stop_and_continue_fold0(trained_fold0):
    fold, stopped = trained_fold0
    assert stopped["latest"], stopped["output"]
    assert not stopped["final"]
    logs = sorted(fold.glob("training_log_*.txt"))
    resumed = logs[-1].read_text()
    assert "Epoch 1" in resumed and "Epoch 0\n" not in resumed, resumed  # continued, did not restart
    assert "selective scan backend: torch" in resumed
    assert (fold / "checkpoint_final.pth").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary and 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_validation_only_with_npz(workspace, trained_fold0):
    run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--val", "--npz"],
        nnunet_env(workspace))
    npz = list((model_dir(workspace) / "fold_0" / "validation").glob("*.npz"))
    assert len(npz) == 2  # fold 0 of 6 cases validates 2


def test_train_fold_all(trained_fold_all, tmp_path):
    """The run ends with nnU-Net's files; progress.png (drawn by a worker process) is nnU-Net's plot of
    the values the final checkpoint logged, pixel for pixel."""
    import matplotlib.image
    import numpy as np
    import torch
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    checkpoint = torch.load(trained_fold_all / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert "drawn in a worker process" in sorted(trained_fold_all.glob("training_log_*.txt"))[-1].read_text()
    reference = LocalLogger()
    reference.load_checkpoint(checkpoint["logging"])
    reference.plot_progress_png(str(tmp_path))
    drawn, expected = (matplotlib.image.imread(str(f / "progress.png")) for f in (trained_fold_all, tmp_path))
    assert np.array_equal(drawn, expected)


def test_predict_and_evaluate(workspace, predictions):
    env, out = nnunet_env(workspace), predictions
    for name in ("tta", "notta"):
        assert len(list((out / name).glob("*.nii.gz"))) == 2
    labels = workspace / "raw" / DATASET / "labelsTs"
    run(["nnUNetv2_evaluate_folder", labels, out / "tta", "-djfile", out / "tta" / "dataset.json",
         "-pfile", out / "tta" / "plans.json", "-np", "1"], env)
    summary = json.loads((out / "tta" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    # ensemble of the two prediction folders (probabilities were saved)
    run(["nnUNetv2_ensemble", "-i", out / "tta", out / "notta", "-o", out / "ensemble", "-np", "1"], env)
    assert len(list((out / "ensemble").glob("*.nii.gz"))) == 2


def assert_same_predictions(ours: Path, theirs: Path, probabilities: bool) -> None:
    """The same cases; per case the same geometry and dtype, Dice >= 0.999 per label; with probabilities,
    the .npz within a float16 step or two of each logit (``assert_predictions_agree``). Other tests write
    evaluations into nnU-Net's folders, so only the cases' files are compared."""
    summary = compare_folders(theirs, ours)
    assert summary["extra_in_candidate"] == [], summary["extra_in_candidate"]
    assert_predictions_agree(summary, probabilities=probabilities, same_files=False)


def test_predict_command_gives_nnunets_outputs(workspace, predictions):
    """``nnunetv2_mobilevim predict`` with nnUNetv2_predict's flags and the same model: the same files,
    geometry, labels and probabilities as nnU-Net's command; its probabilities ensemble with nnU-Net's tool."""
    env = nnunet_env(workspace)
    images, out = workspace / "raw" / DATASET / "imagesTs", workspace / "pred_ours"
    for name, extra in [("tta", []), ("notta", ["--disable_tta", "-step_size", "0.8"])]:
        res = run(["nnunetv2_mobilevim", "predict", "-i", images, "-o", out / name, "-d", DATASET_ID, "-c",
                   "3d_fullres", "-tr", TRAINER, "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu",
                   "-npp", "1", "-nps", "1", "--save_probabilities", *extra], env)
        assert "nnunetv2_mobilevim predict: 2 case(s) in" in res.stdout and "device cpu" in res.stdout
        assert_same_predictions(out / name, predictions / name, probabilities=True)
    for source, target in ((out, out / "ensemble"), (predictions, out / "ensemble_of_stock")):
        run(["nnUNetv2_ensemble", "-i", source / "tta", source / "notta", "-o", target, "-np", "1"], env)
    assert_same_predictions(out / "ensemble", out / "ensemble_of_stock", probabilities=False)


def test_predict_command_errors_say_what_to_do(workspace):
    env = nnunet_env(workspace)
    res = run(["nnunetv2_mobilevim", "predict", "-i", workspace, "-o", workspace / "x", "-d", DATASET_ID, "-c",
               "3d_fullres", "-tr", "nnUNetTrainerNotTrained", "-device", "cpu"], env, check=False)
    assert res.returncode == 2 and "no trained model in" in res.stderr and "nnUNet_results" in res.stderr


def test_find_best_configuration_and_postprocessing(workspace, trained_fold0, predictions):
    env = nnunet_env(workspace)
    run(["nnUNetv2_find_best_configuration", DATASET_ID, "-c", "3d_fullres", "-tr", TRAINER, "-f", "0",
         "--disable_ensembling", "-np", "1"], env)
    inference = (model_dir(workspace).parent / "inference_instructions.txt").read_text()
    assert TRAINER in inference
    pp = model_dir(workspace) / "crossval_results_folds_0" / "postprocessing.pkl"
    assert pp.is_file()
    src, dst = predictions / "tta", predictions / "pp"
    run(["nnUNetv2_apply_postprocessing", "-i", src, "-o", dst, "-pp_pkl_file", pp, "-np", "1",
         "-plans_json", model_dir(workspace) / "crossval_results_folds_0" / "plans.json"], env)
    assert len(list(dst.glob("*.nii.gz"))) == 2


def test_deep_supervision_outputs_pair_with_targets(workspace):
    """The trainer's scales and the network's outputs agree for the plan nnU-Net actually made."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    plans = json.loads((workspace / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((workspace / "preprocessed" / DATASET / "dataset.json").read_text())
    os.environ.setdefault("nnUNet_preprocessed", str(workspace / "preprocessed"))
    os.environ.setdefault("nnUNet_results", str(workspace / "results"))
    cm = PlansManager(plans).get_configuration("3d_fullres")
    plans["continue_training"] = False  # nnU-Net 2.8.1's run_training sets this before building a trainer
    trainer = nnUNetTrainerMobileViM(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    net = trainer.build_network_architecture(PlansManager(plans), cm, 2, 3, True)
    outs = net(torch.zeros(2, 2, *cm.patch_size))
    scales = trainer._get_deep_supervision_scales()
    assert len(outs) == len(scales)
    for out, scale in zip(outs, scales):
        assert list(out.shape[2:]) == [round(p * s) for p, s in zip(cm.patch_size, scale)]


def test_forgotten_ext_trainer_variable(workspace):
    res = run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
              nnunet_env(workspace, ext_trainer=False), check=False)
    assert res.returncode != 0
    assert "Could not find requested nnunet trainer" in res.stderr and "nnUNet_extTrainer" in res.stderr


def test_missing_nnunet_path_variables(workspace):
    env = nnunet_env(workspace)
    del env["nnUNet_preprocessed"]
    res = run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env, check=False)
    assert res.returncode != 0
    assert "nnUNet_preprocessed" in res.stdout + res.stderr
    check = run(["nnunetv2_mobilevim", "check"], env, check=False)
    assert check.returncode == 1 and "nnUNet_preprocessed" in check.stdout


def test_wrong_number_of_input_channels_at_prediction(workspace, trained_fold0):
    """The model was trained on 2 channels; a folder with only _0000 files reaches the network, which says so.
    (With more channels than trained, nnU-Net's own preprocessing fails first: see docs/nnunet.md.)"""
    src = workspace / "raw" / DATASET / "imagesTs"
    bad = workspace / "one_channel_input"
    bad.mkdir(exist_ok=True)
    for f in src.glob("*_0000.nii.gz"):
        shutil.copy(f, bad / f.name)
    res = run(["nnUNetv2_predict", "-i", bad, "-o", workspace / "pred_bad", "-d", DATASET_ID, "-c", "3d_fullres",
               "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
              nnunet_env(workspace), check=False)
    assert res.returncode != 0
    assert "built for 2 input channel(s), got 1" in res.stdout + res.stderr


def test_truncated_checkpoint_is_reported_and_nothing_is_lost(workspace, trained_fold_all):
    fold = trained_fold_all
    final = fold / "checkpoint_final.pth"
    data = final.read_bytes()
    final.write_bytes(data[: len(data) // 3])
    try:
        res = run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu", "--c"],
                  nnunet_env(workspace), check=False)
        assert res.returncode != 0
        assert "truncated, corrupt" in res.stderr and "--c" in res.stderr
        assert final.stat().st_size == len(data) // 3  # untouched: nothing overwritten
        check = run(["nnunetv2_mobilevim", "check"], nnunet_env(workspace), check=False)
        assert "cannot be read" in check.stdout and str(final) in check.stdout
    finally:
        final.write_bytes(data)


@pytest.mark.parametrize("name,optimizer", [("nnUNetTrainerMobileViM", "AdamW"),
                                            ("nnUNetTrainerMobileViM_xs", "AdamW"),
                                            ("nnUNetTrainerMobileViM_SGD", "SGD"),
                                            ("nnUNetTrainerMobileViM_xs_SGD", "SGD")])
def test_trainer_recipes_initialise(workspace, name, optimizer):
    """Each trainer builds through nnU-Net's own initialize() with its recipe: the default AdamW with
    a cosine from 1e-3 to 1e-5, the _SGD variants nnU-Net's SGD with poly decay from 1e-2."""
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ.setdefault(var, str(workspace / sub))  # before nnunetv2.paths is first imported
    os.environ["nnUNet_extTrainer"] = str(ext_trainer_dir())
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(name)
    plans = json.loads((workspace / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((workspace / "preprocessed" / DATASET / "dataset.json").read_text())
    plans["continue_training"] = False
    trainer = cls(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    from nnunetv2_mobilevim.nnunet import optim  # SGD: torch's, whose fused kernel survives skipped steps
    assert type(trainer.optimizer) is {"AdamW": torch.optim.AdamW, "SGD": optim.SGD}[optimizer]
    assert trainer.network.config.name == ("MobileViM_xs" if "_xs" in name else "MobileViM_s")
    assert trainer.graphed_train_step is None  # CUDA graphs only on a GPU
    group = trainer.optimizer.param_groups[0]
    if optimizer == "SGD":  # nnU-Net's own settings
        assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.99, True, 3e-5)
    else:
        assert group["weight_decay"] == pytest.approx(0.03)
    assert not group["fused"]  # the fused kernel only on GPUs
    start, end = (1e-3, 1e-5) if optimizer == "AdamW" else (1e-2, 0.0)
    trainer.lr_scheduler.step(0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(start)
    trainer.lr_scheduler.step(trainer.num_epochs)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(end, abs=1e-6)


# --- nnU-Net's augmentation on the training device (issue 14) -----------------------------------------

def _training_log(fold: Path) -> str:
    return "".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))


def test_default_cpu_run_keeps_nnunets_augmentation_and_says_so(trained_fold0):
    fold, _ = trained_fold0
    assert "data augmentation: nnU-Net's pipeline in the worker processes (training on cpu" in _training_log(fold)


def test_device_augmentation_through_the_command_line(workspace):
    """NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION=1: nnU-Net's transforms run batched in the training process
    (here on the CPU), the workers only load and crop; training, validation and the checkpoint work."""
    results = workspace / "results_device_augmentation"
    env = nnunet_env(workspace, nnUNet_results=str(results), NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION="1")
    run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "1", "-tr", TRAINER, "-device", "cpu"], env)
    fold = results / DATASET / MODEL / "fold_1"
    log = _training_log(fold)
    assert "data augmentation: batched on cpu (SpatialTransform, GaussianNoiseTransform," in log
    assert "DownsampleSegForDSTransform); the worker processes load and crop only" in log
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()


def test_nnunets_own_trainer_with_device_augmentation_in_2d(workspace, tmp_path):
    """``nnUNetTrainer_DeviceAug`` (nnU-Net's network and recipe) on the 2d configuration, through a
    short subclass in an extra trainer folder, as a user would shorten it."""
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "short_device_aug.py").write_text(
        "from nnunetv2_mobilevim.nnunet.device_augmentation import nnUNetTrainer_DeviceAug\n\n\n"
        "class nnUNetTrainer_DeviceAug_short(nnUNetTrainer_DeviceAug):\n"
        "    def __init__(self, plans, configuration, fold, dataset_json, device):\n"
        "        super().__init__(plans, configuration, fold, dataset_json, device)\n"
        "        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 3, 1\n")
    results = workspace / "results_device_aug_2d"
    env = nnunet_env(workspace, nnUNet_results=str(results),
                     nnUNet_extTrainer=os.pathsep.join([str(ext_trainer_dir()), str(ext)]))
    run(["nnUNetv2_train", DATASET_ID, "2d", "0", "-tr", "nnUNetTrainer_DeviceAug_short", "-device", "cpu"], env)
    fold = results / DATASET / "nnUNetTrainer_DeviceAug_short__nnUNetPlans__2d" / "fold_0"
    assert "data augmentation: batched on cpu (SpatialTransform," in _training_log(fold)
    assert (fold / "checkpoint_final.pth").is_file()
    # nnU-Net's own network, a trainer from an extra folder: `predict` finds it by nnU-Net's search, same outputs
    images, out = workspace / "raw" / DATASET / "imagesTs", tmp_path / "pred"
    flags = ["-i", images, "-d", DATASET_ID, "-c", "2d", "-tr", "nnUNetTrainer_DeviceAug_short", "-f", "0", "-device",
             "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
    run(["nnUNetv2_predict", "-o", out / "stock", *flags], env)
    run(["nnunetv2_mobilevim", "predict", "-o", out / "ours", *flags], env)
    assert_same_predictions(out / "ours", out / "stock", probabilities=False)


def test_augment_check_command_on_the_dataset(workspace, tmp_path):
    """``nnunetv2_mobilevim augment-check`` on the preprocessed dataset: every transform agrees with
    nnU-Net's, one JSON entry per transform, the side-by-side PNG written."""
    out = tmp_path / "check"
    res = run(["nnunetv2_mobilevim", "augment-check", "-d", DATASET_ID, "-c", "3d_fullres", "-o", out,
               "--cases", "2", "--draws", "16", "--device", "cpu"], nnunet_env(workspace), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "augment_check.json").read_text())
    names = [e["transform"] for e in report["transforms"]]
    assert names[0] == "SpatialTransform" and names[-1] == "DownsampleSegForDSTransform" and len(names) == 11
    assert report["ok"] and all(e["ok"] and {"statistic", "nnunet", "device", "tolerance"} <= set(e)
                                for e in report["transforms"])
    assert (out / "augment_check.png").stat().st_size > 10_000


def test_explicit_device_augmentation_refuses_what_it_cannot_run(workspace, monkeypatch):
    """The cascade's transforms cannot run on the device: nnUNetTrainer_DeviceAug (an explicit request)
    stops with the names and the switch; a MobileViM trainer (automatic) on a GPU-less run keeps
    nnU-Net's pipeline, and with the switch on it stops as well."""
    import torch

    from nnunetv2_mobilevim.nnunet import device_augmentation as module
    from nnunetv2_mobilevim.nnunet.trainers import nnUNetTrainerMobileViM

    plans = json.loads((workspace / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((workspace / "preprocessed" / DATASET / "dataset.json").read_text())
    for key, value in nnunet_env(workspace).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION", raising=False)
    module.device_augmentation_switch.cache_clear()
    args = ([32, 40, 36], (-0.5, 0.5), None, (0, 1, 2), False)
    kwargs = dict(is_cascaded=True, foreground_labels=[1, 2])

    def trainer(cls):
        plans["continue_training"] = False
        t = cls(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
        t.print_to_log_file = lambda *a, **k: None
        return t

    with pytest.raises(RuntimeError) as err:
        trainer(module.nnUNetTrainer_DeviceAug).get_training_transforms(*args, **kwargs)
    message = str(err.value)
    assert "MoveSegAsOneHotToDataTransform" in message and "NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION=0" in message
    mobilevim = trainer(nnUNetTrainerMobileViM)
    assert mobilevim.get_training_transforms(*args, **kwargs) is not None and mobilevim.device_pipeline is None
    monkeypatch.setenv("NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION", "1")
    module.device_augmentation_switch.cache_clear()
    try:
        with pytest.raises(RuntimeError):
            trainer(nnUNetTrainerMobileViM).get_training_transforms(*args, **kwargs)
    finally:
        module.device_augmentation_switch.cache_clear()
