"""nnU-Net's default resampling (``resample_data_or_seg_to_shape``, images and logits) on any torch device.

nnU-Net resamples with ``skimage.transform.resize`` (spline of order ``order``, edge mode, no
anti-aliasing, output clipped to the input's range) and, for anisotropic spacing, slice by slice in
plane followed by ``scipy.ndimage.map_coordinates`` of order ``order_z`` along the coarse axis. Each
of these is linear and separable: along one axis it is a matrix ``M`` (n_out x n_in), the same for
every line of the volume. So the resampled volume is the input multiplied by one matrix per axis,
which a GPU does in milliseconds, followed by the same clipping.

The matrices are not derived here: they are what the reference functions return for unit impulses
(``resize`` / ``map_coordinates`` of an identity matrix, float64, built once per size and cached), so
the spline prefilter, boundary handling and coordinate convention are scipy's own. Products run in
float32 (nnU-Net: float64); ``tests/nnunet/test_resampling.py`` compares with nnU-Net's function.

    y = resample_like_nnunet(x, new_shape, current_spacing, new_spacing, order=3, order_z=0)
    # x: (C, X, Y, Z) float tensor on any device -> (C, *new_shape) float32 on the same device
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """``skimage.transform.resize`` along one axis as a matrix (n_out, n_in), float64."""
    from skimage.transform import resize

    return resize(np.eye(n_in), (n_out, n_in), order=order, mode="edge", anti_aliasing=False, clip=False)


@lru_cache(maxsize=64)
def _map_coordinates_matrix(n_in: int, n_out: int, order: int) -> np.ndarray:
    """nnU-Net's ``map_coordinates`` step along the coarse axis as a matrix (n_out, n_in), float64: the
    coordinates computed exactly as ``resample_data_or_seg`` computes them (so that order-0 ties round
    the same way), the other axis at integer positions."""
    from scipy.ndimage import map_coordinates

    rows, cols = np.mgrid[:n_out, :n_in]
    rows = float(n_in) / n_out * (rows + 0.5) - 0.5
    return map_coordinates(np.eye(n_in), np.array([rows, cols], dtype=float), order=order, mode="nearest")


def _along(x: Tensor, matrix: np.ndarray, axis: int) -> Tensor:
    """Multiply every line of ``x`` along ``axis`` by ``matrix`` (n_out, n_in)."""
    m = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
    return torch.matmul(x.movedim(axis, -1), m.T).movedim(-1, axis)


def _resize(x: Tensor, new_shape: Sequence[int], axes: Sequence[int], order: int) -> Tensor:
    """``skimage.transform.resize(x[c, slices...], order, mode='edge', anti_aliasing=False)`` for every
    channel and every position on the axes not in ``axes``: x (C, ...) with the ``axes`` resized to
    ``new_shape`` (one entry per axis in ``axes``), clipped like skimage to each resized block's range."""
    low, high = x.amin(dim=tuple(axes), keepdim=True), x.amax(dim=tuple(axes), keepdim=True)
    for axis, n in zip(axes, new_shape):
        if x.shape[axis] != n:
            x = _along(x, _resize_matrix(x.shape[axis], int(n), order), axis)
    return torch.maximum(torch.minimum(x, high), low)


def resample_like_nnunet(data: Tensor, new_shape: Sequence[int], current_spacing: Sequence[float],
                         new_spacing: Sequence[float], order: int = 3, order_z: int = 0,
                         force_separate_z: Optional[bool] = False,
                         separate_z_anisotropy_threshold: Optional[float] = None) -> Tensor:
    """``resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg=False, order,
    order_z, force_separate_z, separate_z_anisotropy_threshold)`` (nnU-Net 2.8) for a tensor on any
    device: data (C, X, Y, Z) -> (C, *new_shape) float32 (nnU-Net keeps the input's dtype: cast the result
for float16 logits); the input itself if the shape does not change.
    The decision to resample the coarse axis separately is nnU-Net's own function."""
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    if data.dim() != 4:
        raise ValueError(f"data must be (C, X, Y, Z), got shape {tuple(data.shape)}")
    new_shape = [int(n) for n in new_shape]
    if list(data.shape[1:]) == new_shape:
        return data
    threshold = ANISO_THRESHOLD if separate_z_anisotropy_threshold is None else separate_z_anisotropy_threshold
    separate_z, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing, threshold)
    x = data.float()
    if not separate_z:
        return _resize(x, new_shape, axes=(1, 2, 3), order=order)
    axis = int(axis) + 1
    plane = [a for a in (1, 2, 3) if a != axis]
    x = _resize(x, [new_shape[a - 1] for a in plane], axes=plane, order=order)
    if x.shape[axis] != new_shape[axis - 1]:
        x = _along(x, _map_coordinates_matrix(x.shape[axis], new_shape[axis - 1], order_z), axis)
    return x


__all__ = ("resample_like_nnunet",)
