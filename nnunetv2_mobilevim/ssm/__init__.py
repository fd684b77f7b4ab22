"""State-space (Mamba) layers and the selective scan behind them.

- ``backend``: which implementation runs the scan and the causal conv (mamba-ssm kernels on CUDA,
  the exact PyTorch path elsewhere), chosen once per process and never silently;
- ``torch_scan`` / ``mamba_ssm_kernels``: the two implementations;
- ``dual_direction_mamba``: the dual-direction Mamba layer of MobileViM's Algorithm 1.
"""

from .backend import (
    ENV_VAR,
    ScanBackendError,
    ScanFallbackWarning,
    causal_conv1d,
    conv_backend,
    describe_backend,
    eager_under_compile,
    load_kernels,
    requested_backend,
    reset_backend_state,
    resolve_backend,
    selective_scan,
)
from .dual_direction_mamba import DualDirectionMamba

__all__ = ["ENV_VAR", "ScanBackendError", "ScanFallbackWarning", "causal_conv1d", "conv_backend", "describe_backend",
           "eager_under_compile", "load_kernels", "requested_backend", "reset_backend_state", "resolve_backend",
           "selective_scan", "DualDirectionMamba"]
