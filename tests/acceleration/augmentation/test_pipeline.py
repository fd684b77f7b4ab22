"""The device pipeline as a whole: nnU-Net's transforms translated step by step (or refused, naming
what cannot run), and the whole pipeline against nnU-Net's on the same inputs: shapes and dtypes
exactly, every step's output statistics within their standard errors (``cli/augment_check``)."""

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform  # noqa: E402
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms  # noqa: E402
from batchgeneratorsv2.transforms.utils.random import RandomTransform  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

from nnunetv2_mobilevim.acceleration.augmentation.pipeline import DeviceAugmentation  # noqa: E402
from nnunetv2_mobilevim.acceleration.augmentation.sampling import Untranslatable  # noqa: E402
from nnunetv2_mobilevim.cli.augment_check import check_transforms  # noqa: E402

ROTATION_3D = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)


def nnunet_transforms(patch=(24, 28, 20), dummy_2d=False, ds=True, regions=None, ignore_label=None,
                      mask=None, cascaded=False):
    """nnU-Net 2.8's training transforms, built by its own static method."""
    dim = len(patch)
    scales = [[1.0] * dim, [0.5] * dim, [0.25] * dim] if ds else None
    rotation = (-np.pi, np.pi) if dummy_2d or dim == 2 else ROTATION_3D
    return nnUNetTrainer.get_training_transforms(
        list(patch), rotation, scales, tuple(range(dim)), dummy_2d, use_mask_for_norm=mask, is_cascaded=cascaded,
        foreground_labels=[1, 2], regions=regions, ignore_label=ignore_label)


def test_nnunets_3d_transforms_translate_in_order():
    pipeline = DeviceAugmentation.from_nnunet(nnunet_transforms(mask=[True]))
    assert [s.name for s in pipeline.steps] == [
        "SpatialTransform", "GaussianNoiseTransform", "GaussianBlurTransform", "MultiplicativeBrightnessTransform",
        "ContrastTransform", "SimulateLowResolutionTransform", "GammaTransform", "GammaTransform",
        "MirrorTransform", "MaskImageTransform", "RemoveLabelTransform", "DownsampleSegForDSTransform"]
    assert [s.probability for s in pipeline.steps][:8] == [1.0, 0.1, 0.2, 0.15, 0.15, 0.25, 0.1, 0.3]


def test_dummy_2d_regions_and_2d_translate():
    names = [s.name for s in DeviceAugmentation.from_nnunet(nnunet_transforms(dummy_2d=True)).steps]
    assert names[0] == "SpatialTransform (dummy 2D)" and "Convert3DTo2DTransform" not in names
    names = [s.name for s in DeviceAugmentation.from_nnunet(
        nnunet_transforms(regions=[[1, 2], [2]], ignore_label=3)).steps]
    assert "ConvertSegmentationToRegionsTransform" in names
    assert DeviceAugmentation.from_nnunet(nnunet_transforms(patch=(40, 36))).steps[0].name == "SpatialTransform"


def test_what_cannot_run_on_the_device_is_named_not_dropped():
    with pytest.raises(Untranslatable) as err:
        DeviceAugmentation.from_nnunet(nnunet_transforms(cascaded=True))
    message = str(err.value)
    for name in ("MoveSegAsOneHotToDataTransform", "ApplyRandomBinaryOperatorTransform",
                 "RemoveRandomConnectedComponentFromOneHotEncodingTransform"):
        assert name in message

    class LouderNoise(GaussianNoiseTransform):  # a trainer's own variant: may behave differently
        pass

    custom = ComposeTransforms([RandomTransform(LouderNoise((0, 0.1)), 0.5),
                                RandomTransform(MirrorTransform((0, 1, 2)), 0.5)])
    with pytest.raises(Untranslatable) as err:
        DeviceAugmentation.from_nnunet(custom)
    assert "LouderNoise" in str(err.value) and "MirrorTransform" in str(err.value)


def _inputs(patch_in=(34, 38, 30), channels=2, labels=(0, 1, 2), cases=2, seed=0):
    """Two cases as nnU-Net's loader crops them: a smooth image with structure, blobs as labels, and a
    margin of -1 (outside the image) on one side."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in patch_in], indexing="ij")
    radius = sum(x ** 2 for x in grids).sqrt()
    image = torch.stack([torch.stack([torch.cos(3 * radius + c + b) + 0.1 * torch.randn(patch_in, generator=g)
                                      for c in range(channels)]) for b in range(cases)]).float()
    seg = torch.zeros(cases, 1, *patch_in, dtype=torch.int16)
    seg[:, 0][:, radius < 0.7] = labels[1]
    seg[:, 0][:, radius < 0.35] = labels[2]
    seg[:, :, :3] = -1
    return image, seg


def test_whole_pipeline_output_has_nnunets_shapes_and_dtypes():
    transforms = nnunet_transforms(regions=[[1, 2], [2]], ignore_label=3)
    image, seg = _inputs()
    ours = DeviceAugmentation.from_nnunet(transforms)(image.clone(), seg.clone())
    theirs = [transforms(image=image[b].clone(), segmentation=seg[b].clone()) for b in range(2)]
    assert ours[0].shape == (2, 2, 24, 28, 20) and ours[0].dtype == torch.float32
    assert [t.shape[1:] for t in ours[1]] == [t.shape for t in theirs[0]["segmentation"]]
    assert [t.dtype for t in ours[1]] == [t.dtype for t in theirs[0]["segmentation"]] == [torch.bool] * 3


@pytest.mark.parametrize("dummy_2d", [False, True])
def test_every_step_agrees_with_nnunet_in_distribution(dummy_2d):
    """augment-check's comparison on the CPU: every step's output statistics (draws x cases) within
    4.5 standard errors of nnU-Net's, deterministic steps equal, application rates within 4.5 binomial
    standard errors."""
    torch.manual_seed(0)
    np.random.seed(0)
    image, seg = _inputs(patch_in=(24, 28, 22))
    transforms = nnunet_transforms(patch=(16, 20, 16), dummy_2d=dummy_2d, mask=[True, False])
    entries, _ = check_transforms(transforms, image, seg, draws=32, device=torch.device("cpu"))
    failures = [(e["transform"], d) for e in entries for d in e["details"] if not d["ok"]]
    assert len(entries) == 12 and not failures, failures
