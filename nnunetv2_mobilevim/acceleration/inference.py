"""Inference speed-ups that leave results unchanged: BatchNorm folding and CUDA-graph replay.

MobileViM's forward is launch-bound on a modern GPU (hundreds of small kernels for ~47 GMACs), so
replaying one captured CUDA graph per input shape removes the host overhead, and folding each
eval-mode BatchNorm into the convolution before it removes one kernel per convolution.
``tests/acceleration/test_inference.py`` (CPU, the graph simulated) and ``test_gpu_graphs.py`` (GPU) check
that logits do not change.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable, Dict, Hashable, Iterator, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights
from torch.utils._pytree import tree_map

from .cuda_graphs import FastPathWarning, cudnn_autotuning, deep_supervision_switch, graph_key, uncached_autocast  # noqa: F401 (re-exported)

# a convolution and the BatchNorm of the same dimension that may follow it
_PAIRS = ((nn.Conv3d, nn.BatchNorm3d), (nn.ConvTranspose3d, nn.BatchNorm3d),
          (nn.Conv2d, nn.BatchNorm2d), (nn.ConvTranspose2d, nn.BatchNorm2d))


def _conv_bn_pairs(model: nn.Module) -> Iterator[Tuple[str, nn.Sequential, str, str, bool]]:
    """(the Sequential's name, the Sequential, the convolution's key, the BatchNorm's key, transposed?) for
    every convolution -> BatchNorm pair that ``fold_batchnorm`` fuses (2D or 3D, transposed or not, the
    BatchNorm tracking running statistics)."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if type(norm) in (bn for c, bn in _PAIRS if isinstance(conv, c)) and norm.track_running_stats:
                yield name, module, first, second, isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every convolution -> BatchNorm pair (2D or 3D, transposed or
    not) in an ``nn.Sequential`` fused into one convolution (PyTorch's ``fuse_conv_bn_eval``)."""
    folded = copy.deepcopy(model).eval()
    for _, module, first, second, transpose in list(_conv_bn_pairs(folded)):
        module._modules[first] = fuse_conv_bn_eval(module._modules[first], module._modules[second], transpose)
        module._modules[second] = nn.Identity()
    return folded


class Refold:
    """Writes ``network``'s current weights, BatchNorms folded, into ``folded`` (a ``fold_batchnorm`` copy of
    ``network``, in any memory format) in place: the values folding again would give (PyTorch's
    ``fuse_conv_bn_weights`` on the same tensors), in the same tensors, so a CUDA graph captured on
    ``folded`` stays valid; without copying the module tree, which folding does (the host's time at every
    validation's start).

        refold = Refold(network, folded); ...train network...; refold()
    """

    def __init__(self, network: nn.Module, folded: nn.Module) -> None:
        self.fused = []  # (conv, BatchNorm, transposed?, the folded convolution)
        fused_keys = set()
        for name, module, first, second, transpose in _conv_bn_pairs(network):
            path = f"{name}.{first}" if name else first
            self.fused.append((module._modules[first], module._modules[second], transpose,
                               folded.get_submodule(path)))
            fused_keys.update((f"{path}.weight", f"{path}.bias"))
        source = network.state_dict(keep_vars=True)
        self.copies = [(source[key], tensor) for key, tensor in folded.state_dict(keep_vars=True).items()
                       if key not in fused_keys]

    @torch.no_grad()
    def __call__(self) -> None:
        for conv, norm, transpose, target in self.fused:
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                norm.eps, norm.weight, norm.bias, transpose)
            target.weight.copy_(weight)
            target.bias.copy_(bias)
        for source, target in self.copies:
            target.copy_(source)


def replay_possible(x: Tensor) -> bool:
    """Whether ``x`` can go through a captured CUDA graph: CUDA tensors only. The CPU tests replace
    this (and the capture) to run everything around the graph on a CPU."""
    return x.is_cuda


class CUDAGraphRunner:
    """Calls an eval-mode CUDA module through one captured CUDA graph per input shape / dtype / autocast
    (and ``signature_fn()``, e.g. whether deep supervision is on).

    runner = CUDAGraphRunner(model); logits = runner(x)   # x on CUDA; gradients are not supported
    The module may return a tensor or a list/tuple of tensors; the runner returns copies.
    ``autotune_cudnn=False`` captures with cuDNN's heuristic algorithms (for MobileViM's many small
    convolutions autotuning costs seconds at the first call and gains nothing, docs/benchmarks.md);
    True leaves ``torch.backends.cudnn.benchmark`` as it is.

    Bounded: at most ``max_graphs`` graphs (each holds a memory pool as large as the forward's
    activations); further signatures, and any signature whose capture failed, run the module eagerly
    (the same logits, slower), which a ``FastPathWarning`` says once per runner and reason.
    """

    def __init__(self, module: nn.Module, warmup: int = 2, signature_fn: Callable[[], Hashable] = lambda: None,
                 autotune_cudnn: bool = False, max_graphs: int = 4) -> None:
        self.module, self.warmup, self.signature_fn = module, warmup, signature_fn
        self.autotune_cudnn, self.max_graphs = autotune_cudnn, max_graphs
        self._graphs: Dict[Tuple, Tuple[Any, Tensor, Any]] = {}
        self._eager: Dict[Tuple, str] = {}  # signatures that run eagerly, and why
        self._told: set = set()

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Any:
        key = graph_key(x, self.signature_fn())
        if key not in self._graphs and key not in self._eager:
            if len(self._graphs) >= self.max_graphs:
                self._eager[key] = (f"more than {self.max_graphs} input signatures: the first {self.max_graphs} "
                                    "run from CUDA graphs, the others eagerly")
            else:
                try:
                    with contextlib.nullcontext() if self.autotune_cudnn else cudnn_autotuning(False):
                        self._graphs[key] = self._capture(x)
                except RuntimeError as err:
                    self._eager[key] = f"capturing a CUDA graph for input {tuple(x.shape)} failed ({err})"
        if key in self._eager:
            self._say_once(self._eager[key])
            return self.module(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return tree_map(lambda t: t.clone(), static_out)

    def __len__(self) -> int:
        return len(self._graphs)

    def _say_once(self, reason: str) -> None:
        if reason not in self._told:
            self._told.add(reason)
            warnings.warn(f"fast inference: {reason}; running the network without graph replay (same results, "
                          "slower).", FastPathWarning, stacklevel=3)

    def _capture(self, x: Tensor) -> Tuple[torch.cuda.CUDAGraph, Tensor, Any]:
        static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with uncached_autocast():
            with torch.cuda.stream(side):  # warm-up outside the graph (lazy initialisation, workspace sizes)
                for _ in range(self.warmup):
                    self.module(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # nnU-Net's pin-memory thread may use CUDA while we capture (validation runs during training):
            # only this thread's calls may not disturb the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self.module(static_in)
        return graph, static_in, static_out


class FastInference(nn.Module):
    """Any nnU-Net network with a faster eval forward: in eval mode, on CUDA, without gradients, a
    BatchNorm-folded copy replayed from CUDA graphs (``CUDAGraphRunner``, contiguous weights), which gives
    the same logits; in training, on the CPU, with gradients or under torch.compile, the network itself.

        net = FastInference(network)        # network: (B, C, *spatial) -> logits, or a list with deep supervision
        net.eval(); with torch.no_grad(): logits = net(x)

    A drop-in for the network: ``state_dict`` keys are the network's (checkpoints do not change), and
    attributes the wrapper lacks are read from the network (nnU-Net sets ``decoder.deep_supervision``, which
    the replay follows). The folded copy is rebuilt when the weights may have changed: after ``train()``
    or ``load_state_dict``, and a ``.to()`` that replaces tensors also drops the captured graphs. Change
    weights otherwise (in place, in eval mode) and the replay keeps the old ones.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self._runtime = _Runtime()
        # the network's own keys in and out ("encoder.x", not "network.encoder.x")
        self.register_state_dict_post_hook(_drop_prefix_on_save)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_add_prefix_on_load)
        else:  # torch < 2.5 has the hook under its private name only
            self._register_load_state_dict_pre_hook(_add_prefix_on_load, with_module=True)
        self.register_load_state_dict_post_hook(_after_load)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("network"), name)

    def forward(self, x: Tensor):
        if (self.training or torch.is_grad_enabled() or not replay_possible(x)
                or torch.compiler.is_compiling()):  # under torch.compile the compiler owns the graph
            return self.network(x)
        rt = self._runtime
        if rt.folded is None:
            folded = fold_batchnorm(self.network).to(memory_format=torch.contiguous_format)  # faster for inference
            rt.folded, rt.refold = folded, Refold(self.network, folded)
            rt.runner = CUDAGraphRunner(folded, signature_fn=lambda: deep_supervision_switch(folded))
        elif rt.stale:
            rt.refold()  # into the captured copy's own tensors, so that its CUDA graphs stay valid
        rt.stale = False
        decoder = getattr(rt.folded, "decoder", None)
        if decoder is not None and hasattr(decoder, "deep_supervision"):  # nnU-Net switches it for validation
            decoder.deep_supervision = deep_supervision_switch(self.network)
        return rt.runner(x)

    def train(self, mode: bool = True) -> "FastInference":
        if mode:
            self._runtime.stale = True  # weights may change while training; eval() alone changes none
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() may replace the tensors the CUDA graphs read; nnU-Net's predictor calls
        # .to(device) for every case, which moves nothing and must keep them
        before = _tensor_identity(self)
        result = super()._apply(fn, *args, **kwargs)
        if _tensor_identity(self) != before:
            self._runtime = _Runtime()
        return result


class _Runtime:
    """What ``FastInference`` builds at run time: the folded copy, its ``Refold`` and its
    ``CUDAGraphRunner``. A deep copy of the wrapper starts empty instead of copying captured graphs."""

    def __init__(self) -> None:
        self.folded: nn.Module | None = None
        self.refold: Refold | None = None
        self.runner: CUDAGraphRunner | None = None
        self.stale = True

    def __deepcopy__(self, memo) -> "_Runtime":
        return _Runtime()


def _tensor_identity(module: nn.Module) -> list:
    """Address, dtype, device and layout of every parameter and buffer: what a captured graph reads."""
    return [(t.data_ptr(), t.dtype, t.device, t.stride()) for t in (*module.parameters(), *module.buffers())]


def _drop_prefix_on_save(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    _rename(state_dict, prefix + "network.", prefix)
    metadata = getattr(state_dict, "_metadata", None)  # module versions, keyed by prefix without the dot
    if metadata is not None:
        _rename(metadata, prefix + "network.", prefix)
        metadata.pop(prefix + "network", None)  # the network's own entry; the wrapper's stands in for it


def _add_prefix_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "network.")]:
        state_dict[prefix + "network." + key[len(prefix):]] = state_dict.pop(key)


def _after_load(module: "FastInference", incompatible_keys) -> None:
    module._runtime.stale = True
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):  # name keys as saved
        keys[:] = [k.replace("network.", "", 1) for k in keys]


def _rename(mapping: dict, old: str, new: str) -> None:
    """Replace the key prefix ``old`` by ``new`` in place, keeping the order of the keys."""
    for key in list(mapping):
        value = mapping.pop(key)
        mapping[new + key[len(old):] if key.startswith(old) else key] = value
