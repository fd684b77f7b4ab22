"""Training forward and backward replayed from CUDA graphs; loss, GradScaler and optimiser stay eager.

MobileViM's training step is launch-bound: about 2,000 small kernels for forward and backward of a
6 M-parameter network, so the host, not the GPU, sets the pace (more so while nnU-Net's augmentation
workers compete for the CPU). We capture the forward and the backward of the network once per input
signature and replay each as one launch.

Deliberately not ``torch.cuda.make_graphed_callables``, whose recipe this follows (warm-up on a side
stream, backward graph in the forward graph's memory pool, static input/output buffers): it hands
each parameter's gradient back through autograd, and the engine's per-parameter ``AccumulateGrad``
then cost 7.7 ms of host time per step for MobileViM_s's 347 parameters inside nnU-Net (H100,
docs/benchmarks/h100_nnunet_step_profile.json), more than the GPU work of the whole forward. Here
the replayed backward deposits the gradients on ``.grad`` directly (a reference to the step's
gradient buffer when ``.grad`` is None, as after nnU-Net's ``zero_grad(set_to_none=True)``; an
in-place add otherwise, so gradient accumulation still sums).

Unchanged results: replay runs the captured kernels on the live parameters (the optimiser updates
them in place); BatchNorm uses batch statistics and updates its running buffers exactly as the eager
step does (the warm-up passes before capture leave them as they were). ``tests/test_gpu_kernels.py``
checks outputs, gradients and running statistics against the eager step over several optimiser steps.
Not supported, by design: hooks on parameters (their gradients never pass through autograd; DDP
needs them and keeps the eager step) and inputs that require gradients (those run eagerly).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .fast_inference import graph_key, uncached_autocast


class _CapturedStep:
    """Forward and backward of ``forward_fn`` captured as two CUDA graphs for one input signature.

    ``static_x`` ``(B, C, D, H, W)`` is the input buffer, ``static_outputs`` the (flattened) outputs,
    ``static_grad_outputs`` the incoming output gradients; ``_lent`` pairs each parameter the forward
    uses with the buffer its gradient is replayed into.
    """

    def __init__(self, forward_fn: Callable[[Tensor], Any], params: List[nn.Parameter],
                 buffers: List[Tensor], x: Tensor, warmup: int) -> None:
        self.static_x = x.detach().clone()
        saved = [b.clone() for b in buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # warm-up and capture on one stream: autograd keeps the stream its leaves' gradient accumulators
        # were created on and warns (and syncs) when a later backward runs on another
        with torch.cuda.stream(side):  # eager passes first: cuDNN autotuning, lazy kernel loading, workspaces
            for _ in range(warmup):
                outs = [o for o in tree_flatten(forward_fn(self.static_x))[0] if o.requires_grad]
                torch.autograd.grad(outs, params, [torch.ones_like(o) for o in outs], allow_unused=True)
            with torch.no_grad():
                for b, s in zip(buffers, saved):  # the warm-up must not count as training steps
                    b.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # nnU-Net's pin-memory thread may use CUDA while we capture: only this thread is checked
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, stream=side, capture_error_mode="thread_local"):
            outputs = forward_fn(self.static_x)
        flat, self.spec = tree_flatten(outputs)
        if not all(isinstance(o, Tensor) and o.requires_grad for o in flat):
            raise RuntimeError("the graphed training forward must return tensors that require gradients")
        self.static_grad_outputs = [torch.empty_like(o) for o in flat]
        # Parameter gradients are copied into buffers of their own, outside the graphs' memory pool
        # (the backward graph shares the forward's pool, and the next forward replay reuses its
        # blocks, while .grad must outlive it when gradients accumulate), in each parameter's layout
        # (what autograd's AccumulateGrad guarantees and fused optimisers require).
        grad_buffers = [torch.empty_like(p) for p in params]
        with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool(), stream=side,
                              capture_error_mode="thread_local"):
            grads = torch.autograd.grad(flat, params, self.static_grad_outputs, allow_unused=True)
            self._lent = [(p, buf) for p, buf, g in zip(params, grad_buffers, grads) if g is not None]
            # one multi-tensor copy (what torch's optimisers use), not a kernel per parameter
            torch._foreach_copy_([buf for _, buf in self._lent], [g for g in grads if g is not None])
        self.static_outputs = [o.detach() for o in flat]

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self.static_x.copy_(x)
        self.forward_graph.replay()
        return tuple(o.detach() for o in self.static_outputs)  # new tensor objects: autograd marks them

    def backward(self, grad_outputs: Sequence[Tensor]) -> None:
        for static, g in zip(self.static_grad_outputs, grad_outputs):
            static.copy_(g)
        for p, g in self._lent:
            if p.grad is g:  # .grad still holds last step's buffer (not set to None): keep its values
                p.grad = g.clone()
        self.backward_graph.replay()
        for p, g in self._lent:
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)


class _Replay(torch.autograd.Function):
    """Autograd's view of one captured step: replays the forward graph, and the backward graph when
    the loss is differentiated. ``anchor`` (a leaf that requires grad) stands in for the parameters,
    which are not inputs, so that the outputs require grad; it receives no gradient, the parameters'
    land on ``.grad`` directly."""

    @staticmethod
    def forward(ctx, step: _CapturedStep, anchor: Tensor, x: Tensor) -> Tuple[Tensor, ...]:
        ctx.step = step
        return step.forward(x)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        ctx.step.backward(grad_outputs)
        return None, None, None


class TrainingGraphs:
    """Calls ``forward_fn(x)`` (a forward of ``module``) through captured forward/backward CUDA graphs.

        graphs = TrainingGraphs(network, network.forward)
        loss = loss_fn(graphs(x), y); loss.backward()   # gradients land in network's .grad as usual

    One capture per (shape, dtype, device, autocast dtype, ``signature_fn()``), at most ``max_graphs``;
    other calls run ``forward_fn`` eagerly. The first call for a signature runs ``warmup`` eager
    forward/backward passes on a side stream, then captures. Outputs are the graph's static tensors:
    use them before the next call.
    """

    def __init__(self, module: nn.Module, forward_fn: Callable[[Tensor], Any], max_graphs: int = 2,
                 warmup: int = 3, signature_fn: Callable[[], Hashable] = lambda: None) -> None:
        self.module, self.forward_fn = module, forward_fn
        self.max_graphs, self.warmup, self.signature_fn = max_graphs, warmup, signature_fn
        self._steps: Dict[Tuple, _CapturedStep] = {}
        self._anchor: Optional[Tensor] = None

    def __call__(self, x: Tensor) -> Any:
        if not (x.is_cuda and torch.is_grad_enabled()) or x.requires_grad:
            return self.forward_fn(x)
        key = graph_key(x, self.signature_fn())
        step = self._steps.get(key)
        if step is None:
            if len(self._steps) >= self.max_graphs:
                return self.forward_fn(x)
            try:
                step = self._steps[key] = self._capture(x)
            except RuntimeError as err:
                raise RuntimeError(
                    f"capturing the training step as CUDA graphs failed ({err}). Set NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0 "
                    "to train with the eager step instead (same results, slower) and rerun the same command "
                    "(add --c if checkpoints exist); please report this with your torch and CUDA versions.") from err
        if self._anchor is None:
            self._anchor = torch.zeros((), device=x.device, requires_grad=True)
        return tree_unflatten(list(_Replay.apply(step, self._anchor, x)), step.spec)

    def _capture(self, x: Tensor) -> _CapturedStep:
        params = [p for p in self.module.parameters() if p.requires_grad]
        buffers = list(self.module.buffers())
        cudnn = torch.backends.cudnn
        # Autocast's weight-cast cache off (see uncached_autocast). cuDNN autotunes while warming up for
        # capture, whatever cudnn.benchmark says: for MobileViM's channels_last depthwise 3D convolutions
        # its heuristics pick a weight-gradient kernel that launches ~13 times per convolution (measured
        # in nnU-Net on an H100: 84 ms per step instead of ~20).
        with uncached_autocast(), cudnn.flags(enabled=cudnn.enabled, benchmark=True,
                                              deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32):
            return _CapturedStep(self.forward_fn, params, buffers, x, self.warmup)

    def __len__(self) -> int:
        return len(self._steps)
