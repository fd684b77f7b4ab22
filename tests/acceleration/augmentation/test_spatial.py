"""DeviceSpatial against batchgeneratorsv2's SpatialTransform (nnU-Net's spatial augmentation), on the CPU.

Exactness: for the same per-sample grid our batched resampling equals batchgeneratorsv2's, sample by sample
(image to 1e-5 (in practice bit for bit), segmentation exactly), and our grid equals the one batchgeneratorsv2's
``get_parameters`` builds from the same angles / scales / offsets / centre (bit for bit). Unrotated, unscaled,
undeformed samples equal nnU-Net's crop exactly. Distributions of the draws and of the outputs are compared
with two-sample KS tests (p > 1e-3) and binomial tolerances (4.5 standard errors).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from scipy import stats
from scipy.ndimage import fourier_gaussian

from nnunetv2_mobilevim.acceleration.augmentation.sampling import Untranslatable
from nnunetv2_mobilevim.acceleration.augmentation.spatial import DeviceSpatial, SpatialParams, smooth_offsets

# nnUNetTrainer.get_training_transforms' SpatialTransform (rotation is the trainer's rotation_for_DA)
NNUNET = dict(patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0, p_rotation=0.2,
              p_scaling=0.2, scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
              border_mode_seg="constant", padding_value_seg=-1)
# nnUNetTrainerDA5's: per-axis rotation coins, unsynchronised scaling
DA5 = dict(NNUNET, p_rotation=0.4, p_rot_per_axis=0.5, scaling=(0.7, 1.43), p_synchronize_scaling_across_axes=0)
# everything switched on (elastic deformation as batchgeneratorsv2 offers it), used for the exactness tests
FULL = dict(NNUNET, p_elastic_deform=1, elastic_deform_scale=(0.05, 0.2), elastic_deform_magnitude=(1, 4),
            p_synchronize_def_scale_across_axes=0.5, p_rotation=1, rotation=(-math.pi / 4, math.pi / 4),
            p_rot_per_axis=0.8, p_scaling=1, scaling=(0.6, 1.3), p_synchronize_scaling_across_axes=0.5)

SHAPES = {3: ((23, 26, 29), (16, 19, 22)), 2: ((45, 50), (32, 37))}  # input ("initial patch size"), patch
ALPHA = 1e-3  # KS p-value floor
Z = 4.5  # binomial tolerance in standard errors


def blocky_seg(batch: int, channels: int, shape, labels, block: int = 5) -> torch.Tensor:
    """(B, Cs, *S) int16 labels constant on blocks: straight boundaries, so grids at half-pixel offsets hit
    exact ties between two labels (which seg_tiebreak settles)."""
    coarse = torch.randint(0, len(labels), (batch, channels, *[-(-s // block) for s in shape])).float()
    idx = F.interpolate(coarse, size=tuple(shape), mode="nearest").long()
    return torch.tensor(labels, dtype=torch.int16)[idx]


def force(p: SpatialParams, rot, scale, deform) -> SpatialParams:
    """Params drawn with every coin at 1, reduced to the given per-sample choice of transforms."""
    rot, scale, deform = (torch.tensor(v, dtype=torch.bool) for v in (rot, scale, deform))
    return p._replace(do_rotation=rot, do_scaling=scale, do_deform=deform,
                      angles=torch.where(rot[:, None], p.angles, 0.0),
                      scales=torch.where(scale[:, None], p.scales, 1.0))


def bgv2_apply(bg: SpatialTransform, ds: DeviceSpatial, p: SpatialParams, image, seg):
    """batchgeneratorsv2's resampling of every sample with our grid / centre (grid None: its crop path)."""
    grid = ds.grid(p, image.shape[2:])
    imgs, segs = [], []
    for b in range(image.shape[0]):
        params = dict(grid=grid[b] if p.transformed[b] else None,
                      center_location_in_pixels=p.centers[b].tolist())
        imgs.append(bg._apply_to_image(image[b], **params))
        segs.append(bg._apply_to_segmentation(seg[b], **params))
    return torch.stack(imgs), torch.stack(segs)


