"""The label-side steps of the device augmentation against batchgeneratorsv2's transforms, which
nnU-Net 2.8 runs per sample: exact for the same parameters, and the mirror draws' distribution."""

import pytest
import torch

bgv2 = pytest.importorskip("batchgeneratorsv2")
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform  # noqa: E402
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform  # noqa: E402

from nnunetv2_mobilevim.acceleration.augmentation.labels import (  # noqa: E402
    DeviceDeepSupervisionTargets,
    DeviceMaskImage,
    DeviceMirror,
    DeviceRegions,
    DeviceRemoveLabel,
)


def _batch(spatial=(9, 10, 11), channels=2, labels=(-1, 0, 1, 2, 3), batch=3):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(batch, channels, *spatial, generator=g)
    values = torch.tensor(labels, dtype=torch.int16)
    seg = values[torch.randint(len(labels), (batch, 1, *spatial), generator=g)]
    return image, seg


def _per_sample(transform, image, seg, **params):
    """nnU-Net's way: the transform on each sample separately, stacked."""
    outs = [transform.apply({"image": image[b].clone(), "segmentation": seg[b].clone()}, **params)
            for b in range(image.shape[0])]
    segs = [o["segmentation"] for o in outs]
    seg_out = [torch.stack(s) for s in zip(*segs)] if isinstance(segs[0], list) else torch.stack(segs)
    return torch.stack([o["image"] for o in outs]), seg_out


@pytest.mark.parametrize("spatial", [(9, 10, 11), (12, 7)])
def test_mirror_equals_nnunets_flips(spatial):
    image, seg = _batch(spatial)
    axes = tuple(range(len(spatial)))
    ours = DeviceMirror(axes)
    flips = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])[:, :len(axes)]
    got_image, got_seg = ours.apply(image, seg, flips)
    ref = MirrorTransform(axes)
    for b in range(image.shape[0]):
        chosen = [a for a, f in zip(axes, flips[b]) if f]
        expected = ref.apply({"image": image[b], "segmentation": seg[b]}, axes=chosen)
        assert torch.equal(got_image[b], expected["image"]) and torch.equal(got_seg[b], expected["segmentation"])


def test_mirror_draws_each_axis_independently_with_probability_one_half():
    torch.manual_seed(0)
    flips = DeviceMirror((0, 1, 2)).draw(torch.empty(20000, 1, 1, 1, 1)).float()
    # binomial standard deviation of a mean of 20000 draws: 0.0035; 5 of them
    assert (flips.mean(0) - 0.5).abs().max() < 0.018
    assert abs((flips[:, 0] * flips[:, 1]).mean() - 0.25) < 0.016  # independent axes
    ref = MirrorTransform((0, 1, 2))
    counts = torch.zeros(3)
    for _ in range(4000):
        for a in ref.get_parameters()["axes"]:
            counts[a] += 1
    assert (counts / 4000 - 0.5).abs().max() < 0.04  # nnU-Net's draws: the same probability


def test_mask_outside_the_normalisation_mask_equals_nnunets():
    image, seg = _batch()
    for channels in ([0], [0, 1], []):
        got, _ = DeviceMaskImage(channels, 0, 0.0)(image.clone(), seg)
        expected, _ = _per_sample(MaskImageTransform(channels, 0, 0), image, seg)
        assert torch.equal(got, expected)
    assert torch.equal(DeviceMaskImage([1])(image.clone(), seg)[0][:, 0], image[:, 0])  # channel 0 untouched


def test_remove_label_equals_nnunets():
    image, seg = _batch()
    _, got = DeviceRemoveLabel(-1, 0)(image, seg.clone())
    _, expected = _per_sample(RemoveLabelTransform(-1, 0), image, seg)
    assert torch.equal(got, expected) and not (got == -1).any() and got.dtype == seg.dtype


def test_regions_with_the_ignore_label_equal_nnunets():
    image, seg = _batch(labels=(0, 1, 2, 3, 4))
    regions = [[1, 2, 3], [2, 3], 3, 4]  # nnU-Net appends the ignore label (here 4) as the last region
    ref = ConvertSegmentationToRegionsTransform(regions, 0)
    ours = DeviceRegions.from_nnunet(ref)
    _, got = ours(image, seg)
    _, expected = _per_sample(ref, image, seg)
    assert got.dtype == torch.bool and got.shape == (3, 4, 9, 10, 11)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("scales", [
    [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [0.125, 0.125, 0.125]],
    [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]],  # anisotropic, as nnU-Net plans it
    [1, 0.5, 0.25],
])
def test_deep_supervision_targets_equal_nnunets(scales):
    image, seg = _batch(spatial=(16, 20, 24), labels=(0, 1, 2))
    ref = DownsampleSegForDSTransform(scales)
    _, got = DeviceDeepSupervisionTargets.from_nnunet(ref)(image, seg)
    _, expected = _per_sample(ref, image, seg)
    assert len(got) == len(expected) == len(scales)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_deep_supervision_targets_of_regions_stay_bool():
    image, seg = _batch(spatial=(8, 8, 8), labels=(0, 1))
    _, got = DeviceDeepSupervisionTargets([1, 0.5])(image, seg.bool())
    assert [t.dtype for t in got] == [torch.bool, torch.bool] and got[1].shape == (3, 1, 4, 4, 4)
