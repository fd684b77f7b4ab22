"""nnU-Net's spatial augmentation, batched: rotation, scaling and elastic deformation around the patch centre
and the crop to the patch size, for image and segmentation, as batchgeneratorsv2's ``SpatialTransform`` does
it per sample (``nnUNetTrainer.get_training_transforms`` and the DA5 / DAOrd0 / NoMirroring variants).

nnU-Net's loader hands over each sample at the enlarged "initial patch size"; the transform maps every voxel of
the output patch to a point of that input (one grid per sample) and resamples there. Here one ``grid_sample``
call per tensor (per label for the segmentation) serves the whole batch with a per-sample grid ``(B, *P, D)``.
Samples that are neither rotated, scaled nor deformed are cut out exactly like nnU-Net's ``crop_tensor`` (a
gather at integer offsets with the same padding), not interpolated, and chosen per sample with ``torch.where``.

The segmentation is resampled like batchgeneratorsv2 does it: per label the interpolated indicator (x1000, in
float16), the argmax over the labels of each sample's channel, ties settled by ``seg_tiebreak``. Labels are
collected once for the whole batch (one host sync per call); which of them a sample's channel actually has,
and whether the padding label takes part (only where that sample's grid reaches outside its input), is kept
per (sample, channel) as tensors, so every sample gets the result of its own label set.

``dummy_2d=True`` is nnU-Net's augmentation of anisotropic 3D patches: the first spatial axis is merged into
the channels, one 2D transform is drawn per sample and applied to every slice, and the axis is split off again.

Shapes: image ``(B, C, *S)``, segmentation ``(B, Cs, *S)``, ``len(S) == D`` in {2, 3} (in dummy-2D mode
``S = (X, Y, Z)`` and the transform is 2D over ``(Y, Z)``). Per-sample parameters ``(B,)`` / ``(B, D)``.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling import Untranslatable, check_random_scalar, coin, constant, random_scalar, uniform

__all__ = ["DeviceSpatial", "SpatialParams", "affine_matrices", "smooth_offsets"]

# batchgeneratorsv2 multiplies the label indicators by this before resampling and stores the scores as float16
# (spacing 0.25 to 0.5 around the top score): near ties collapse into exact ones, which seg_tiebreak settles.
_SCORE_SCALE = 1000.0
_TIEBREAKS = ("nearest", "lowest", "highest")


class SpatialParams(NamedTuple):
    """Per-sample parameters of one batch (all on the batch's device).

    ``angles`` are rotations about spatial axes 0, 1, 2 (3D, ``(B, 3)``) or the in-plane rotation (2D,
    ``(B, 1)``), 0 where not rotated or where ``p_rot_per_axis`` skipped the axis; ``scales`` ``(B, D)`` are 1
    where not scaled. ``offsets`` ``(B, *P, D)`` are the smoothed elastic displacements in pixels (``None``
    when ``p_elastic_deform == 0``; only used where ``do_deform``). ``centers`` ``(B, D)`` is the point of the
    input (pixels, nnU-Net's ``center_location_in_pixels``) the patch centre maps to."""

    do_rotation: Tensor  # (B,) bool
    do_scaling: Tensor  # (B,) bool
    do_deform: Tensor  # (B,) bool
    angles: Tensor  # (B, 3) or (B, 1) float32, radians
    scales: Tensor  # (B, D) float32
    deform_scales: Optional[Tensor]  # (B, D) float32: Gaussian sigma as a fraction of the patch edge
    deform_magnitudes: Optional[Tensor]  # (B, D) float32: largest displacement per axis, pixels
    offsets: Optional[Tensor]  # (B, *P, D) float32
    centers: Tensor  # (B, D) float32 (float64 accepted)

    @property
    def transformed(self) -> Tensor:
        """(B,) bool: resampled on a grid; the others are cropped."""
        return self.do_rotation | self.do_scaling | self.do_deform


# ---------------------------------------------------------------------------------------------------------
# helpers


def _bcast(t: Tensor, ndim: int) -> Tensor:
    """Append singleton dimensions to ``t`` up to ``ndim`` dimensions."""
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


def affine_matrices(angles: Tensor, scales: Tensor) -> Tensor:
    """(B, D, D) float32 matrices ``R @ diag(scales)``, acting on column vectors of pixel coordinates.

    3D: ``R = Rz(a2) @ Ry(a1) @ Rx(a0)`` with ``Rx`` rotating the plane of axes (1, 2), ``Ry`` that of (2, 0) and
    ``Rz`` that of (0, 1); 2D: the rotation by ``angles[:, 0]`` in the plane (0, 1). Built in float64 and
    rounded once, as batchgeneratorsv2 builds its NumPy matrix, so both round to the same float32 values."""
    a = angles.double()
    s = scales.double()
    cos, sin = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a[:, 0]), torch.zeros_like(a[:, 0])

    def mat(rows: Sequence[Sequence[Tensor]]) -> Tensor:
        return torch.stack([torch.stack(list(r), -1) for r in rows], -2)

    if angles.shape[1] == 1:
        c, si = cos[:, 0], sin[:, 0]
        rot = mat([[c, -si], [si, c]])
    else:
        c0, c1, c2 = cos.unbind(1)
        s0, s1, s2 = sin.unbind(1)
        about0 = mat([[one, zero, zero], [zero, c0, -s0], [zero, s0, c0]])
        about1 = mat([[c1, zero, s1], [zero, one, zero], [-s1, zero, c1]])
        about2 = mat([[c2, -s2, zero], [s2, c2, zero], [zero, zero, one]])
        rot = about2 @ about1 @ about0  # left to right, the order NumPy evaluates the same product in
    return (rot @ torch.diag_embed(s)).float()


def smooth_offsets(noise: Tensor, sigmas: Tensor, magnitudes: Tensor) -> Tensor:
    """Elastic displacement fields from white noise, on the noise's device.

    noise ``(B, D, *P)``: one standard-normal field per displacement component; sigmas ``(B, D)``: isotropic
    Gaussian sigma in pixels for each component; magnitudes ``(B, D)``: the largest |displacement| each
    component is scaled to. Smoothing is a product with the Gaussian's transfer function
    ``exp(-2 pi^2 sigma^2 f^2)`` on the full FFT (periodic boundary), which is what scipy's ``fourier_gaussian``
    applies to a complex spectrum. Computed in float32 (batchgeneratorsv2 uses float64: the fields agree to
    about 1e-6 of the magnitude). Returns ``(B, *P, D)`` float32, the component last as in a sampling grid."""
    spatial = tuple(noise.shape[2:])
    axes = tuple(range(2, noise.ndim))
    spectrum = torch.fft.fftn(noise.float(), dim=axes)
    var = (sigmas.float() ** 2)[..., None]  # (B, D, 1)
    for k, n in enumerate(spatial):
        freq = torch.fft.fftfreq(n, device=noise.device, dtype=torch.float32)
        factor = torch.exp((-2.0 * math.pi ** 2) * var * freq ** 2)  # (B, D, n)
        shape = [1] * len(spatial)
        shape[k] = n
        spectrum = spectrum * factor.reshape(*factor.shape[:2], *shape)
    field = torch.fft.ifftn(spectrum, dim=axes).real
    peak = field.abs().amax(dim=axes)  # (B, D)
    field = field / _bcast(peak / magnitudes.float().clamp_min(1e-8), field.ndim)
    return field.movedim(1, -1).contiguous()


def _crop(x: Tensor, starts: Tensor, patch: Sequence[int], fill: float) -> Tensor:
    """``crop_tensor`` for a batch: ``out[b, :, i...] = x[b, :, starts[b] + i...]``, ``fill`` outside ``x``.

    x ``(B, K, *S)``; starts ``(B, D)`` int64 (may be negative or run past the end). Returns ``(B, K, *P)``."""
    batch, dim = x.shape[0], len(patch)
    index: List[Tensor] = [torch.arange(batch, device=x.device).reshape(batch, *([1] * dim))]
    inside = None
    for k, (p, s) in enumerate(zip(patch, x.shape[2:])):
        pos = starts[:, k:k + 1] + torch.arange(p, device=x.device)  # (B, p)
        shape = [batch] + [1] * dim
        shape[1 + k] = p
        ok = ((pos >= 0) & (pos < s)).reshape(shape)
        inside = ok if inside is None else inside & ok
        index.append(pos.clamp(0, s - 1).reshape(shape))
    out = x.movedim(1, -1)[tuple(index)].movedim(-1, 1)  # (B, K, *P)
    return out.masked_fill(~inside[:, None], fill)


# ---------------------------------------------------------------------------------------------------------


class DeviceSpatial:
    """batchgeneratorsv2's ``SpatialTransform`` (same parameter names and defaults) for a whole batch.

    Reproduced: ``random_crop`` False / True, rotation (``p_rotation``, ``rotation``, ``p_rot_per_axis``),
    scaling (``p_scaling``, ``scaling``, ``p_synchronize_scaling_across_axes``), elastic deformation
    (``p_elastic_deform``, ``elastic_deform_scale``, ``elastic_deform_magnitude``,
    ``p_synchronize_def_scale_across_axes``, ``center_deformation``), ``mode_image`` bilinear / nearest with
    ``padding_mode_image`` zeros / constant, ``mode_seg`` bilinear (one-hot scores, any ``seg_tiebreak``) /
    nearest with ``border_mode_seg`` zeros / constant, ``align_corners=False``. ``bg_style_seg_sampling`` only
    changes how batchgeneratorsv2 computes the same result, so either value is accepted. Anything else raises
    ``Untranslatable``. Random draws: numbers, (low, high) ranges and BGContrast ranges (``sampling``).
    """

    def __init__(self,
                 patch_size: Sequence[int],
                 patch_center_dist_from_border: Union[int, float, Sequence[Union[int, float]]],
                 random_crop: bool,
                 p_elastic_deform: float = 0,
                 elastic_deform_scale=(0, 0.2),
                 elastic_deform_magnitude=(0, 0.2),
                 p_synchronize_def_scale_across_axes: float = 0,
                 p_rotation: float = 0,
                 rotation=(0, 2 * math.pi),
                 p_rot_per_axis: float = 1,
                 p_scaling: float = 0,
                 scaling=(0.7, 1.3),
                 p_synchronize_scaling_across_axes: float = 0,
                 bg_style_seg_sampling: bool = False,
                 mode_seg: str = "bilinear",
                 border_mode_seg: str = "zeros",
                 center_deformation: bool = True,
                 mode_image: str = "bilinear",
                 padding_mode_image: str = "zeros",
                 padding_value_seg: float = 0,
                 padding_value_image: float = 0,
                 align_corners: bool = False,
                 *,
                 seg_tiebreak: str = "nearest",
                 dummy_2d: bool = False,
                 labels: Optional[Sequence[int]] = None):
        self.patch_size = tuple(int(p) for p in patch_size)
        # every value the segmentation may hold (nnU-Net: the dataset's labels, the ignore label and the
        # loader's -1); a superset is fine (absent labels score 0), a missing value is resampled wrongly
        self.labels = None if labels is None else sorted({int(v) for v in labels})
        dim = len(self.patch_size)
        if dim not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 entries, got {patch_size!r}")
        if dummy_2d and dim != 2:
            raise ValueError("dummy_2d takes the 2D patch size of the in-plane axes (nnU-Net: patch_size[1:])")
        if not isinstance(patch_center_dist_from_border, (list, tuple)):
            patch_center_dist_from_border = [patch_center_dist_from_border] * dim
        self.patch_center_dist_from_border = [float(v) for v in patch_center_dist_from_border]
        self.random_crop = bool(random_crop)
        self.p_elastic_deform = float(p_elastic_deform)
        self.elastic_deform_scale = elastic_deform_scale
        self.elastic_deform_magnitude = elastic_deform_magnitude
        self.p_synchronize_def_scale_across_axes = float(p_synchronize_def_scale_across_axes)
        self.p_rotation = float(p_rotation)
        self.rotation = rotation
        self.p_rot_per_axis = float(p_rot_per_axis)
        self.p_scaling = float(p_scaling)
        self.scaling = scaling
        self.p_synchronize_scaling_across_axes = float(p_synchronize_scaling_across_axes)
        self.mode_seg = mode_seg
        self.border_mode_seg = border_mode_seg
        self.center_deformation = bool(center_deformation)
        self.mode_image = mode_image
        self.padding_mode_image = padding_mode_image
        self.padding_value_seg = padding_value_seg
        self.padding_value_image = float(padding_value_image)
        self.seg_tiebreak = seg_tiebreak
        self.dummy_2d = bool(dummy_2d)

        if align_corners:
            raise Untranslatable("SpatialTransform align_corners=True is not reproduced (nnU-Net uses False)")
        if mode_image not in ("bilinear", "nearest"):
            raise Untranslatable(f"SpatialTransform mode_image={mode_image!r} (reproduced: bilinear, nearest)")
        if padding_mode_image not in ("zeros", "constant"):
            raise Untranslatable(f"SpatialTransform padding_mode_image={padding_mode_image!r} "
                                 "(reproduced: zeros, constant)")
        if mode_seg not in ("bilinear", "nearest"):
            raise Untranslatable(f"SpatialTransform mode_seg={mode_seg!r} (reproduced: bilinear, nearest)")
        if border_mode_seg not in ("zeros", "constant"):
            raise Untranslatable(f"SpatialTransform border_mode_seg={border_mode_seg!r} "
                                 "(reproduced: zeros, constant)")
        if seg_tiebreak not in _TIEBREAKS:
            raise Untranslatable(f"SpatialTransform seg_tiebreak={seg_tiebreak!r} (reproduced: {_TIEBREAKS})")
        if self.p_rotation > 0:
            check_random_scalar(rotation, "SpatialTransform rotation")
        if self.p_scaling > 0:
            check_random_scalar(scaling, "SpatialTransform scaling")
        if self.p_elastic_deform > 0:
            check_random_scalar(elastic_deform_scale, "SpatialTransform elastic_deform_scale")
            check_random_scalar(elastic_deform_magnitude, "SpatialTransform elastic_deform_magnitude")
        # the label the segmentation is padded with outside the input
        self._pad_label = padding_value_seg if border_mode_seg == "constant" else 0
        self._base: dict = {}

    @classmethod
    def from_nnunet(cls, spatial_transform, dummy_2d: bool = False,
                    labels: Optional[Sequence[int]] = None) -> "DeviceSpatial":
        """From batchgeneratorsv2's ``SpatialTransform`` object. ``dummy_2d``: it sits between nnU-Net's
        ``Convert3DTo2DTransform`` and ``Convert2DTo3DTransform`` (its patch size is then 2D). ``labels``:
        see ``__init__``."""
        from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

        t = spatial_transform
        if type(t) is not SpatialTransform:
            raise Untranslatable(f"expected batchgeneratorsv2's SpatialTransform, got {type(t).__name__}")
        if not hasattr(t, "seg_tiebreak"):
            raise Untranslatable("this batchgeneratorsv2 SpatialTransform has no seg_tiebreak: its segmentation "
                                 "resampling predates the one reproduced here (0.3.6)")
        return cls(
            t.patch_size, t.patch_center_dist_from_border, t.random_crop,
            p_elastic_deform=t.p_elastic_deform, elastic_deform_scale=t.elastic_deform_scale,
            elastic_deform_magnitude=t.elastic_deform_magnitude,
            p_synchronize_def_scale_across_axes=t.p_synchronize_def_scale_across_axes,
            p_rotation=t.p_rotation, rotation=t.rotation, p_rot_per_axis=t.p_rot_per_axis,
            p_scaling=t.p_scaling, scaling=t.scaling,
            p_synchronize_scaling_across_axes=t.p_synchronize_scaling_across_axes,
            bg_style_seg_sampling=t.bg_style_seg_sampling, mode_seg=t.mode_seg, border_mode_seg=t.border_mode_seg,
            center_deformation=t.center_deformation, mode_image=t.mode_image,
            padding_mode_image=t.padding_mode_image, padding_value_seg=t.padding_value_seg,
            padding_value_image=t.padding_value_image, align_corners=t.align_corners,
            seg_tiebreak=t.seg_tiebreak, dummy_2d=dummy_2d, labels=labels,
        )

    # -----------------------------------------------------------------------------------------------------
    # parameters

    @property
    def dim(self) -> int:
        return len(self.patch_size)

    def _spatial_shape(self, image: Tensor) -> Tuple[int, ...]:
        """The input's spatial shape as the transform sees it (in dummy-2D mode: the last two axes)."""
        expected = 5 if self.dummy_2d else self.dim + 2
        if image.ndim != expected:
            raise ValueError(f"expected a {expected}-D batch (B, C, *spatial) for patch_size {self.patch_size}"
                             f"{' with dummy_2d' if self.dummy_2d else ''}, got shape {tuple(image.shape)}")
        return tuple(image.shape[-self.dim:])

    def draw(self, image: Tensor) -> SpatialParams:
        """Per-sample parameters for ``image`` (only its shape and device are used)."""
        shape = self._spatial_shape(image)
        batch, dim, dev = image.shape[0], self.dim, image.device

        do_rotation = coin(self.p_rotation, (batch,), dev)
        do_scaling = coin(self.p_scaling, (batch,), dev)
        do_deform = coin(self.p_elastic_deform, (batch,), dev)

        n_angles = 3 if dim == 3 else 1  # 2D rotates in its one plane
        if self.p_rotation > 0:
            angles = random_scalar(self.rotation, (batch, n_angles), dev, "SpatialTransform rotation")
            if self.p_rot_per_axis < 1:  # each axis is skipped on its own
                angles = torch.where(coin(self.p_rot_per_axis, (batch, n_angles), dev), angles, 0.0)
            angles = torch.where(do_rotation[:, None], angles, 0.0)
        else:
            angles = torch.zeros((batch, n_angles), device=dev)

        if self.p_scaling > 0:
            per_axis = random_scalar(self.scaling, (batch, dim), dev, "SpatialTransform scaling")
            shared = random_scalar(self.scaling, (batch, 1), dev, "SpatialTransform scaling")
            sync = coin(self.p_synchronize_scaling_across_axes, (batch, 1), dev)
            scales = torch.where(sync, shared, per_axis)
            scales = torch.where(do_scaling[:, None], scales, 1.0)
        else:
            scales = torch.ones((batch, dim), device=dev)

        deform_scales = magnitudes = offsets = None
        if self.p_elastic_deform > 0:
            what = "SpatialTransform elastic_deform_scale"
            per_axis = random_scalar(self.elastic_deform_scale, (batch, dim), dev, what)
            shared = random_scalar(self.elastic_deform_scale, (batch, 1), dev, what)
            sync = coin(self.p_synchronize_def_scale_across_axes, (batch, 1), dev)
            deform_scales = torch.where(sync, shared, per_axis)
            magnitudes = random_scalar(self.elastic_deform_magnitude, (batch, dim), dev,
                                       "SpatialTransform elastic_deform_magnitude")
            # sigma in pixels: a fraction of the patch edge of the displacement's own axis
            sigmas = deform_scales * constant(self.patch_size, dev)
            noise = torch.randn((batch, dim, *self.patch_size), device=dev)
            offsets = smooth_offsets(noise, sigmas, magnitudes)

        columns = []
        for k, s in enumerate(shape):
            low = self.patch_center_dist_from_border[k]
            high = s - low
            if self.random_crop and high >= low:
                columns.append(uniform(low, high, (batch,), dev))
            else:  # the input's centre (also where no centre keeps the distance from both borders)
                columns.append(torch.full((batch,), s / 2, device=dev))
        centers = torch.stack(columns, 1)

        return SpatialParams(do_rotation, do_scaling, do_deform, angles, scales, deform_scales, magnitudes,
                             offsets, centers)

    # -----------------------------------------------------------------------------------------------------
    # geometry

    def _base_grid(self, device: torch.device) -> Tensor:
        """(*P, D) float32: pixel offsets of the output voxels from the patch centre (..., -0.5, 0.5, ...)."""
        key = str(device)
        if key not in self._base:
            axes = [torch.arange(p, device=device, dtype=torch.float32) - (p - 1) / 2 for p in self.patch_size]
            self._base[key] = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        return self._base[key]

    def grid(self, params: SpatialParams, spatial_shape: Sequence[int]) -> Tensor:
        """(B, *P, D) float32 sampling grid in ``grid_sample``'s convention (normalised to the input of spatial
        shape ``spatial_shape``, align_corners False, last entry indexes the last spatial axis).

        Per sample: centred patch coordinates, plus the elastic offsets (where deformed), times the affine
        matrix (identity where neither rotated nor scaled, which leaves the coordinates exactly unchanged),
        moved so the patch centre lands on ``centers`` (the deformed grid's mean, where ``center_deformation``)
        and normalised. Only meaningful for ``params.transformed`` samples."""
        batch, dim = params.centers.shape
        base = self._base_grid(params.centers.device)
        coords = base.expand(batch, *base.shape)
        if params.offsets is not None:
            coords = coords + torch.where(_bcast(params.do_deform, coords.ndim), params.offsets, 0.0)
        matrix = affine_matrices(params.angles, params.scales)  # (B, D, D), acts on column vectors
        coords = torch.matmul(coords.reshape(batch, -1, dim), matrix.transpose(1, 2)).reshape(coords.shape)
        half = constant(tuple(s / 2 for s in spatial_shape), coords.device, torch.float64)
        # in float64, then rounded once: exact for centres given in float64 too (as batchgeneratorsv2 draws them)
        shift = (params.centers.double() - half).float()  # (B, D)
        half = half.float()
        if params.offsets is not None and self.center_deformation:
            # deformation moves the grid's mean off the centre; put it back where deformed
            mean = coords.mean(dim=tuple(range(1, coords.ndim - 1)))
            shift = shift - torch.where(params.do_deform[:, None], mean, 0.0)
        coords = (coords + shift.reshape(batch, *([1] * dim), dim)) / half
        return coords.flip(-1)

    def _reaches_outside(self, grid: Tensor, spatial_shape: Sequence[int]) -> Tensor:
        """(B,) bool: some bilinear kernel of the sample's grid may draw on pixels outside the input.

        batchgeneratorsv2's conservative test, per sample: any |grid coordinate| beyond the smallest per-axis
        bound ``1 - 1/size`` (where pixel coordinate 0 / size-1 lies), compared in float64."""
        bound = min(1.0 - 1.0 / s for s in spatial_shape)
        low, high = torch.aminmax(grid.reshape(grid.shape[0], -1), dim=1)
        return (-low.double() > bound) | (high.double() > bound)

    def _starts(self, params: SpatialParams) -> Tensor:
        """(B, D) int64: first input index of nnU-Net's crop (centre rounded down, minus half the patch)."""
        half = constant(tuple(p // 2 for p in self.patch_size), params.centers.device, torch.int64)
        return torch.floor(params.centers).long() - half

    # -----------------------------------------------------------------------------------------------------
    # resampling

    def _nearest_labels(self, seg: Tensor, grid: Tensor) -> Tensor:
        """Nearest-neighbour resampling of the padded segmentation: (B, K, *P), the segmentation's dtype."""
        shift = float(self._pad_label)  # grid_sample pads with 0: shift so that the padding is the label
        out = F.grid_sample(seg.float() - shift, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return (out + shift).to(seg.dtype)

    def _resample_labels(self, seg: Tensor, grid: Tensor, spatial_shape: Sequence[int]) -> Tensor:
        """Bilinear one-hot resampling of ``seg`` (B, K, *S) on ``grid``: (B, K, *P), the segmentation's dtype.

        Every channel k of sample b is resampled as batchgeneratorsv2 does it with that channel's own sorted
        label set L (plus the padding label where the sample's grid reaches outside): one label -> that label;
        two -> the larger one where its float16 score passes half the scale, ties at exactly half to
        ``seg_tiebreak``; more -> running argmax in label order ('>' keeps the earlier label, '>=' for
        'highest'), then for 'nearest' the nearest neighbour's label wherever its score equals the top score.
        Batch labels absent from (b, k) have score 0 and are masked out of all of this."""
        nearest = self._nearest_labels(seg, grid)
        batch, channels = seg.shape[:2]
        ndim = seg.ndim
        pad = self._pad_label
        reach = self._reaches_outside(grid, spatial_shape)  # (B,)
        reach_f = _bcast(reach.float(), ndim)
        # the values the segmentation can hold: given (no host sync, capturable), or this batch's (one sync)
        labels = list(self.labels) if self.labels is not None else torch.unique(seg).tolist()
        if not any(v == pad for v in labels):
            labels = sorted(labels + [pad])

        vol = (batch, channels, *grid.shape[1:-1])
        dev = seg.device
        best = torch.full(vol, float("-inf"), dtype=torch.float16, device=dev)  # top score so far
        winner = torch.zeros(vol, dtype=seg.dtype, device=dev)  # its label
        nn_score = torch.full(vol, float("-inf"), dtype=torch.float16, device=dev)  # score of the NN's label
        top_label_score = torch.zeros(vol, dtype=torch.float16, device=dev)  # score of the largest label present
        count = torch.zeros((batch, channels), dtype=torch.int64, device=dev)
        lowest = torch.zeros((batch, channels), dtype=seg.dtype, device=dev)  # smallest label present
        highest = torch.zeros((batch, channels), dtype=seg.dtype, device=dev)  # largest label present
        compare = torch.ge if self.seg_tiebreak == "highest" else torch.gt

        for label in labels:
            hit = seg == label
            present = hit.flatten(2).any(2)  # (B, K)
            indicator = hit.float()
            if label == pad:
                # Where the grid reaches outside, the padding label's indicator is 1 there: resample
                # (indicator - 1), which grid_sample pads with 0, and add the 1 back. Elsewhere r = 0 and this is
                # bit for bit the plain indicator.
                present = present | reach[:, None]
                src = (indicator - reach_f) * _SCORE_SCALE
                score = F.grid_sample(src, grid, mode=self.mode_seg, padding_mode="zeros", align_corners=False)
                score = (score + reach_f * _SCORE_SCALE).half()
            else:
                score = F.grid_sample(indicator * _SCORE_SCALE, grid, mode=self.mode_seg, padding_mode="zeros",
                                      align_corners=False).half()
            here = _bcast(present, ndim)
            winner = winner.masked_fill(here & compare(score, best), label)
            best = torch.where(here, torch.maximum(best, score), best)
            if self.seg_tiebreak == "nearest":
                nn_score = torch.where(nearest == label, score, nn_score)
            top_label_score = torch.where(here, score, top_label_score)
            lowest = lowest.masked_fill(present & (count == 0), label)
            highest = highest.masked_fill(present, label)
            count = count + present.long()

        half = 0.5 * _SCORE_SCALE
        lowest, highest, count = (_bcast(t, ndim) for t in (lowest, highest, count))
        two = torch.where(compare(top_label_score, half), highest, lowest)
        if self.seg_tiebreak == "nearest":
            winner = torch.where(nn_score == best, nearest, winner)
            two = torch.where(top_label_score == half, nearest, two)
        return torch.where(count == 1, lowest, torch.where(count == 2, two, winner))

    def apply(self, image: Tensor, seg: Optional[Tensor], params: SpatialParams
              ) -> Tuple[Tensor, Optional[Tensor]]:
        """(image (B, C, *P), seg (B, Cs, *P) in the segmentation's dtype, or None); inputs are not modified.
        In dummy-2D mode the first spatial axis is kept: (B, C, X, *P)."""
        shape = self._spatial_shape(image)
        transformed = params.transformed
        grid = self.grid(params, shape)
        starts = self._starts(params)

        def flat(x: Tensor) -> Tensor:  # dummy 2D: the first spatial axis joins the channels
            return x.reshape(x.shape[0], -1, *x.shape[-2:]) if self.dummy_2d else x

        def unflat(x: Tensor, like: Tensor) -> Tensor:
            return x.reshape(*like.shape[:-2], *x.shape[-2:]) if self.dummy_2d else x

        img = flat(image)
        shift = self.padding_value_image if self.padding_mode_image == "constant" else 0.0
        warped = F.grid_sample(img - shift if shift else img, grid.to(img.dtype), mode=self.mode_image,
                               padding_mode="zeros", align_corners=False)
        if shift:
            warped = warped + shift
        cropped = _crop(img, starts, self.patch_size, shift)
        image_out = unflat(torch.where(_bcast(transformed, img.ndim), warped, cropped), image)

        seg_out = None
        if seg is not None:
            if seg.shape[0] != image.shape[0] or seg.shape[2:] != image.shape[2:]:
                raise ValueError(f"segmentation {tuple(seg.shape)} does not match image {tuple(image.shape)}")
            s = flat(seg)
            if self.mode_seg == "nearest":
                warped_seg = self._nearest_labels(s, grid)
            else:
                warped_seg = self._resample_labels(s, grid, shape)
            cropped_seg = _crop(s, starts, self.patch_size, self._pad_label)
            seg_out = unflat(torch.where(_bcast(transformed, s.ndim), warped_seg, cropped_seg), seg)
        return image_out, seg_out

    def __call__(self, image: Tensor, seg: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        return self.apply(image, seg, self.draw(image))