def bgv2_with_our_draws(kwargs: dict, p: SpatialParams, b: int) -> SpatialTransform:
    """A SpatialTransform whose get_parameters draws exactly sample b's coins, angles, scales and elastic
    scales / magnitudes of ``p`` (its elastic noise and random-crop centre stay its own)."""
    angles, scales = p.angles[b].tolist(), p.scales[b].tolist()
    kw = dict(kwargs, p_rotation=float(p.do_rotation[b]), p_rot_per_axis=1, p_scaling=float(p.do_scaling[b]),
              p_synchronize_scaling_across_axes=0, p_elastic_deform=float(p.do_deform[b]),
              rotation=lambda image, dim: angles[dim] if len(angles) > 1 else angles[0],
              scaling=lambda image, dim: scales[dim])
    if p.deform_scales is not None:
        dsc, mag = p.deform_scales[b].tolist(), p.deform_magnitudes[b].tolist()
        kw.update(p_synchronize_def_scale_across_axes=0,
                  elastic_deform_scale=lambda image, dim, patch_size: dsc[dim],
                  elastic_deform_magnitude=lambda image, dim, patch_size, deformation_scale: mag[dim])
    return SpatialTransform(**kw)


def expanded(batch: int, shape) -> torch.Tensor:
    """A (B, 1, *S) image without memory, for draws (which only read the shape)."""
    return torch.zeros(1, 1, *shape).expand(batch, 1, *shape)


def binomial_close(k1: int, k2: int, n1: int, n2: int = 0) -> bool:
    """k1 of n1 and k2 of n2 (default n1) successes agree within Z standard errors of the difference."""
    n2 = n2 or n1
    p = (k1 + k2) / (n1 + n2)
    return abs(k1 / n1 - k2 / n2) <= Z * math.sqrt(max(p * (1 - p), 1 / (n1 + n2)) * (1 / n1 + 1 / n2))


# ---------------------------------------------------------------------------------------------------------
# exactness


