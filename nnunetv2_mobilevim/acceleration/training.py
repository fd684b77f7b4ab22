"""Training replayed from CUDA graphs, in two scopes:

- ``TrainingGraphs``: the network's forward and backward (loss, GradScaler and optimiser stay eager),
  for any training loop: ``TrainingGraphs(network, network.forward)``;
- ``GraphedTrainStep``: a whole training step (forward, loss, backward, unscale, clipping, optimiser
  update, GradScaler update) as one graph, for a loop whose step is known, as nnU-Net's is
  (``nnUNetTrainerMobileViM``);
- ``RunAhead``: for a loop that reads no result back per step, a bound on how many steps the host
  queues ahead of the GPU.

MobileViM's training step is launch-bound: about 2,000 small kernels for forward and backward of a
6 M-parameter network, so the host, not the GPU, sets the pace (more so while nnU-Net's augmentation
workers compete for the CPU). Capturing once per input signature and replaying removes that.

``TrainingGraphs`` is deliberately not ``torch.cuda.make_graphed_callables``, whose recipe it follows
(warm-up on a side stream, backward graph in the forward graph's memory pool, static input/output
buffers): that hands each parameter's gradient back through autograd, and the engine's per-parameter
``AccumulateGrad`` then cost 7.7 ms of host time per step for MobileViM_s's 347 parameters inside
nnU-Net (H100, docs/benchmarks/h100_nnunet_step_profile.json), more than the GPU work of the whole
forward. Here the replayed backward deposits the gradients on ``.grad`` directly (a reference to the
step's gradient buffer when ``.grad`` is None, as after nnU-Net's ``zero_grad(set_to_none=True)``; an
in-place add otherwise, so gradient accumulation still sums).

Unchanged results: replay runs the captured kernels on the live parameters (the optimiser updates
them in place); BatchNorm uses batch statistics and updates its running buffers exactly as the eager
step does (the warm-up passes before capture leave them as they were, or are real steps).
``tests/acceleration/test_gpu_graphs.py`` checks both scopes against the eager step over several optimiser steps.
Not supported, by design: hooks on parameters (their gradients never pass through autograd; DDP
needs them and keeps the eager step) and inputs that require gradients (those run eagerly).
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Callable, Deque, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .cuda_graphs import (
    FastPathWarning,
    cudnn_autotuning,
    deep_supervision_switch,
    graph_key,
    training_capture_failed,
    uncached_autocast,
)


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

    One capture per (shape, dtype, device, autocast dtype, ``signature_fn()``; by default nnU-Net's
    deep-supervision switch), at most ``max_graphs``; other calls, and calls in eval mode, without
    gradients or off CUDA, run ``forward_fn`` eagerly. The first call for a signature runs ``warmup`` eager
    forward/backward passes on a side stream, then captures. Outputs are the graph's static tensors:
    use them before the next call.
    """

    def __init__(self, module: nn.Module, forward_fn: Callable[[Tensor], Any], max_graphs: int = 2,
                 warmup: int = 3, signature_fn: Optional[Callable[[], Hashable]] = None) -> None:
        self.module, self.forward_fn = module, forward_fn
        self.max_graphs, self.warmup = max_graphs, warmup
        self.signature_fn = signature_fn or (lambda: deep_supervision_switch(module))
        self._steps: Dict[Tuple, _CapturedStep] = {}
        self._anchor: Optional[Tensor] = None
        self._eager_told: set = set()

    def __call__(self, x: Tensor) -> Any:
        if not (x.is_cuda and torch.is_grad_enabled() and self.module.training) or x.requires_grad:
            return self.forward_fn(x)
        key = graph_key(x, self.signature_fn())
        step = self._steps.get(key)
        if step is None:
            if len(self._steps) >= self.max_graphs:
                if key not in self._eager_told:
                    self._eager_told.add(key)
                    warnings.warn(f"graphed training: input {tuple(x.shape)} is signature {len(self._steps) + 1} "
                                  f"and at most {self.max_graphs} are captured; it runs eagerly (same results, "
                                  "slower).", FastPathWarning, stacklevel=2)
                return self.forward_fn(x)
            try:
                step = self._steps[key] = self._capture(x)
            except RuntimeError as err:
                raise training_capture_failed(err) from err
        if self._anchor is None:
            self._anchor = torch.zeros((), device=x.device, requires_grad=True)
        return tree_unflatten(list(_Replay.apply(step, self._anchor, x)), step.spec)

    def _capture(self, x: Tensor) -> _CapturedStep:
        params = [p for p in self.module.parameters() if p.requires_grad]
        buffers = list(self.module.buffers())
        # autotuned: for channels_last depthwise 3D convolutions cuDNN's heuristics pick a weight-gradient
        # kernel that launches many times per convolution (docs/benchmarks.md)
        with uncached_autocast(), cudnn_autotuning(True):
            return _CapturedStep(self.forward_fn, params, buffers, x, self.warmup)

    def __len__(self) -> int:
        return len(self._steps)


