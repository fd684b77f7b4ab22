"""Selective-scan backends behind one interface.

``selective_scan(...)`` and ``causal_conv1d(...)`` run the mamba-ssm / causal-conv1d kernels on CUDA
tensors when they are installed and the exact PyTorch path otherwise. The environment variable
``NNUNETV2_MOBILEVIM_SCAN`` overrides the choice:

    auto      (default) kernels for CUDA tensors when importable, else PyTorch
    mamba_ssm  kernels, or a clear error if they cannot run here (never a silent fallback)
    torch      always the PyTorch path
"""

from __future__ import annotations

import os
from typing import Optional

from torch import Tensor

from .mamba_ssm_scan import INSTALL_HINT, load_kernels
from .torch_scan import causal_conv1d_torch, selective_scan_loop, selective_scan_torch

ENV_VAR = "NNUNETV2_MOBILEVIM_SCAN"
BACKENDS = ("auto", "mamba_ssm", "torch")

__all__ = ["ENV_VAR", "BACKENDS", "requested_backend", "resolve_backend", "selective_scan",
           "causal_conv1d", "selective_scan_torch", "selective_scan_loop", "causal_conv1d_torch"]


class ScanBackendError(RuntimeError):
    """The requested scan backend cannot run in this environment."""


def requested_backend() -> str:
    """The backend asked for through ``NNUNETV2_MOBILEVIM_SCAN`` (validated)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ScanBackendError(f"{ENV_VAR}={value!r} is not one of {BACKENDS}")
    return value


def resolve_backend(is_cuda: bool, requested: Optional[str] = None) -> str:
    """Which backend runs for tensors on CUDA (``is_cuda``) or not: ``"mamba_ssm"`` or ``"torch"``."""
    requested = requested or requested_backend()
    if requested == "torch":
        return "torch"
    scan_fn, _, reason = load_kernels()
    if requested == "mamba_ssm":
        if scan_fn is None:
            raise ScanBackendError(f"{ENV_VAR}=mamba_ssm but {reason}; {INSTALL_HINT}")
        if not is_cuda:
            raise ScanBackendError(
                f"{ENV_VAR}=mamba_ssm but the tensors are on the CPU: the kernels run on CUDA only. "
                f"Move the network to a GPU or set {ENV_VAR}=torch (or auto).")
        return "mamba_ssm"
    return "mamba_ssm" if (is_cuda and scan_fn is not None) else "torch"


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False, backend: Optional[str] = None) -> Tensor:
    """Shapes as ``mamba_ssm``'s ``selective_scan_fn`` (see ``torch_scan``); returns (B, D, L)."""
    if resolve_backend(u.is_cuda, backend) == "mamba_ssm":
        scan_fn = load_kernels()[0]
        return scan_fn(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                       D=D, z=None if z is None else z.contiguous(), delta_bias=delta_bias,
                       delta_softplus=delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str] = None) -> Tensor:
    """Depthwise causal conv1d + SiLU; x (B, D, L), weight (D, W). causal-conv1d kernel when it can run."""
    if resolve_backend(x.is_cuda, backend) == "mamba_ssm":
        conv_fn = load_kernels()[1]
        if conv_fn is not None and weight.shape[-1] in (2, 3, 4):
            return conv_fn(x.contiguous(), weight.contiguous(), bias, activation="silu")
    return causal_conv1d_torch(x, weight, bias, activation="silu")