PATTERN = dict(  # per sample: rotated, scaled, deformed
    rot=[0, 1, 0, 0, 1, 1, 1, 0],
    scale=[0, 0, 1, 0, 1, 1, 0, 1],
    deform=[0, 0, 0, 1, 0, 1, 0, 0],
)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("mode_seg,tiebreak,border,mode_image,padding_image", [
    ("bilinear", "nearest", "constant", "bilinear", "zeros"),  # nnU-Net
    ("bilinear", "lowest", "constant", "bilinear", "zeros"),
    ("bilinear", "highest", "zeros", "bilinear", "constant"),
    ("nearest", "nearest", "constant", "nearest", "zeros"),  # nnUNetTrainerDAOrd0
])
def test_apply_matches_bgv2_for_the_same_grid(dim, mode_seg, tiebreak, border, mode_image, padding_image):
    """Image within 1e-5 (observed: bit for bit), segmentation exactly, sample by sample, for every
    combination of rotation / scaling / deformation and the untransformed crop, with grids that reach outside
    the input and grids that do not."""
    shape, patch = SHAPES[dim]
    kw = dict(FULL, patch_size=patch, mode_seg=mode_seg, seg_tiebreak=tiebreak, border_mode_seg=border,
              mode_image=mode_image, padding_mode_image=padding_image, padding_value_image=-2.5)
    ds, bg = DeviceSpatial(**kw), SpatialTransform(**kw)
    batch = len(PATTERN["rot"])
    image = torch.randn(batch, 2, *shape)
    seg = blocky_seg(batch, 2, shape, [0, 1, 2, 4])
    seg[1, :, :4] = -1  # nnU-Net's loader pads with -1 inside the initial patch
    p = force(ds.draw(image), **PATTERN)
    sample = torch.arange(batch)[:, None]
    p = p._replace(angles=torch.where(sample == 6, 0.0, torch.where(sample == 4, 0.75, p.angles)),  # 6: by 0
                   scales=torch.where(sample == 7, 0.55, torch.where(sample == 4, 1.2, p.scales)))  # 7: zoomed in
    out_img, out_seg = ds.apply(image, seg, p)
    ref_img, ref_seg = bgv2_apply(bg, ds, p, image, seg)
    assert out_img.shape == (batch, 2, *patch) and out_seg.shape == (batch, 2, *patch)
    assert out_seg.dtype == torch.int16
    assert (out_img - ref_img).abs().max() <= 1e-5
    assert torch.equal(out_seg, ref_seg)
    reach = ds._reaches_outside(ds.grid(p, shape), shape)
    assert reach[4] and not reach[7]  # the padding label took part in some samples, not in others


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("random_crop", [False, True])
def test_grid_matches_bgv2_get_parameters(dim, random_crop):
    """Our grid from the same angles, scales, elastic offsets and centre equals the grid batchgeneratorsv2's
    get_parameters builds (bit for bit), and the whole pipeline then gives its outputs (image 1e-5, labels
    exact). Catches any difference in matrix convention, composition order, axis order or centring."""
    shape, patch = SHAPES[dim]
    kw = dict(FULL, patch_size=patch, random_crop=random_crop, patch_center_dist_from_border=[9, 12, 14][:dim],
              p_elastic_deform=0.6, rotation=(-math.pi, math.pi))
    ds = DeviceSpatial(**kw)
    batch = 8
    image = torch.randn(batch, 1, *shape)
    seg = blocky_seg(batch, 1, shape, [0, 1, 3])
    p = ds.draw(image)
    np.random.seed(0)
    offsets, centers, ref_imgs, ref_segs, ref_grids = [], [], [], [], []
    for b in range(batch):
        bg = bgv2_with_our_draws(kw, p, b)
        params = bg.get_parameters(image=image[b])
        eo = params["elastic_offsets"]
        offsets.append(torch.zeros(*patch, dim) if eo is None else eo)
        centers.append(params["center_location_in_pixels"])
        ref_grids.append(params["grid"])
        ref_imgs.append(bg._apply_to_image(image[b], **params))
        ref_segs.append(bg._apply_to_segmentation(seg[b], **params))
    p = p._replace(offsets=torch.stack(offsets), centers=torch.tensor(centers, dtype=torch.float64))
    grid = ds.grid(p, shape)
    assert p.transformed.sum() >= 5
    for b in range(batch):
        assert (ref_grids[b] is None) == (not p.transformed[b])
        if ref_grids[b] is not None:
            assert torch.equal(grid[b], ref_grids[b]), f"sample {b}: {(grid[b] - ref_grids[b]).abs().max()}"
    out_img, out_seg = ds.apply(image, seg, p)
    assert (out_img - torch.stack(ref_imgs)).abs().max() <= 1e-5
    assert torch.equal(out_seg, torch.stack(ref_segs))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("random_crop", [False, True])
def test_untransformed_sample_is_nnunet_crop(dim, random_crop):
    """Neither rotated, scaled nor deformed: exactly crop_tensor at floor(centre) with its padding (image 0,
    labels -1), also for centres near the border (random_crop) and an input smaller than the patch."""
    shape, patch = SHAPES[dim]
    shape = (patch[0] - 3, *shape[1:])  # first axis too short: padded on both sides
    kw = dict(NNUNET, patch_size=patch, p_rotation=0, p_scaling=0, random_crop=random_crop)
    ds, bg = DeviceSpatial(**kw), SpatialTransform(**kw)
    image = torch.randn(6, 2, *shape)
    seg = blocky_seg(6, 1, shape, [0, 1, 2])
    p = ds.draw(image)
    assert not p.transformed.any()
    out_img, out_seg = ds.apply(image, seg, p)
    ref_img, ref_seg = bgv2_apply(bg, ds, p, image, seg)
    assert (out_img - ref_img).abs().max() <= 1e-6  # a gather: in fact bit for bit
    assert torch.equal(out_img, ref_img) and torch.equal(out_seg, ref_seg)
    assert (out_seg == -1).any() and (out_img == 0).any()  # padding was exercised


