"""Inference speed-ups that leave results unchanged: BatchNorm folding and CUDA-graph replay.

MobileViM's forward is launch-bound on a modern GPU (hundreds of small kernels for ~47 GMACs), so
replaying one captured CUDA graph per input shape removes the host overhead, and folding each
eval-mode BatchNorm into the convolution before it removes one kernel per convolution.
``tests/test_fast_inference.py`` (CPU) and the benchmark (GPU) check that logits do not change.
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONVS = (nn.Conv3d, nn.ConvTranspose3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv3d/ConvTranspose3d -> BatchNorm3d pair in an
    ``nn.Sequential`` fused into one convolution (PyTorch's ``fuse_conv_bn_eval``)."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, _CONVS) and isinstance(norm, nn.BatchNorm3d) and norm.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose3d))
                module._modules[second] = nn.Identity()
    return folded


class CUDAGraphRunner:
    """Calls an eval-mode CUDA module through one captured CUDA graph per input shape / dtype / autocast.

    runner = CUDAGraphRunner(model); logits = runner(x)   # x on CUDA; gradients are not supported
    """

    def __init__(self, module: nn.Module, warmup: int = 2) -> None:
        self.module, self.warmup = module, warmup
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def _key(self, x: Tensor) -> Tuple:
        amp = torch.is_autocast_enabled("cuda")
        return tuple(x.shape), x.dtype, x.device, amp, torch.get_autocast_dtype("cuda") if amp else None

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        key = self._key(x)
        if key not in self._graphs:
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN autotuning, lazy init)
                for _ in range(self.warmup):
                    self.module(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.module(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()
