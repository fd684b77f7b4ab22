"""The mamba-ssm / causal-conv1d kernel backend (CUDA only).

``selective_scan_fn`` computes exactly the recurrence of Algorithm 1 (A of shape (D, N) broadcast
over the batch, B and C per group, float32 state inside the kernel), so it is the kernel that fits;
Mamba2's SSD kernels need A to be one scalar per head, which Algorithm 1's A_d of size M is not.
Imports happen on first use so that importing the package never needs the kernels.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

INSTALL_HINT = (
    "install the GPU extra on a machine with CUDA and nvcc: "
    "pip install 'nnunetv2-mobilevim[gpu]' --no-build-isolation "
    "(mamba-ssm and causal-conv1d compile against your torch; see the README)"
)


@functools.lru_cache(maxsize=None)
def load_kernels() -> Tuple[Optional[Callable], Optional[Callable], str]:
    """(selective_scan_fn, causal_conv1d_fn or None, reason if the scan kernel is missing)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
        return None, None, f"mamba_ssm could not be imported ({type(err).__name__}: {err})"
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return selective_scan_fn, causal_conv1d_fn, ""


def versions() -> dict:
    """Installed versions of the kernel packages (None where missing)."""
    from importlib import metadata

    found = {}
    for dist in ("mamba-ssm", "causal-conv1d"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found