class GraphedTrainStep:
    """A whole training step replayed from one CUDA graph per input signature.

        step = GraphedTrainStep(step_fn, optimizer)
        loss = step(x, *targets)     # the effect of optimizer.zero_grad(set_to_none=True); step_fn(x, *targets)

    ``step_fn(*inputs) -> Tensor`` is one complete step on CUDA tensors: forward, loss, backward, the
    optimiser's update (with AMP also GradScaler's unscale/step/update); it returns the loss and must
    not synchronise with the host (no ``.item()``, no ``.cpu()``; fused or capturable optimisers).

    The first ``warmup`` calls of a signature (shapes, dtypes; at most ``max_graphs`` signatures, others
    stay eager) run ``step_fn`` eagerly: real training steps, which also autotune cuDNN and create the
    optimiser's and GradScaler's state. The next call captures and replays; from then on a call copies
    the inputs into the graph's buffers and replays, and gradients stay in the graph's buffers (``.grad``
    points at them). Learning rates are read from the optimisers' ``param_groups`` at every call, so
    schedulers work unchanged: the graph reads each group's rate from a device tensor that a call
    refreshes, while ``group["lr"]`` stays the float that schedulers and checkpoints expect.
    State the graph holds by address must not be replaced after capture (``optimizer.load_state_dict``,
    ``module.to(...)``): build a new ``GraphedTrainStep`` then.
    """

    def __init__(self, step_fn: Callable[..., Tensor], optimizers: Sequence[torch.optim.Optimizer],
                 warmup: int = 3, max_graphs: int = 2, log: Optional[Callable[[str], None]] = None) -> None:
        self.step_fn, self.optimizers = step_fn, list(optimizers)
        self.warmup, self.max_graphs = warmup, max_graphs
        self.log = log or (lambda message: warnings.warn(message, FastPathWarning, stacklevel=3))
        self._graphs: Dict[Tuple, _GraphedStep] = {}
        self._eager_calls: Dict[Tuple, int] = {}
        self._said_eager = False
        self._grads_of: Optional[Tuple] = None  # the signature whose gradient buffers .grad points at
        self._stream: Optional[torch.cuda.Stream] = None
        self._lr: List[Tuple[dict, Tensor, float]] = []  # (param group, device tensor, the value it holds)

    def __call__(self, *inputs: Tensor) -> Tensor:
        key = tuple(graph_key(x) for x in inputs)
        if key not in self._graphs:
            calls = self._eager_calls.get(key, 0)
            if len(self._graphs) >= self.max_graphs and not self._said_eager:
                self._said_eager = True
                self.log(f"CUDA-graph training step: a batch of shape {[tuple(x.shape) for x in inputs]} is input "
                         f"signature {len(self._graphs) + 1}, and at most {self.max_graphs} are captured; "
                         "batches of further signatures train with the eager step (same updates, slower).")
            if calls < self.warmup or len(self._graphs) >= self.max_graphs:
                self._eager_calls[key] = calls + 1
                self._grads_of = None
                return self._eager(inputs)
            try:
                self._graphs[key] = self._capture(inputs)
            except RuntimeError as err:
                raise training_capture_failed(err) from err
        step = self._graphs[key]
        for static, x in zip(step.inputs, inputs):
            static.copy_(x, non_blocking=True)
        for i, (group, lr, value) in enumerate(self._lr):
            if group["lr"] != value:
                lr.fill_(group["lr"])
                self._lr[i] = (group, lr, group["lr"])
        if self._grads_of != key:  # an eager step or another graph ran since: .grad points elsewhere
            for p, g in step.grads:
                p.grad = g
            self._grads_of = key
        step.graph.replay()
        return step.loss.clone()

    def __len__(self) -> int:
        return len(self._graphs)

    def _side_stream(self) -> torch.cuda.Stream:
        # eager steps and captures on one stream: autograd warns and syncs when a backward runs on
        # another stream than the one its leaves' gradient accumulators were made on
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def _eager(self, inputs: Sequence[Tensor]) -> Tensor:
        inputs = [x.cuda(non_blocking=True) for x in inputs]
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), cudnn_autotuning(True):
            self._zero_grad()
            loss = self.step_fn(*inputs).detach()
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, inputs: Sequence[Tensor]) -> "_GraphedStep":
        static_inputs = [torch.empty_like(x, device="cuda") for x in inputs]
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream())
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        self._zero_grad()  # gradients are then allocated inside the graph: fixed addresses, rewritten each replay
        saved = self._lr_as_tensors()
        try:
            # nnU-Net's pin-memory thread may use CUDA while we capture: only this thread is checked
            with cudnn_autotuning(True), torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                static_loss = self.step_fn(*static_inputs).detach()
        finally:
            for group, (lr, capturable) in saved:
                group["lr"] = lr
                if capturable is not None:
                    group["capturable"] = capturable
        # the gradients the graph writes (allocated during capture, fixed addresses): .grad shows them
        grads = [(p, p.grad) for opt in self.optimizers for group in opt.param_groups for p in group["params"]
                 if p.grad is not None]
        self._grads_of = None
        return _GraphedStep(graph, static_inputs, static_loss, grads)

    def _lr_as_tensors(self) -> List[Tuple[dict, Tuple[float, Optional[bool]]]]:
        """Give every param group a device-tensor learning rate (and ``capturable``, which Adam-type
        optimisers require while a graph captures) for the capture; returns what to restore after."""
        saved = []
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                saved.append((group, (group["lr"], group.get("capturable"))))
                known = next((t for g, t, _ in self._lr if g is group), None)
                if known is None:
                    device = next(p.device for p in group["params"])
                    known = torch.full((), float(group["lr"]), dtype=torch.float32, device=device)
                    self._lr.append((group, known, group["lr"]))
                group["lr"] = known
                if "capturable" in group:
                    group["capturable"] = True
        return saved


