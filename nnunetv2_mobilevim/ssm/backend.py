"""Selective-scan backends behind one interface.

``selective_scan(...)`` and ``causal_conv1d(...)`` run the mamba-ssm / causal-conv1d kernels on CUDA
tensors when they are installed and the exact PyTorch path otherwise. The environment variable
``NNUNETV2_MOBILEVIM_SCAN`` (read once per process, at first use) overrides the choice, and so does a
layer's ``scan_backend`` argument:

    auto      (default) kernels for CUDA tensors when importable, else PyTorch; on CUDA the fallback
               is said once per process (a ScanFallbackWarning naming the reason and the fix)
    mamba_ssm  both kernels, or a ScanBackendError if either cannot run here (never a fallback)
    torch      always the PyTorch path, silently
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .mamba_ssm_kernels import INSTALL_HINT, load_causal_conv1d, load_kernels, load_scan_kernel, reset_kernel_cache
from .torch_scan import causal_conv1d_torch, selective_scan_loop, selective_scan_torch

ENV_VAR = "NNUNETV2_MOBILEVIM_SCAN"
BACKENDS = ("auto", "mamba_ssm", "torch")
CONV_WIDTHS = (2, 3, 4)  # the widths causal-conv1d's kernel is built for

__all__ = ["ENV_VAR", "BACKENDS", "ScanBackendError", "ScanFallbackWarning", "requested_backend",
           "resolve_backend", "conv_backend", "describe_backend", "reset_backend_state", "selective_scan",
           "causal_conv1d", "selective_scan_torch", "selective_scan_loop", "causal_conv1d_torch",
           "load_kernels", "INSTALL_HINT", "eager_under_compile"]


def eager_under_compile(fn: Callable) -> Callable:
    """``fn`` kept out of torch.compile's graphs (``torch.compiler.disable(fn)``, a graph break around it: the
    mamba-ssm kernels are opaque to the compiler, and the compiler can fuse the code around them), with the
    decorator applied at the first call under torch.compile instead of at import. Deliberately not the plain
    decorator: it imports torch._dynamo at class definition, seconds of a CPU prediction that compiles
    nothing (docs/nnunet.md, "Prediction"). Outside torch.compile, ``fn`` itself runs."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return call


class ScanBackendError(RuntimeError):
    """The requested scan backend cannot run in this environment."""


class ScanFallbackWarning(RuntimeWarning):
    """CUDA tensors run (part of) the scan in PyTorch because a kernel cannot; issued once per reason."""


_warned: set = set()


def _warn_once(key: Tuple[str, str], message: str) -> None:
    # Our own once-per-process record: the warnings module's own registry is per call site and is
    # reset by pytest and by warnings.simplefilter.
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, ScanFallbackWarning, stacklevel=3)


def _validated(value: str, source: str) -> str:
    value = value.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ScanBackendError(f"{source}={value!r} is not one of {BACKENDS}")
    return value


