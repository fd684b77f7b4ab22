"""The mamba-ssm / causal-conv1d kernel backend (CUDA only).

mamba-ssm's selective-scan kernel computes exactly the recurrence of Algorithm 1 (A of shape (D, N)
broadcast over the batch, B and C per group, float32 state inside the kernel), so it is the kernel
that fits; Mamba2's SSD kernels need A to be one scalar per head, which Algorithm 1's A_d of size M
is not. Imports happen on first use so that importing the package never needs the kernels.

We call mamba-ssm's compiled kernel module ``selective_scan_cuda`` through a 30-line autograd
function instead of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``, deliberately:
importing the latter runs mamba_ssm's package ``__init__`` (triton kernels, Mamba2/Mamba3, the language
model), which took 4.3-7.2 s on an H100 machine, paid by every ``nnUNetv2_predict``. The arguments
are those mamba-ssm's own ``SelectiveScanFn`` passes; ``tests/ssm/test_gpu_kernels.py`` checks that both
give identical outputs and gradients.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch

INSTALL_HINT = (
    "install the GPU extra on a machine with CUDA and nvcc: "
    "pip install 'nnunetv2-mobilevim[gpu]' --no-build-isolation "
    "(mamba-ssm and causal-conv1d compile against your torch; see the README)"
)


class _SelectiveScanKernel(torch.autograd.Function):
    """u, delta, z: (B, D, L); A: (D, N); B, C: (B, G, N, L); D, delta_bias: (D,) -> (B, D, L)."""

    @staticmethod
    def forward(ctx, kernel, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
        out, states, *rest = kernel.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.kernel, ctx.delta_softplus, ctx.has_z = kernel, delta_softplus, z is not None
        # with z the kernel returns out * silu(z) in rest[0] and needs the ungated out for backward
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, out if ctx.has_z else None)
        return rest[0] if ctx.has_z else out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, states, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = ctx.kernel.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), states, out, None, ctx.delta_softplus, False)
        return (None, du, ddelta, dA, dB, dC, dD if D is not None else None, rest[0] if ctx.has_z else None,
                ddelta_bias if delta_bias is not None else None, None)


def _scan_with(kernel) -> Callable:
    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        """mamba-ssm's ``selective_scan_fn`` signature; B and C must be 4-D (B, G, N, L)."""
        return _SelectiveScanKernel.apply(kernel, u, delta, A, B, C, None if D is None else D.contiguous(), z,
                                          delta_bias, delta_softplus)
    return selective_scan_fn


class KernelImport(NamedTuple):
    """The outcome of importing one kernel package: its function, or what went wrong and what to do."""

    fn: Optional[Callable]
    version: Optional[str]  # the installed distribution's version; None when not installed
    problem: str  # "" when ``fn`` can be called
    fix: str  # "" when ``fn`` can be called


def _installed_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist`` (e.g. "mamba-ssm"), None when not installed.
    Also ``check``'s lookup for nnunetv2."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _import_failure(dist: str, module: str, force_build_var: str, err: Exception) -> KernelImport:
    """Tell "not installed" from "installed but broken" (an ABI mismatch is the usual cause)."""
    version = _installed_version(dist)
    if version is None and isinstance(err, ModuleNotFoundError) and err.name == module:
        return KernelImport(None, None, f"{dist} is not installed", INSTALL_HINT)
    spec = f"{dist}=={version}" if version else dist
    problem = (f"{dist} {version or '(version unknown)'} is installed but {module} failed to import "
               f"({type(err).__name__}: {err})")
    abi = ("; an 'undefined symbol' means it was compiled for another torch or CUDA"
           if "undefined symbol" in str(err) else "")
    fix = (f"rebuild it against this torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}){abi}: "
           f"{force_build_var}=TRUE pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps "
           f"'{spec}'")
    return KernelImport(None, version, problem, fix)


@functools.lru_cache(maxsize=None)
def load_scan_kernel() -> KernelImport:
    """mamba-ssm's selective-scan kernel as ``selective_scan_fn``, imported once per process."""
    try:
        import selective_scan_cuda  # mamba-ssm's compiled kernels (a top-level extension module)
    except Exception as err:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
        return _import_failure("mamba-ssm", "selective_scan_cuda", "MAMBA_FORCE_BUILD", err)
    return KernelImport(_scan_with(selective_scan_cuda), _installed_version("mamba-ssm"), "", "")


@functools.lru_cache(maxsize=None)
def load_causal_conv1d() -> KernelImport:
    """causal-conv1d's ``causal_conv1d_fn``, imported once per process."""
    try:
        from causal_conv1d import causal_conv1d_fn  # a light package: its kernels and torch only
    except Exception as err:
        return _import_failure("causal-conv1d", "causal_conv1d", "CAUSAL_CONV1D_FORCE_BUILD", err)
    return KernelImport(causal_conv1d_fn, _installed_version("causal-conv1d"), "", "")


def load_kernels() -> Tuple[Optional[Callable], Optional[Callable], str]:
    """(selective_scan_fn, causal_conv1d_fn or None, why the scan kernel is missing or "")."""
    scan = load_scan_kernel()
    if scan.fn is None:
        return None, None, scan.problem
    return scan.fn, load_causal_conv1d().fn, ""


def reset_kernel_cache() -> None:
    """Forget the import outcomes so that the next use imports again (for tests)."""
    load_scan_kernel.cache_clear()
    load_causal_conv1d.cache_clear()


def versions() -> dict:
    """Installed versions of the kernel packages (None where missing)."""
    return {dist: _installed_version(dist) for dist in ("mamba-ssm", "causal-conv1d")}