def _crafted(dim: int):
    """A batch whose samples / channels have different label sets, some reaching outside, some not."""
    shape, patch = SHAPES[dim]
    batch = 7
    seg = blocky_seg(batch, 2, shape, [0, 1, 2, 3])
    seg[0] = 0  # one label, grid inside: that label everywhere
    seg[1] = 0  # one label, grid reaching outside: two labels {-1, 0}
    seg[2] = seg[2] % 2  # {0, 1}
    seg[4, :, :6] = -1  # -1 inside the input, grid inside: -1 resampled as a plain label
    seg[5] = seg[5] * 2 + 1  # {1, 3, 5, 7}
    seg[6, 1] = seg[6, 1].clamp(max=1) + 5  # second channel {5, 6}
    n = 3 if dim == 3 else 1
    angles = torch.zeros(batch, n)
    angles[1] = angles[3] = angles[5] = 0.7
    angles[6, -1] = math.pi / 2  # a quarter turn: near-exact ties
    scales = torch.ones(batch, dim)
    scales[0] = scales[2] = scales[4] = 0.6  # zoomed in: stays inside
    scales[1] = 1.3  # zoomed out and rotated: well outside
    true = torch.ones(batch, dtype=torch.bool)
    p = SpatialParams(true, true, torch.zeros(batch, dtype=torch.bool), angles, scales, None, None, None,
                      torch.tensor(shape, dtype=torch.float32).expand(batch, dim) / 2)
    return shape, patch, seg, p


@pytest.mark.parametrize("dim", [2, 3])
def test_label_sets_differ_between_samples(dim):
    """The batch-wide label set with per-(sample, channel) presence gives every sample the result of its own
    label set, including the 1- and 2-label rules and the padding label entering only for samples whose grid
    reaches outside: equal to batchgeneratorsv2 per sample and to our own single-sample runs, exactly."""
    shape, patch, seg, p = _crafted(dim)
    kw = dict(NNUNET, patch_size=patch)
    ds, bg = DeviceSpatial(**kw), SpatialTransform(**kw)
    image = torch.randn(seg.shape[0], 1, *shape)
    grid = ds.grid(p, shape)
    reach = ds._reaches_outside(grid, shape)
    assert reach.tolist() == [False, True, False, True, False, True, False]
    _, out_seg = ds.apply(image, seg, p)
    _, ref_seg = bgv2_apply(bg, ds, p, image, seg)
    assert torch.equal(out_seg, ref_seg)
    assert (out_seg[0] == 0).all() and set(out_seg[1].unique().tolist()) == {-1, 0}
    for b in range(seg.shape[0]):
        one = p._replace(**{k: getattr(p, k)[b:b + 1] for k in ("do_rotation", "do_scaling", "do_deform",
                                                                "angles", "scales", "centers")})
        assert torch.equal(ds.apply(image[b:b + 1], seg[b:b + 1], one)[1][0], out_seg[b])
    # the tie-break is exercised: settling ties with the lowest label instead changes the result
    lowest = SpatialTransform(**kw, seg_tiebreak="lowest")
    _, low_seg = bgv2_apply(lowest, ds, p, image, seg)
    assert not torch.equal(low_seg, ref_seg)