@functools.lru_cache(maxsize=1)
def requested_backend() -> str:
    """The backend asked for through ``NNUNETV2_MOBILEVIM_SCAN`` (validated), read once per process."""
    return _validated(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def reset_backend_state() -> None:
    """Read ``NNUNETV2_MOBILEVIM_SCAN`` again, import the kernels again and warn again at next use.

    For tests and for programs that change the variable at run time (a layer's ``scan_backend``
    needs no reset).
    """
    requested_backend.cache_clear()
    reset_kernel_cache()
    _warned.clear()


def _request(requested: Optional[str]) -> Tuple[str, str]:
    """(backend asked for, how it was asked: for messages)."""
    if requested:
        return _validated(requested, "scan_backend"), f"scan_backend={requested!r}"
    value = requested_backend()
    return value, f"{ENV_VAR}={value}"


def resolve_backend(is_cuda: bool, requested: Optional[str] = None, *, warn: bool = True) -> str:
    """Which backend runs the scan for tensors on CUDA (``is_cuda``) or not: ``"mamba_ssm"`` or ``"torch"``.

    ``requested`` (a layer's ``scan_backend``) overrides ``NNUNETV2_MOBILEVIM_SCAN``. An explicit
    ``mamba_ssm`` that cannot run raises ScanBackendError; ``auto`` on CUDA without the kernel warns
    once (unless ``warn`` is False) and returns ``"torch"``.
    """
    requested, asked = _request(requested)
    if requested == "torch":
        return "torch"
    scan = load_scan_kernel()
    if requested == "mamba_ssm":
        if scan.fn is None:
            raise ScanBackendError(f"{asked} but the mamba-ssm kernels could not be imported: {scan.problem}. "
                                   f"To fix: {scan.fix}; or set {ENV_VAR}=torch (or auto).")
        if not is_cuda:
            raise ScanBackendError(
                f"{asked} but the tensors are on the CPU: the kernels run on CUDA only. "
                f"Move the network to a GPU or set {ENV_VAR}=torch (or auto).")
        return "mamba_ssm"
    if not is_cuda:
        return "torch"  # the kernels are CUDA-only: the expected path, nothing to say
    if scan.fn is None:
        if warn:
            _warn_once(("scan", scan.problem), (
                f"MobileViM: the selective scan runs in PyTorch on this GPU (exact, but much slower than the "
                f"mamba-ssm kernels) because {scan.problem}. To fix: {scan.fix}. To choose PyTorch explicitly "
                f"and silence this warning: export {ENV_VAR}=torch."))
        return "torch"
    return "mamba_ssm"


def conv_backend(is_cuda: bool, width: int, requested: Optional[str] = None, *, warn: bool = True) -> str:
    """Which implementation runs the causal conv1d of kernel ``width``: ``"causal_conv1d"`` or ``"torch"``.

    The conv follows the scan's backend. With the scan on the kernels, an unusable causal-conv1d
    (missing, broken, or a width it was not built for) raises ScanBackendError when ``mamba_ssm``
    was asked for explicitly and otherwise warns once and runs the conv in PyTorch.
    """
    if resolve_backend(is_cuda, requested, warn=warn) == "torch":
        return "torch"
    conv = load_causal_conv1d()
    problem, fix = conv.problem, conv.fix
    if conv.fn is not None and width not in CONV_WIDTHS:
        problem = f"causal-conv1d's kernel supports conv widths {CONV_WIDTHS} and this layer's d_conv is {width}"
        fix = f"build the network with d_conv in {CONV_WIDTHS}"
    if not problem:
        return "causal_conv1d"
    requested, asked = _request(requested)
    if requested == "mamba_ssm":
        raise ScanBackendError(f"{asked} needs the causal-conv1d kernel as well, but {problem}. To fix: {fix}; "
                               f"or set {ENV_VAR}=auto (the conv then runs in PyTorch, with a warning).")
    if warn:
        _warn_once(("conv", problem), (
            f"MobileViM: the causal conv1d runs in PyTorch on this GPU (exact, slower; the selective scan "
            f"still uses the mamba-ssm kernels) because {problem}. To fix: {fix}."))
    return "torch"


def describe_backend(is_cuda: bool, requested: Optional[str] = None) -> str:
    """One line for a log: what runs the scan and the conv for CUDA (``is_cuda``) or CPU tensors, and why.

    Raises ScanBackendError where ``resolve_backend`` does (an explicit request that cannot run).
    """
    backend = resolve_backend(is_cuda, requested, warn=False)
    requested, asked = _request(requested)
    scan = load_scan_kernel()
    if backend == "torch":
        if requested == "torch":
            why = asked
        elif not is_cuda:
            why = "CPU tensors; the mamba-ssm kernels run on CUDA only"
        else:
            why = f"mamba-ssm kernels not importable: {scan.problem}; to fix: {scan.fix}"
        return f"selective scan: PyTorch ({why})"
    conv = load_causal_conv1d()
    if conv.fn is not None:
        conv_text = f"causal-conv1d {conv.version or '(version unknown)'}"
    elif requested == "mamba_ssm":
        conv_text = (f"causal-conv1d not usable, so the first forward raises ({asked}): {conv.problem}; "
                     f"to fix: {conv.fix}")
    else:
        conv_text = f"causal conv1d in PyTorch: {conv.problem}; to fix: {conv.fix}"
    return f"selective scan: mamba_ssm kernels (mamba-ssm {scan.version or '(version unknown)'}, {conv_text})"


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = False, backend: Optional[str] = None) -> Tensor:
    """Shapes as ``mamba_ssm``'s ``selective_scan_fn`` (see ``torch_scan``); returns (B, D, L)."""
    if resolve_backend(u.is_cuda, backend) == "mamba_ssm":
        scan_fn = load_scan_kernel().fn
        if B.dim() == 3:  # the kernel takes groups only: (B, N, L) is one group (as mamba-ssm's wrapper does)
            B, C = B.unsqueeze(1), C.unsqueeze(1)
        return scan_fn(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                       D=D, z=None if z is None else z.contiguous(), delta_bias=delta_bias,
                       delta_softplus=delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str] = None) -> Tensor:
    """Depthwise causal conv1d + SiLU; x (B, D, L), weight (D, W). causal-conv1d kernel when it can run."""
    if conv_backend(x.is_cuda, weight.shape[-1], backend) == "causal_conv1d":
        return load_causal_conv1d().fn(x.contiguous(), weight.contiguous(), bias, activation="silu")
    return causal_conv1d_torch(x, weight, bias, activation="silu")
