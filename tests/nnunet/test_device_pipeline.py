"""``nnunet.device_pipeline`` and ``Predictor.predict_folder`` against nnU-Net 2.8's own code (CPU).

Preprocessing is compared with ``DefaultPreprocessor.run_case_npy`` and the export with
``convert_predicted_logits_to_segmentation_with_correct_shape`` on synthetic cases built to exercise
each step: a zero border to crop, a hole inside the body (the filled non-zero mask), a spacing away
from the plan's (resampling both ways), an anisotropic case (separate-z), a transposed plan, every
normalisation scheme nnU-Net ships, regions, and the 2d configuration.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_mobilevim.nnunet.device_pipeline import DevicePipeline, unsupported

INTENSITY = {"max": 900.0, "mean": 120.0, "median": 100.0, "min": -1000.0, "percentile_00_5": -950.0,
             "percentile_99_5": 700.0, "std": 180.0}
CONFIG = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
          "patch_size": [16, 24, 24], "median_image_size_in_voxels": [20.0, 40.0, 40.0], "spacing": [2.5, 0.8, 0.8],
          "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
          "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
          "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
          "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
          "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
          "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
          "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
          "batch_dice": False}
PLANS = {"dataset_name": "Dataset999_Test", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp":
         [2.5, 0.8, 0.8], "original_median_shape_after_transp": [20, 40, 40], "image_reader_writer": "SimpleITKIO",
         "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used":
         "ExperimentPlanner", "label_manager": "LabelManager",
         "foreground_intensity_properties_per_channel": {"0": INTENSITY, "1": INTENSITY},
         "configurations": {"3d_fullres": CONFIG}}
LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}


def plans(schemes=("CTNormalization", "CTNormalization"), mask=(False, False), transpose=(0, 1, 2),
          spacing=(2.5, 0.8, 0.8),
          configuration="3d_fullres"):
    p = copy.deepcopy(PLANS)
    c = p["configurations"]["3d_fullres"]
    c.update(normalization_schemes=list(schemes), use_mask_for_norm=list(mask), spacing=list(spacing))
    p["transpose_forward"] = list(transpose)
    p["transpose_backward"] = [int(i) for i in np.argsort(transpose)]
    if configuration == "2d":
        p["configurations"]["2d"] = {**copy.deepcopy(c), "spacing": list(spacing[1:]), "patch_size": [24, 24]}
    pm = PlansManager(p)
    return pm, pm.get_configuration(configuration)


def case(shape=(2, 18, 44, 38), seed=0):
    """A CT-like image (C, Z, Y, X as a reader returns it): air, a body with organs, a zero border, and
    a hole (zeros) inside the body."""
    rng = np.random.default_rng(seed)
    x = np.full(shape, -1000.0, dtype=np.float32)
    z, y, w = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape[1:]], indexing="ij")
    body = (y / 0.8) ** 2 + (w / 0.7) ** 2 < 1
    x[:, body] = 40 + 30 * rng.normal(size=(shape[0], int(body.sum())))
    x[:, (y / 0.3) ** 2 + ((w - 0.2) / 0.2) ** 2 + z ** 2 < 0.5] = 700
    x[:, :, :3] = 0  # the scanner's field of view: a zero border to crop
    x[:, :, :, -4:] = 0
    x[1] = x[1] * 0.5 + 10 * rng.normal(size=x.shape[1:])  # channel 1 differs
    x[1, :, :3] = 0
    x[1, :, :, -4:] = 0
    x[:, (np.abs(y) < 0.1) & (np.abs(w + 0.3) < 0.1) & (np.abs(z) < 0.5)] = 0  # a hole inside the body
    return x, {"spacing": [2.9, 0.71, 0.93]}


def nnunet_preprocess(pm, cm, image, props):
    data, _, props = DefaultPreprocessor(verbose=False).run_case_npy(image, None, props, pm, cm, {"labels": LABELS})
    return data, props


SCHEMES = [
    (("CTNormalization", "CTNormalization"), (False, False)),
    (("ZScoreNormalization", "ZScoreNormalization"), (False, False)),
    (("ZScoreNormalization", "CTNormalization"), (True, False)),  # z-score inside the filled non-zero mask
    (("RescaleTo01Normalization", "NoNormalization"), (False, False)),
]


@pytest.mark.parametrize("schemes,mask", SCHEMES)
@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
def test_device_preprocessing_equals_nnunets(schemes, mask, transpose):
    pm, cm = plans(schemes, mask, transpose)
    image, props = case()
    ref, ref_props = nnunet_preprocess(pm, cm, image, copy.deepcopy(props))
    ours_props = copy.deepcopy(props)
    ours = DevicePipeline(pm, cm, {"labels": LABELS}, torch.device("cpu")).preprocess(image, ours_props)
    assert tuple(ours.shape) == ref.shape
    for key in ("shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling"):
        assert list(np.ravel(ours_props[key])) == list(np.ravel(ref_props[key])), key
    assert ref_props["bbox_used_for_cropping"] != [[0, s] for s in ref_props["shape_before_cropping"]]  # it cropped
    assert np.abs(ours.numpy() - ref).max() <= 3e-6 * max(1.0, np.abs(ref).max())


def test_device_preprocessing_runs_other_schemes_with_nnunets_class():
    """A scheme without a device implementation (here nnU-Net's RGBTo01Normalization) runs nnU-Net's class."""
    pm, cm = plans(("RGBTo01Normalization", "CTNormalization"), (False, False))
    image, props = case()
    image[0] = np.clip(np.abs(image[0]) / 4, 0, 255)
    ref, _ = nnunet_preprocess(pm, cm, image, copy.deepcopy(props))
    ours = DevicePipeline(pm, cm, {"labels": LABELS}, torch.device("cpu")).preprocess(image, copy.deepcopy(props))
    assert np.abs(ours.numpy() - ref).max() <= 3e-6 * np.abs(ref).max()


def test_device_preprocessing_2d_configuration_keeps_the_slice_spacing():
    pm, cm = plans(configuration="2d")
    image, props = case()
    ref, _ = nnunet_preprocess(pm, cm, image, copy.deepcopy(props))
    ours = DevicePipeline(pm, cm, {"labels": LABELS}, torch.device("cpu")).preprocess(image, copy.deepcopy(props))
    assert tuple(ours.shape) == ref.shape and ours.shape[1] == image.shape[1]
    assert np.abs(ours.numpy() - ref).max() <= 3e-6 * np.abs(ref).max()


def _logits(shape, classes, seed=0) -> torch.Tensor:
    """Smooth float16 logits (K, *shape) as a sliding window returns them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, classes, *[max(2, s // 4) for s in shape], generator=g)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")[0].mul(4).half()


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
@pytest.mark.parametrize("probabilities", [False, True])
def test_device_export_equals_nnunets(transpose, probabilities):
    pm, cm = plans(transpose=transpose)
    image, props = case()
    pipeline = DevicePipeline(pm, cm, {"labels": LABELS}, torch.device("cpu"))
    data = pipeline.preprocess(image, props)
    logits = _logits(data.shape[1:], len(LABELS))
    lm = pm.get_label_manager({"labels": LABELS})
    ref = convert_predicted_logits_to_segmentation_with_correct_shape(logits.clone(), pm, cm, lm, copy.deepcopy(props),
                                                                      return_probabilities=probabilities)
    seg, probs = pipeline.export(logits.clone(), copy.deepcopy(props), probabilities)
    ref_seg, ref_probs = ref if probabilities else (ref, None)
    assert seg.shape == image.shape[1:] and seg.shape == ref_seg.shape and seg.dtype == ref_seg.dtype == np.uint8
    assert (seg != ref_seg).mean() <= 1e-3  # float16 rounding of the resampled logits may flip a near tie
    assert set(np.unique(seg)) == set(np.unique(ref_seg)) and len(np.unique(seg)) == len(LABELS)
    if probabilities:
        assert probs.shape == ref_probs.shape and probs.dtype == ref_probs.dtype == np.float32
        assert np.abs(probs - ref_probs).max() <= 1e-3  # one float16 step of a logit
        assert np.abs(probs - ref_probs).mean() <= 1e-6


def test_device_export_regions_equals_nnunets():
    labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    dataset_json = {"labels": labels, "regions_class_order": [1, 2, 3]}
    pm, cm = plans()
    image, props = case()
    pipeline = DevicePipeline(pm, cm, dataset_json, torch.device("cpu"))
    data = pipeline.preprocess(image, props)
    logits = _logits(data.shape[1:], 3, seed=1)
    lm = pm.get_label_manager(dataset_json)
    ref_seg, ref_probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.clone(), pm, cm, lm, copy.deepcopy(props), return_probabilities=True)
    seg, probs = pipeline.export(logits.clone(), copy.deepcopy(props), True)
    assert (seg != np.asarray(ref_seg)).mean() <= 1e-3 and len(np.unique(seg)) == 4
    assert np.abs(probs - ref_probs).max() <= 1e-3


def test_device_pipeline_says_what_it_cannot_reproduce():
    pm, cm = plans()
    assert unsupported(pm, cm) is None
    p = copy.deepcopy(PLANS)
    p["configurations"]["3d_fullres"]["resampling_fn_data"] = "resample_torch_fornnunet"
    pm2 = PlansManager(p)
    reason = unsupported(pm2, pm2.get_configuration("3d_fullres"))
    assert reason is not None and "resample_torch_fornnunet" in reason
    with pytest.raises(ValueError, match="cannot reproduce"):
        DevicePipeline(pm2, pm2.get_configuration("3d_fullres"), {"labels": LABELS}, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("schemes,mask", SCHEMES[1:3])
def test_device_pipeline_on_cuda_equals_nnunets(schemes, mask):
    pm, cm = plans(schemes, mask, (2, 0, 1))
    image, props = case()
    ref, ref_props = nnunet_preprocess(pm, cm, image, copy.deepcopy(props))
    pipeline = DevicePipeline(pm, cm, {"labels": LABELS}, torch.device("cuda"))
    ours = pipeline.preprocess(image, props)
    assert ours.is_cuda and np.abs(ours.cpu().numpy() - ref).max() <= 3e-6 * np.abs(ref).max()
    logits = _logits(ours.shape[1:], len(LABELS))
    lm = pm.get_label_manager({"labels": LABELS})
    ref_seg, ref_probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.clone(), pm, cm, lm, copy.deepcopy(ref_props), return_probabilities=True)
    seg, probs = pipeline.export(logits.cuda(), props, True)
    assert (seg != ref_seg).mean() <= 1e-3 and np.abs(probs - ref_probs).max() <= 1e-3
