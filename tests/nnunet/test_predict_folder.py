"""``Predictor.predict_folder`` (device pipeline, threaded I/O) against nnU-Net's own
``predict_from_files_sequential`` with the same small network, on the CPU: the same files, geometry,
labels and probabilities; a step that runs out of device memory is redone with nnU-Net's code and
said once; ``overwrite=False`` skips finished cases. (The whole command: tests/nnunet/test_predict_parity.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from test_device_pipeline import LABELS, case, plans

from nnunetv2_mobilevim.nnunet.device_pipeline import DevicePipeline
from nnunetv2_mobilevim.nnunet.predictor import Predictor

DATASET_JSON = {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "CT", "1": "CT"}, "numTraining": 3}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        image, props = case(seed=i)
        for c in range(image.shape[0]):
            itk = sitk.GetImageFromArray(image[c])
            itk.SetSpacing(tuple(float(s) for s in props["spacing"][::-1]))
            itk.SetOrigin((1.0 + i, -2.0, 3.5))
            sitk.WriteImage(itk, str(folder / f"case{i}_{c:04d}.nii.gz"))
    return folder


def predictor(transpose=(0, 1, 2), mirroring=False, cls=Predictor, configuration="3d_fullres", folds=1,
              step=0.5, gaussian=True) -> Predictor:
    """``cls`` (ours, or nnU-Net's own ``nnUNetPredictor`` as the reference) with a small fixed network
    (``folds`` different weights of it)."""
    pm, cm = plans(transpose=transpose, configuration=configuration)
    conv = torch.nn.Conv3d if configuration == "3d_fullres" else torch.nn.Conv2d
    torch.manual_seed(0)
    weights = []
    for _ in range(folds):
        network = torch.nn.Sequential(conv(2, 4, 3, padding=1), torch.nn.Tanh(), conv(4, len(LABELS), 1))
        weights.append(network.state_dict())
    p = cls(tile_step_size=step, use_gaussian=gaussian, use_mirroring=mirroring, device=torch.device("cpu"),
            allow_tqdm=False)
    axes = (0, 1, 2) if configuration == "3d_fullres" else (0, 1)
    p.manual_initialization(network, pm, cm, weights, DATASET_JSON, "nnUNetTrainer", axes)
    return p


def nnunet_prediction(folder, out, transpose=(0, 1, 2), mirroring=False) -> None:
    """nnU-Net's own predictor and pipeline, in this process."""
    out.mkdir()
    reference = predictor(transpose, mirroring, nnUNetPredictor)
    reference.predict_from_files_sequential(str(folder), str(out), save_probabilities=True)


def assert_same_outputs(ours, theirs, names=("case0", "case1", "case2")):
    for name in names:
        a, b = sitk.ReadImage(str(ours / f"{name}.nii.gz")), sitk.ReadImage(str(theirs / f"{name}.nii.gz"))
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
        x, y = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
        assert x.dtype == y.dtype and x.shape == y.shape and len(np.unique(y)) > 1
        assert (x != y).mean() <= 1e-3
        pa, pb = np.load(ours / f"{name}.npz")["probabilities"], np.load(theirs / f"{name}.npz")["probabilities"]
        assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1e-3
        assert (ours / f"{name}.pkl").is_file()


@pytest.mark.parametrize("transpose,mirroring", [((0, 1, 2), False), ((2, 0, 1), True)])
def test_predict_folder_equals_nnunets_prediction(images, tmp_path, transpose, mirroring):
    seen = []
    predictor(transpose, mirroring).predict_folder(str(images), str(tmp_path / "ours"), save_probabilities=True,
                                                   on_case=lambda name, s: seen.append(name))
    nnunet_prediction(images, tmp_path / "nnunet", transpose, mirroring)
    assert seen == ["case0", "case1", "case2"]
    assert_same_outputs(tmp_path / "ours", tmp_path / "nnunet")
    for name in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
        assert (tmp_path / "ours" / name).is_file()


def test_predict_folder_out_of_memory_runs_nnunets_step_and_says_so_once(images, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(DevicePipeline, "preprocess", out_of_memory)
    monkeypatch.setattr(DevicePipeline, "export", out_of_memory)
    predictor().predict_folder(str(images), str(tmp_path / "ours"), save_probabilities=True)
    said = capsys.readouterr().out
    assert said.count("the preprocessing does not fit") == 1 and said.count("the export does not fit") == 1
    assert "nnU-Net's CPU code does this step" in said
    nnunet_prediction(images, tmp_path / "nnunet")
    assert_same_outputs(tmp_path / "ours", tmp_path / "nnunet")


def test_predict_folder_continue_skips_finished_cases(images, tmp_path):
    out = tmp_path / "ours"
    predictor().predict_folder(str(images), str(out), save_probabilities=False)
    (out / "case1.nii.gz").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    seen = []
    predictor().predict_folder(str(images), str(out), overwrite=False, on_case=lambda name, s: seen.append(name))
    assert seen == ["case1"] and (out / "case1.nii.gz").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz") if p.name != "case1.nii.gz"} == before


@pytest.mark.parametrize("configuration,shape,step,gaussian,folds", [
    ("3d_fullres", (2, 21, 50, 37), 0.5, True, 1),  # several tiles on every axis
    ("3d_fullres", (2, 9, 30, 13), 0.7, True, 2),  # smaller than the patch on two axes (padded), two folds
    ("3d_fullres", (2, 21, 50, 37), 1.0, False, 1),  # no Gaussian
    ("2d", (2, 5, 50, 37), 0.5, True, 3),  # a 2D patch sliding over every slice, three folds
])
def test_sliding_window_and_fold_ensemble_are_nnunets_bit_for_bit(configuration, shape, step, gaussian, folds):
    """Without mirroring the same network sees the same tiles in the same order: the float16 logits (each
    fold's and their mean) equal nnU-Net's exactly."""
    ours, theirs = (predictor(cls=c, configuration=configuration, folds=folds, step=step, gaussian=gaussian)
                    for c in (Predictor, nnUNetPredictor))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    a, b = ours.predict_sliding_window_return_logits(x), theirs.predict_sliding_window_return_logits(x)
    assert a.dtype == b.dtype == torch.float16 and a.shape == b.shape == (len(LABELS), *shape[1:])
    assert torch.equal(a, b)
    assert torch.equal(ours._ensemble_logits(x), theirs.predict_logits_from_preprocessed_data(x))
    if folds > 1:
        assert not torch.equal(ours._ensemble_logits(x), a)  # the folds differ


@pytest.mark.parametrize("axes", [(0, 1, 2), (1, 2), (0,)])
def test_batched_mirroring_equals_nnunets_one_by_one(axes):
    ours, theirs = predictor(mirroring=True), predictor(mirroring=True, cls=nnUNetPredictor)
    ours.allowed_mirroring_axes = theirs.allowed_mirroring_axes = axes
    x = torch.randn(1, 2, 16, 24, 24, generator=torch.Generator().manual_seed(3))
    a, b = ours._internal_maybe_mirror_and_predict(x), theirs._internal_maybe_mirror_and_predict(x)
    assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert (a - theirs.network(x)).abs().max() > 1e-3 * b.abs().max()  # mirroring changes the logits here


def test_batched_mirroring_out_of_memory_runs_one_by_one_and_says_so_once(capsys):
    p = predictor(mirroring=True)
    network = p.network

    def one_at_a_time(x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return network(x)

    p.network = one_at_a_time
    x = torch.randn(1, 2, 16, 24, 24, generator=torch.Generator().manual_seed(4))
    first, second = p._internal_maybe_mirror_and_predict(x), p._internal_maybe_mirror_and_predict(x)
    reference = predictor(mirroring=True, cls=nnUNetPredictor)._internal_maybe_mirror_and_predict(x)
    assert torch.equal(first, second) and (first - reference).abs().max() <= 1e-6 * reference.abs().max()
    assert capsys.readouterr().out.count("do not fit") == 1


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_predict_folder_on_cuda_equals_nnunets_prediction_on_cuda(images, tmp_path):
    """On the GPU, preprocessing, export and their float32 matrix products run on the device."""
    def on_cuda(p: Predictor) -> Predictor:
        p.device = torch.device("cuda")
        p.perform_everything_on_device = True
        return p

    on_cuda(predictor((2, 0, 1), True)).predict_folder(str(images), str(tmp_path / "ours"), save_probabilities=True)
    (tmp_path / "nnunet").mkdir()
    reference = on_cuda(predictor((2, 0, 1), True, nnUNetPredictor))
    reference.predict_from_files_sequential(str(images), str(tmp_path / "nnunet"), save_probabilities=True)
    assert_same_outputs(tmp_path / "ours", tmp_path / "nnunet")


def test_sliding_window_out_of_device_memory_accumulates_in_host_memory(capsys):
    """As nnU-Net: when the sums do not fit on the device, the whole window is redone with them in host
    memory (said), giving the same logits."""
    ours, theirs = predictor(), predictor(cls=nnUNetPredictor)
    ours.perform_everything_on_device = True  # as on a GPU
    calls, original = [], ours._accumulate

    def accumulate(data, slicers, results_device):
        calls.append(results_device)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(data, slicers, results_device)

    ours._accumulate = accumulate
    x = torch.randn(2, 21, 50, 37, generator=torch.Generator().manual_seed(6))
    assert torch.equal(ours.predict_sliding_window_return_logits(x), theirs.predict_sliding_window_return_logits(x))
    assert len(calls) == 2  # the device attempt, then the host one
    assert capsys.readouterr().out.count("Moving results arrays to CPU") == 1


@pytest.mark.parametrize("folds", [1, 2])
def test_weights_are_loaded_only_when_the_fold_changes(images, tmp_path, folds):
    """One fold: loaded once for the whole folder (nnU-Net reloads it for every case; the folded copy of a
    fast network would be rebuilt each time); several: each fold for each case, as they alternate."""
    p = predictor(folds=folds)
    loads, original = [], p.network.load_state_dict
    p.network.load_state_dict = lambda sd, *a, **k: loads.append(1) or original(sd, *a, **k)
    p.predict_folder(str(images), str(tmp_path / "ours"))
    assert len(loads) == (1 if folds == 1 else 3 * folds)
