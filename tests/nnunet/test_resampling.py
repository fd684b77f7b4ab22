"""``resample_like_nnunet`` against nnU-Net 2.8's ``resample_data_or_seg_to_shape`` (CPU, float64 reference).

The data has a different intensity range in every slice of every axis, so that clipping to the
wrong block (skimage clips each resized slice to that slice's range) shows, and zero borders, so that
the edge handling shows. Tolerance: float32 against nnU-Net's float64, relative to the data's range.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape

from nnunetv2_mobilevim.nnunet.resampling import resample_like_nnunet

# (shape (C, X, Y, Z), current spacing, new spacing): isotropic up and down, anisotropic with the coarse
# axis first / in the middle / last (separate-z), only the coarse axis changing, no change at all
CASES = [
    ((2, 14, 19, 17), (1.0, 1.0, 1.0), (0.7, 1.3, 2.0)),
    ((1, 12, 26, 29), (2.5, 0.8, 0.8), (1.0, 1.0, 1.0)),
    ((1, 12, 26, 29), (2.5, 0.8, 0.8), (3.0, 0.9, 0.7)),
    ((1, 23, 9, 21), (0.8, 2.6, 0.75), (0.9, 2.0, 0.9)),
    ((1, 21, 24, 8), (0.7, 0.7, 3.1), (0.8, 0.8, 2.2)),
    ((1, 9, 20, 22), (3.3, 0.7, 0.7), (2.5, 0.7, 0.7)),
    ((1, 10, 12, 11), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
]
ORDERS = [(3, 0), (1, 0), (0, 0), (3, 1), (1, 3)]


def _data(shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    for axis in (1, 2, 3):  # a different range per slice of every axis
        scale = rng.uniform(0.2, 3.0, size=shape[axis]).reshape([-1 if a == axis else 1 for a in range(4)])
        x = x * scale
    x[:, :2] = 0.0
    x[:, :, -1] = 0.0
    return (100 * x).astype(np.float32)


@pytest.mark.parametrize("shape,current,new", CASES)
@pytest.mark.parametrize("order,order_z", ORDERS)
def test_resampling_equals_nnunets(shape, current, new, order, order_z):
    x = _data(shape)
    new_shape = compute_new_shape(shape[1:], current, new)
    ref = resample_data_or_seg_to_shape(x, new_shape, current, new, order=order, order_z=order_z,
                                        force_separate_z=None)
    ours = resample_like_nnunet(torch.from_numpy(x), new_shape, current, new, order=order, order_z=order_z,
                                force_separate_z=None)
    assert tuple(ours.shape) == ref.shape and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - ref).max() <= 3e-6 * np.abs(x).max()


@pytest.mark.parametrize("force", [True, False])
def test_resampling_forced_separate_z_equals_nnunets(force):
    x = _data((1, 12, 26, 29), seed=1)
    current, new = (1.6, 0.8, 0.8), (1.0, 1.1, 0.9)  # ratio 2: separate-z only when forced
    new_shape = compute_new_shape(x.shape[1:], current, new)
    ref = resample_data_or_seg_to_shape(x, new_shape, current, new, order=3, order_z=0, force_separate_z=force)
    ours = resample_like_nnunet(torch.from_numpy(x), new_shape, current, new, order=3, order_z=0,
                                force_separate_z=force)
    assert np.abs(ours.numpy() - ref).max() <= 3e-6 * np.abs(x).max()


def test_resampling_float16_logits_like_nnunets_export():
    """The export resamples float16 logits with order 1; nnU-Net returns float16, which the caller casts to."""
    x = _data((3, 12, 26, 29), seed=2) / 100
    half = x.astype(np.float16)
    current, new = (3.0, 0.9, 0.7), (2.5, 0.8, 0.8)
    shape = compute_new_shape(x.shape[1:], current, new)
    ref = resample_data_or_seg_to_shape(half, shape, current, new, order=1, order_z=0, force_separate_z=None)
    ours = resample_like_nnunet(torch.from_numpy(half), shape, current, new, order=1, order_z=0,
                                force_separate_z=None).half()
    assert ref.dtype == np.float16
    diff = np.abs(ours.numpy().astype(np.float32) - ref.astype(np.float32))
    assert diff.max() <= 2 ** -10 * np.abs(x).max()  # at most one float16 rounding step apart
    assert (diff > 0).mean() < 0.01


def test_resampling_refuses_other_layouts():
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        resample_like_nnunet(torch.zeros(4, 4, 4), (5, 5, 5), (1, 1, 1), (1, 1, 1))