class RunAhead:
    """At most ``steps`` training steps queued on the GPU ahead of the host, for a loop that reads nothing
    back per step.

        ahead = RunAhead(steps=2)
        loss = graphed_step(x, y); ahead.step_queued(device)   # waits only for the step `steps` calls ago

    Reading each step's loss on the host (nnU-Net's ``loss.cpu()``) waits for the step to finish, so the
    GPU idles while the host fetches and launches the next one. Without that read nothing stops the host
    from queueing step after step, each holding its batch in device memory; this waits, on a CUDA event
    recorded on the current stream, for the step ``steps`` calls back. Off CUDA it does nothing (there
    every step has finished when it returns).
    """

    def __init__(self, steps: int = 2) -> None:
        if steps < 1:
            raise ValueError(f"RunAhead needs steps >= 1 (got {steps}): with 0 the host would wait for every "
                             "step, which reading its loss does already")
        self.steps = steps
        self._queued: Deque[torch.cuda.Event] = deque()

    def step_queued(self, device: torch.device) -> None:
        """Call after queueing a step on ``device``; returns once at most ``steps`` steps are unfinished."""
        if device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._queued.append(event)
        while len(self._queued) > self.steps:
            self._queued.popleft().synchronize()

    def __len__(self) -> int:
        """Steps recorded and not yet waited for (some may have finished)."""
        return len(self._queued)


class _GraphedStep(NamedTuple):
    """One captured training step: the graph, its input buffers, its loss and the gradient buffers it
    writes (``(parameter, gradient)`` pairs)."""

    graph: "torch.cuda.CUDAGraph"
    inputs: List[Tensor]
    loss: Tensor
    grads: List[Tuple[nn.Parameter, Tensor]]
