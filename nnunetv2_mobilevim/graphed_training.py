"""Training forward and backward replayed from CUDA graphs; loss, GradScaler and optimiser stay eager.

MobileViM's training step is launch-bound: about 2,000 small kernels for forward and backward of a
6 M-parameter network, so the host, not the GPU, sets the pace (more so while nnU-Net's augmentation
workers compete for the CPU). PyTorch's ``torch.cuda.make_graphed_callables`` captures the forward
and the backward of a module once and replays each as one launch. We use it as is and only add what
a training loop needs around it: one capture per input signature, capture outside autocast caching
(which it requires), and an eager fallback for anything not captured.

Unchanged results: replay runs the captured kernels on the live parameters (the optimiser updates
them in place), BatchNorm still uses batch statistics and updates its running buffers.
``tests/test_gpu_kernels.py`` checks outputs and gradients against the eager step over several
optimiser steps.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Hashable, Tuple

import torch
from torch import Tensor, nn

from .fast_inference import graph_key


class _ForwardModule(nn.Module):
    """``forward_fn`` as a module whose parameters are ``module``'s (what make_graphed_callables graphs)."""

    def __init__(self, module: nn.Module, forward_fn: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.module = module
        self.forward_fn = forward_fn

    def forward(self, x: Tensor) -> Any:
        return self.forward_fn(x)


class TrainingGraphs:
    """Calls ``forward_fn(x)`` (a forward of ``module``) through captured forward/backward CUDA graphs.

        graphs = TrainingGraphs(network, network.forward)
        loss = loss_fn(graphs(x), y); loss.backward()   # gradients land in network's .grad as usual

    One capture per (shape, dtype, device, autocast dtype, ``signature_fn()``), at most ``max_graphs``;
    other calls run ``forward_fn`` eagerly. The first call for a signature runs ``warmup`` eager
    forward/backward passes on a side stream (cuDNN autotuning, kernel loading; they touch no
    ``.grad`` but do update BatchNorm running statistics), then captures. Outputs are the graph's
    static tensors: use them before the next call.
    """

    def __init__(self, module: nn.Module, forward_fn: Callable[[Tensor], Any], max_graphs: int = 2,
                 warmup: int = 3, signature_fn: Callable[[], Hashable] = lambda: None) -> None:
        self.module, self.forward_fn = module, forward_fn
        self.max_graphs, self.warmup, self.signature_fn = max_graphs, warmup, signature_fn
        self._graphed: Dict[Tuple, Callable[[Tensor], Any]] = {}

    def __call__(self, x: Tensor) -> Any:
        if not (x.is_cuda and torch.is_grad_enabled()):
            return self.forward_fn(x)
        key = graph_key(x, self.signature_fn())
        graphed = self._graphed.get(key)
        if graphed is None:
            if len(self._graphed) >= self.max_graphs:
                return self.forward_fn(x)
            try:
                graphed = self._graphed[key] = self._capture(x)
            except RuntimeError as err:
                raise RuntimeError(
                    f"capturing the training step as CUDA graphs failed ({err}). Set NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0 "
                    "to train with the eager step instead (same results, slower) and rerun the same command "
                    "(add --c if checkpoints exist); please report this with your torch and CUDA versions.") from err
        return graphed(x)

    def _capture(self, x: Tensor) -> Callable[[Tensor], Any]:
        wrapper = _ForwardModule(self.module, self.forward_fn)
        amp = torch.is_autocast_enabled("cuda")
        options: Dict[str, Any] = {"num_warmup_iters": self.warmup, "allow_unused_input": True}
        if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
            # nnU-Net's pin-memory thread may call CUDA while we capture: only this thread is checked
            options["capture_error_mode"] = "thread_local"
        cudnn = torch.backends.cudnn
        # make_graphed_callables refuses autocast's weight-cast cache; casts are then replayed each step.
        # cuDNN autotunes while capturing, whatever cudnn.benchmark says: for MobileViM's channels_last
        # depthwise 3D convolutions its heuristics pick a weight-gradient kernel that launches ~13 times
        # per convolution (measured in nnU-Net on an H100: 84 ms per step instead of ~20).
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False), \
                cudnn.flags(enabled=cudnn.enabled, benchmark=True, deterministic=cudnn.deterministic,
                            allow_tf32=cudnn.allow_tf32):
            return torch.cuda.make_graphed_callables(wrapper, (x.detach().clone(),), **options)

    def __len__(self) -> int:
        return len(self._graphed)
