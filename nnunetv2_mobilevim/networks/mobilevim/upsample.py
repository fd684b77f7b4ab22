"""Linear (bilinear / trilinear) resizing as one matrix product per spatial axis.

    linear_resize(x, size)   # x (B, C, *S) -> (B, C, *size); F.interpolate(x, size, mode="(bi/tri)linear",
                             # align_corners=False) to float32 rounding

Deliberately not ``F.interpolate``: on CUDA its backward adds every output voxel's gradient into its
eight (four) source voxels with atomic adds, which is slow where many outputs share a source (the
decoder upsamples its class maps 2-8x) and not deterministic, so a training step with it cannot be
repeated bit for bit (``torch.use_deterministic_algorithms`` refuses it). Here the forward is
``M_D x M_H^T ...`` with fixed (out, in) interpolation matrices and the backward is the same products
transposed: deterministic, and few large kernels. The matrices hold PyTorch's own source-index and
weight arithmetic (``align_corners=False``, in PyTorch's precision). Where that equality could not hold, the call goes
to ``F.interpolate``: half-precision inputs outside autocast, and float32 matrix products allowed to
round to TF32 or bfloat16 (``torch.get_float32_matmul_precision() != "highest"``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ssm.backend import eager_under_compile

#: F.interpolate's linear mode for each number of spatial axes
LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


@functools.lru_cache(maxsize=128)
@torch.inference_mode(False)
def interpolation_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in): row j holds the weights with which linear interpolation (``align_corners=False``)
    mixes the inputs into output j, computed as PyTorch's kernels do (source index
    ``scale * (j + 0.5) - 0.5`` clamped at 0, ``scale = n_in / n_out``, in float32 for float32 and half
    inputs and in float64 for float64; the right neighbour clamped at the last input). Made once per size
    pair, device and dtype; do not modify the result (it is shared). A normal tensor also when first made
    under ``torch.inference_mode``: a cached inference tensor would break every later training step."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(float(n_in), dtype=acc) / n_out
    dst = torch.arange(n_out, dtype=acc)
    src = (scale * (dst + 0.5) - 0.5).clamp(min=0)
    left = src.long().clamp(max=n_in - 1)
    right = (left + 1).clamp(max=n_in - 1)
    w_right = src - left
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=acc)
    matrix.index_put_((rows, left), 1 - w_right, accumulate=True)
    matrix.index_put_((rows, right), w_right, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


# Eager under torch.compile: traced, the cached matrices would be rebuilt in every call's graph, with a
# host-to-device copy that a CUDA graph cannot capture.
@eager_under_compile
def linear_resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """``F.interpolate(x, size, mode=LINEAR_MODE[x.dim() - 2], align_corners=False)``, also in its dtypes:
    float32 under CUDA autocast (which runs linear interpolation in float32), otherwise x's dtype. A new
    tensor, contiguous."""
    size = tuple(int(s) for s in size)
    dims = x.dim() - 2
    promoted = x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    dtype = torch.float32 if promoted else x.dtype
    if (dtype not in (torch.float32, torch.float64) or len(size) != dims
            or (dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest")):
        return F.interpolate(x, size=size, mode=LINEAR_MODE[dims], align_corners=False)
    with torch.autocast(x.device.type, enabled=False):
        y = x.to(dtype)
        for axis in reversed(range(dims)):  # the last axis first: its product needs no reshape
            n_in, n_out = y.shape[2 + axis], size[axis]
            if n_in == n_out:
                continue
            matrix = interpolation_matrix(n_in, n_out, x.device, dtype)
            if axis == dims - 1:
                y = y @ matrix.T
            else:  # (..., n_in, rest) -> (..., n_out, rest)
                lead, rest = y.shape[:2 + axis], y.shape[3 + axis:]
                y = (matrix @ y.reshape(*lead, n_in, -1)).reshape(*lead, n_out, *rest)
    return y if y is not x else x.clone(memory_format=torch.contiguous_format)