def test_dummy_2d_matches_bgv2():
    """Convert3DTo2D + 2D SpatialTransform + Convert2DTo3D: one 2D draw per sample for all its slices; each
    slice (with its own label set) resampled as batchgeneratorsv2 does, image 1e-5, labels exactly."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    patch3d = (6, 32, 37)
    compose = nnUNetTrainer.get_training_transforms(patch3d, (-math.pi, math.pi), None, (1, 2), True)
    names = [type(t).__name__ for t in compose.transforms[:3]]
    assert names == ["Convert3DTo2DTransform", "SpatialTransform", "Convert2DTo3DTransform"]
    nnunet_sp = compose.transforms[1]
    ds = DeviceSpatial.from_nnunet(nnunet_sp, dummy_2d=True)
    assert ds.patch_size == (32, 37) and ds.dummy_2d and ds.p_rotation == 0.2

    kw = dict(FULL, patch_size=(32, 37), rotation=(-math.pi, math.pi))
    ds, bg = DeviceSpatial(**kw, dummy_2d=True), SpatialTransform(**kw)
    shape = (6, 45, 50)
    batch = 8
    image = torch.randn(batch, 2, *shape)
    seg = blocky_seg(batch, 1, shape, [0, 1, 2, 3], block=7)
    seg[:, :, 0] = 1  # one slice with one label
    seg[:, :, 1] = seg[:, :, 1].clamp(max=1)  # one with two
    seg[:, :, 2, :5] = -1
    p = force(ds.draw(image), **PATTERN)
    assert p.angles.shape == (batch, 1) and p.offsets.shape == (batch, 32, 37, 2)
    out_img, out_seg = ds.apply(image, seg, p)
    assert out_img.shape == (batch, 2, 6, 32, 37) and out_seg.shape == (batch, 1, 6, 32, 37)
    grid = ds.grid(p, shape[1:])
    for b in range(batch):
        params = dict(grid=grid[b] if p.transformed[b] else None, center_location_in_pixels=p.centers[b].tolist())
        d = Convert3DTo2DTransform()(image=image[b].clone(), segmentation=seg[b].clone())
        d["image"] = bg._apply_to_image(d["image"], **params)
        d["segmentation"] = bg._apply_to_segmentation(d["segmentation"], **params)
        d = Convert2DTo3DTransform()(**d)
        assert (out_img[b] - d["image"]).abs().max() <= 1e-5
        assert torch.equal(out_seg[b], d["segmentation"]), b


# ---------------------------------------------------------------------------------------------------------
# distributions


def _euler(affine: np.ndarray):
    """(angles, scales) of batchgeneratorsv2's ``Rz @ Ry @ Rx @ S`` (3D, |angle about axis 1| < pi/2) or
    ``R @ S`` (2D)."""
    scales = np.linalg.norm(affine, axis=0)
    r = affine / scales
    if r.shape[0] == 2:
        return [math.atan2(r[1, 0], r[0, 0])], scales
    return [math.atan2(r[2, 1], r[2, 2]), math.asin(-r[2, 0]), math.atan2(r[1, 0], r[0, 0])], scales


@pytest.mark.parametrize("name,dim,rotation", [
    ("nnunet", 3, (-math.pi / 6, math.pi / 6)),
    ("da5", 3, (-math.pi / 6, math.pi / 6)),
    ("da5", 2, (-math.pi, math.pi)),
])
def test_rotation_scaling_distributions(name, dim, rotation):
    """2000 draws each: P(transformed), per axis P(rotated) and the angles, P(scaled), the scales and
    P(scaling synchronised across axes), against batchgeneratorsv2's get_parameters (angles and scales read
    back from its affine matrix). Binomial: 4.5 standard errors; KS: p > 1e-3."""
    n = 2000
    patch = (4,) * dim
    kw = dict(NNUNET if name == "nnunet" else DA5, patch_size=patch, rotation=rotation)
    ds, bg = DeviceSpatial(**kw), SpatialTransform(**kw)
    p = ds.draw(expanded(n, (6,) * dim))
    np.random.seed(0)
    ref = [bg.get_parameters(image=torch.zeros(1, *(6,) * dim)) for _ in range(n)]
    assert binomial_close(int(p.transformed.sum()), sum(r["grid"] is not None for r in ref), n)

    ref_angles = np.zeros((n, 3 if dim == 3 else 1))
    ref_scales = np.ones((n, dim))
    for i, r in enumerate(ref):
        if r["affine"] is not None:
            a, s = _euler(r["affine"])
            ref_angles[i], ref_scales[i] = a, s
    ours_angles, ours_scales = p.angles.numpy(), p.scales.numpy()
    for k in range(ours_angles.shape[1]):
        ours_rot, ref_rot = ours_angles[:, k] != 0, np.abs(ref_angles[:, k]) > 1e-9
        assert binomial_close(int(ours_rot.sum()), int(ref_rot.sum()), n), k
        assert stats.ks_2samp(ours_angles[ours_rot, k], ref_angles[ref_rot, k]).pvalue > ALPHA, k
    ours_scaled = (ours_scales != 1).any(1)
    ref_scaled = (np.abs(ref_scales - 1) > 1e-6).any(1)
    assert binomial_close(int(ours_scaled.sum()), int(ref_scaled.sum()), n)
    for k in range(dim):
        assert stats.ks_2samp(ours_scales[ours_scaled, k], ref_scales[ref_scaled, k]).pvalue > ALPHA, k
    ours_sync = np.ptp(ours_scales[ours_scaled], axis=1) == 0
    ref_sync = np.ptp(ref_scales[ref_scaled], axis=1) < 1e-6
    assert binomial_close(int(ours_sync.sum()), int(ref_sync.sum()), len(ours_sync), len(ref_sync))


@pytest.mark.parametrize("patch", [(16, 21, 24), (15, 22), (9, 10, 11)])
def test_elastic_smoothing_matches_scipy(patch):
    """FFT Gaussian smoothing and normalisation of the same noise as batchgeneratorsv2 (NumPy float64 FFT,
    scipy's fourier_gaussian): within 2e-6 of the magnitude (float32 FFT here)."""
    dim, batch = len(patch), 3
    noise = torch.randn(batch, dim, *patch)
    sigmas = torch.rand(batch, dim) * 0.2 * torch.tensor(patch).float() + 0.3
    magnitudes = torch.rand(batch, dim) * 5 + 0.5
    ours = smooth_offsets(noise, sigmas, magnitudes)
    for b in range(batch):
        for d in range(dim):
            field = np.fft.ifftn(fourier_gaussian(np.fft.fftn(noise[b, d].numpy()), float(sigmas[b, d]))).real
            field = field / (np.abs(field).max() / float(magnitudes[b, d]))
            assert np.abs(ours[b, ..., d].numpy() - field).max() <= 2e-6 * float(magnitudes[b, d])


def test_elastic_displacement_statistics_vs_bgv2():
    """300 draws each (3D patch 12x16x20): P(deformed); per deformed sample and axis the largest displacement
    (the magnitude), the mean |displacement| relative to it and the roughness (mean |gradient| along the
    axis, relative to it: set by the smoothing sigma), the ratio of roughness between axes (sensitive to the
    scale synchronisation) and the mean displacement length. KS p > 1e-3, binomial 4.5 SE."""
    n, patch = 300, (12, 16, 20)
    kw = dict(NNUNET, patch_size=patch, p_rotation=0, p_scaling=0, p_elastic_deform=0.7,
              elastic_deform_scale=(0.05, 0.25), elastic_deform_magnitude=(1, 5),
              p_synchronize_def_scale_across_axes=0.5)
    ds, bg = DeviceSpatial(**kw), SpatialTransform(**kw)
    p = ds.draw(expanded(n, patch))
    ours = p.offsets[p.do_deform].numpy()
    np.random.seed(0)
    ref = [bg.get_parameters(image=torch.zeros(1, *patch))["elastic_offsets"] for _ in range(n)]
    assert binomial_close(len(ours), sum(r is not None for r in ref), n)
    ref = np.stack([r.numpy() for r in ref if r is not None])

    def statistics(off: np.ndarray) -> dict:
        peak = np.abs(off).max(axis=(1, 2, 3))  # (N, 3)
        rough = np.stack([np.abs(np.diff(off[..., d], axis=1)).mean(axis=(1, 2, 3)) for d in range(3)], 1) / peak
        return dict(peak=peak, rel_mean=np.abs(off).mean(axis=(1, 2, 3)) / peak, rough=rough,
                    rough_ratio=rough[:, :1] / rough[:, 1:2],
                    length=np.linalg.norm(off, axis=-1).mean(axis=(1, 2, 3))[:, None])

    s_ours, s_ref = statistics(ours), statistics(ref)
    for key in s_ours:
        for k in range(s_ours[key].shape[1]):
            pv = stats.ks_2samp(s_ours[key][:, k], s_ref[key][:, k]).pvalue
            assert pv > ALPHA, (key, k, pv)


def test_output_statistics_on_a_fixed_input():
    """nnU-Net DA5 settings (plus elastic deformation) on one fixed 3D sample, 200 draws per pipeline: the
    per-draw mean and standard deviation of the image and the foreground fraction of the segmentation
    (KS p > 1e-3), and the mean of each over the draws (within 4.5 standard errors)."""
    n = 200
    shape, patch = (18, 21, 24), (12, 14, 16)
    kw = dict(DA5, patch_size=patch, rotation=(-math.pi / 6, math.pi / 6), p_elastic_deform=0.3,
              elastic_deform_scale=(0.05, 0.2), elastic_deform_magnitude=(1, 3))
    ds, bg = DeviceSpatial(**kw), SpatialTransform(**kw)
    grids = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    image = (torch.sin(3 * grids[0]) + grids[1] * grids[2] + 2)[None]  # (1, *S), smooth and not symmetric
    seg = ((grids ** 2).sum(0) < 0.5).to(torch.int16)[None] + (grids[0] > 0.3).to(torch.int16)[None]
    out_img, out_seg = ds(image[None].expand(n, *image.shape), seg[None].expand(n, *seg.shape))
    np.random.seed(0)
    ref = [bg(image=image.clone(), segmentation=seg.clone()) for _ in range(n)]
    ref_img = torch.stack([r["image"] for r in ref])
    ref_seg = torch.stack([r["segmentation"] for r in ref])
    for name, ours, theirs in [
        ("mean", out_img.mean((1, 2, 3, 4)), ref_img.mean((1, 2, 3, 4))),
        ("std", out_img.std((1, 2, 3, 4)), ref_img.std((1, 2, 3, 4))),
        ("foreground", (out_seg > 0).float().mean((1, 2, 3, 4)), (ref_seg > 0).float().mean((1, 2, 3, 4))),
    ]:
        ours, theirs = ours.double().numpy(), theirs.double().numpy()
        assert stats.ks_2samp(ours, theirs).pvalue > ALPHA, name
        se = math.sqrt((ours.var() + theirs.var()) / n)
        assert abs(ours.mean() - theirs.mean()) <= Z * se + 1e-12, name


# ---------------------------------------------------------------------------------------------------------
# settings


def test_from_nnunet_reads_the_settings_and_rejects_the_rest():
    bg = SpatialTransform((20, 24, 28), **DA5, rotation=(-0.5, 0.5))
    ds = DeviceSpatial.from_nnunet(bg)
    for key in ("patch_size", "p_rotation", "p_rot_per_axis", "p_scaling", "scaling", "mode_seg",
                "border_mode_seg", "padding_value_seg", "random_crop", "rotation"):
        assert tuple(np.atleast_1d(getattr(ds, key))) == tuple(np.atleast_1d(getattr(bg, key))), key
    image = torch.randn(3, 2, 29, 33, 36)
    seg = blocky_seg(3, 1, image.shape[2:], [0, 1])
    out_img, out_seg = ds(image, seg.float())
    assert out_img.shape == (3, 2, 20, 24, 28) and out_seg.dtype == torch.float32
    assert ds(image, None)[1] is None

    cases = dict(align_corners=True, border_mode_seg="reflection", mode_seg="bicubic", padding_mode_image="border",
                 mode_image="bicubic", rotation=lambda image, dim: 0.1)
    for key, value in cases.items():
        with pytest.raises(Untranslatable, match=key if key != "rotation" else "rotation"):
            DeviceSpatial.from_nnunet(SpatialTransform((20, 24, 28), **dict(DA5, **{key: value})))
    with pytest.raises(Untranslatable):
        DeviceSpatial.from_nnunet(object())
