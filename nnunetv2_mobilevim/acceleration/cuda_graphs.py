"""What every CUDA-graph capture in this package shares: the key a graph is valid for (with nnU-Net's
deep-supervision switch), autocast without its weight cache, cuDNN's algorithm choice while capturing,
and how a failure is reported."""

from __future__ import annotations

from typing import Hashable, Tuple

import torch
from torch import Tensor, nn


class FastPathWarning(RuntimeWarning):
    """A speed-up could not run and the exact slower path runs instead (results unchanged)."""


def graph_key(x: Tensor, signature: Hashable = None) -> Tuple:
    """What a captured CUDA graph is only valid for: the input's shape, dtype and device, the autocast
    dtype (None without autocast) and a caller's ``signature`` (e.g. deep supervision on or off)."""
    amp_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return tuple(x.shape), x.dtype, x.device, amp_dtype, signature


def deep_supervision_switch(network: nn.Module):
    """nnU-Net's switch for deep supervision (``network.decoder.deep_supervision``, which its trainer
    sets), None for a network without one: a captured graph is valid for one setting."""
    return getattr(getattr(network, "decoder", None), "deep_supervision", None)


def uncached_autocast():
    """The caller's CUDA autocast state (on/off, dtype) with autocast's weight-cast cache off, for
    capturing CUDA graphs: with the cache, a graph would read the half-precision weight copies cached in
    the caller's autocast region (freed when it ends, stale once weights change, as between nnU-Net's
    validation rounds) instead of casting the live weights at every replay."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


def cudnn_autotuning(enabled: bool):
    """cuDNN's algorithm choice for a capture, whatever ``cudnn.benchmark`` says: autotuned
    (``enabled``) or heuristic. Which one pays off differs between inference and training
    (docs/benchmarks.md); the captured graph keeps the algorithms chosen here."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=enabled, deterministic=cudnn.deterministic,
                       allow_tf32=cudnn.allow_tf32)


def training_capture_failed(err: Exception) -> RuntimeError:
    """The error for a training capture that failed: what to do (train eagerly, resume)."""
    return RuntimeError(
        f"capturing the training step as a CUDA graph failed ({err}). Set NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0 "
        "to train with the eager step instead (same results, slower) and rerun the same command "
        "(add --c if checkpoints exist); please report this with your torch and CUDA versions.")
