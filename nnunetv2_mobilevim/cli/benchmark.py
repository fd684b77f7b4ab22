"""``nnunetv2_mobilevim benchmark``: the family's networks next to nnU-Net's own, one process, one run.

Networks (``NETWORKS``): MobileViM_s/xs, U-Mamba Bot/Enc, the four Taming Mambas variants, the NoMamba twin
of each U-Mamba and Taming network, and nnU-Net's PlainConvUNet and ResEnc-M. Each is built from nnU-Net
2.8's 3d_fullres plan for the patch (``nnunet_configuration``: the topology nnU-Net's planner derives at
isotropic spacing, i.e. stride-2 stages while every axis stays >= 4, 3^3 kernels, features 32 doubling to
320, InstanceNorm, LeakyReLU) by the trainer that trains it, deep supervision off: PlainConvUNet and every
network of this package from the default planner's plan (``network_from_plan`` of this package's trainers:
U-Mamba and Taming Mambas train on nnU-Net's default plans, MobileViM takes the plan's strides),
ResEnc-M from ``nnUNetPlannerResEncM``'s (nnU-Net's ``build_network_architecture``).

Per network: parameters; MACs per sample (PyTorch's FlopCounterMode plus every selective scan at 4 MACs per
token, inner channel and state, which the counter does not see in the kernels); then in up to three modes
- ``eager``: the network as written (cuDNN autotuning on, as nnU-Net sets it);
- ``graph`` (``--cuda-graphs``): inference replayed from CUDA graphs as this package's predictor runs its
  networks (``FastInference``: BatchNorm folded, heuristic cuDNN) and nnU-Net's networks likewise (cuDNN
  autotuned, nothing to fold); the whole training step replayed from one CUDA graph with the fused SGD,
  as this package's trainers train (``GraphedTrainStep``; channels_last_3d where the trainer uses it);
- ``compile`` (``--compile``): ``torch.compile(network)``, nnU-Net 2.8's default on GPUs (the fp16
  forward and the training step; every other autocast dtype would be another compilation);
- ``graph_compile`` (both options; training step only): the compiled network inside the whole-step
  graph, as this package's trainers train under ``nnUNet_compile=true``,
forward passes per second at the inference batch (fp32, fp16 and bf16 autocast: ``--precisions``) and
the training step in ms with its peak GPU memory. The step is nnU-Net's without its loss and
augmentation: fp16 autocast, cross-entropy on the full-resolution output, GradScaler, gradient clipping
to 12, SGD with nnU-Net's settings (torch's eager and compiled, the fused kernel when graphed). A
``_best`` key holds the fastest mode that ran, named in ``best_mode``. A mode that cannot run (capture or
compilation failed, out of memory, skipped) is recorded in ``unavailable`` with the reason; a network
whose eager measurement or build fails gets ``error``; either way the run goes on.

Timing: CUDA events around each call after warm-up, medians (on a CPU, for the tests: the wall clock).
``--measure-seconds`` caps each measurement, ``--time-budget`` the run (networks not started are
recorded as skipped). Output: markdown tables on stdout; ``--family-json PATH``: the JSON, rewritten
after every network (a run cut short keeps what it measured); ``--out``: OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pydoc
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is imported inside the functions: building the CLI parser must stay light
    import torch
    from torch import nn

_OURS = "nnunetv2_mobilevim.nnunet."
_NNUNET_TRAINER = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer"


@dataclass(frozen=True)
class Network:
    """A benchmark network: the trainer class that builds it (dotted path) and the ``PLANNERS`` entry
    whose plan for the patch it is built from."""

    trainer: str
    planner: str = "default"

    @property
    def nnunet(self) -> bool:
        """One of nnU-Net's own networks (built by nnU-Net's trainer)."""
        return self.trainer == _NNUNET_TRAINER

    def trainer_class(self) -> type:
        found = pydoc.locate(self.trainer)
        if found is None:
            raise ImportError(f"cannot import the trainer {self.trainer}")
        return found


#: every network the benchmark knows, in the order ``--networks all`` measures them: the goals' networks
#: first, then each Mamba network after its NoMamba twin, roughly by cost
NETWORKS: Dict[str, Network] = {
    "plainconvunet": Network(_NNUNET_TRAINER),
    "mobilevim_s": Network(_OURS + "trainers.nnUNetTrainerMobileViM"),
    "resenc_m": Network(_NNUNET_TRAINER, planner="resenc_m"),
    "mobilevim_xs": Network(_OURS + "trainers.nnUNetTrainerMobileViM_xs"),
    "umamba_bot_nomamba": Network(_OURS + "umamba_trainers.nnUNetTrainerUMambaBot_NoMamba"),
    "umamba_bot": Network(_OURS + "umamba_trainers.nnUNetTrainerUMambaBot"),
    "umamba_enc_nomamba": Network(_OURS + "umamba_trainers.nnUNetTrainerUMambaEnc_NoMamba"),
    "umamba_enc": Network(_OURS + "umamba_trainers.nnUNetTrainerUMambaEnc"),
    "taming_segmamba_nomamba": Network(_OURS + "taming_trainers.nnUNetTrainerTamingSegMamba_NoMamba"),
    "taming_segmamba": Network(_OURS + "taming_trainers.nnUNetTrainerTamingSegMamba"),
    "segmambaskip_nomamba": Network(_OURS + "taming_trainers.nnUNetTrainerSegMambaSkip_NoMamba"),
    "segmambaskip": Network(_OURS + "taming_trainers.nnUNetTrainerSegMambaSkip"),
    "bisegmamba_nomamba": Network(_OURS + "taming_trainers.nnUNetTrainerBiSegMamba_NoMamba"),
    "bisegmamba": Network(_OURS + "taming_trainers.nnUNetTrainerBiSegMamba"),
    "multisegmamba_nomamba": Network(_OURS + "taming_trainers.nnUNetTrainerMultiSegMamba_NoMamba"),
    "multisegmamba": Network(_OURS + "taming_trainers.nnUNetTrainerMultiSegMamba"),
}
MOBILEVIM_VARIANTS = {"mobilevim_s": "s", "mobilevim_xs": "xs"}  # benchmark name -> MobileViM variant
NNUNET_NETWORKS = tuple(name for name, spec in NETWORKS.items() if spec.nnunet)
DEFAULT_NETWORKS = ("mobilevim_s", "mobilevim_xs", "plainconvunet", "resenc_m")
PRECISIONS = ("fp32", "fp16", "bf16")
MODES = ("eager", "graph", "compile")
TRAIN_MODES = MODES + ("graph_compile",)
#: the keys every row of the JSON has (None where not measured), what the issue's goals are read from
ROW_KEYS = ("network", "params", "fps_fp16_eager", "fps_fp16_best", "train_step_ms_eager", "train_step_ms_best",
            "train_peak_gb", "best_mode")


@dataclass(frozen=True)
class Planner:
    """What one of nnU-Net 2.8's planners puts in a 3D plan besides the topology (its ``__init__``'s
    ``UNet_*`` settings): the network class and the blocks (or convolutions) per stage."""

    network_class: str
    blocks_key: str  # "n_conv_per_stage" (PlainConvUNet) or "n_blocks_per_stage" (residual encoders)
    encoder_blocks: Tuple[int, ...]
    decoder_blocks: Tuple[int, ...]


PLANNERS: Dict[str, Planner] = {
    "default": Planner("dynamic_network_architectures.architectures.unet.PlainConvUNet", "n_conv_per_stage",
                       (2,) * 14, (2,) * 13),  # ExperimentPlanner
    "resenc_m": Planner("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", "n_blocks_per_stage",
                        (1, 3, 4) + (6,) * 10, (1,) * 12),  # nnUNetPlannerResEncM
}


def nnunet_configuration(patch: Sequence[int], planner: str = "default", base_features: int = 32,
                         max_features: int = 320) -> dict:
    """The 3d_fullres configuration (``ConfigurationManager``'s dict) nnU-Net 2.8's ``planner`` writes for
    ``patch`` (D, H, W) at isotropic spacing: pooling and kernels from nnU-Net's ``get_pool_and_conv_props``
    (stride 2 per axis while the axis stays >= 4), features ``base_features`` doubling up to
    ``max_features`` (nnU-Net's 32 and 320; the tests shrink them). ValueError for a patch nnU-Net would
    enlarge (an axis its pooling does not divide)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    if len(patch) != 3:
        raise ValueError(f"the benchmark plans 3D patches (D, H, W), got {tuple(patch)}")
    spec = PLANNERS[planner]
    _, strides, kernels, planned, _ = get_pool_and_conv_props([1.0] * 3, [int(p) for p in patch], 4, 999999)
    planned = [int(p) for p in planned]
    if planned != [int(p) for p in patch]:
        raise ValueError(f"nnU-Net's planner would train patch {planned}, not {list(patch)} (each axis must be "
                         f"divisible by its total pooling stride): pass --patch {' '.join(map(str, planned))}")
    n = len(strides)
    arch_kwargs = {
        "n_stages": n, "features_per_stage": [min(base_features * 2 ** i, max_features) for i in range(n)],
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides], spec.blocks_key: list(spec.encoder_blocks[:n]),
        "n_conv_per_stage_decoder": list(spec.decoder_blocks[:n - 1]), "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}}
    return {"patch_size": [int(p) for p in patch],
            "architecture": {"network_class_name": spec.network_class, "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}


@dataclass(frozen=True)
class BenchmarkOptions:
    """What ``benchmark`` measures for each network; one field per flag of ``add_arguments`` except
    ``--networks``, ``--out``, ``--family-json`` and ``--predict-e2e``, and except ``device``,
    ``base_features`` and ``max_features`` (no flags: the CPU tests run tiny plans on the CPU).
    ``patch``: (D, H, W); ``batch``: the inference batch; ``train_batch``: the training-step batch;
    ``iterations``: the most timed calls per measurement, after ``warmup`` calls; ``measure_seconds``:
    a measurement stops warming up after that long (at least one call) and stops timing after that long
    (at least three calls); ``time_budget``: seconds after which no further network or measurement starts."""

    patch: Tuple[int, int, int] = (128, 128, 128)
    in_channels: int = 1
    classes: int = 4
    batch: int = 1
    train_batch: int = 2
    iterations: int = 30
    warmup: int = 5
    train: bool = True  # time the training step (--no-train: off)
    cuda_graphs: bool = False
    torch_compile: bool = False  # --compile
    channels_last: bool = False
    profile: bool = False
    precisions: Tuple[str, ...] = PRECISIONS
    measure_seconds: Optional[float] = 1.0
    compile_skip_graphed: bool = False
    compile_always: Tuple[str, ...] = NNUNET_NETWORKS
    time_budget: Optional[float] = None
    device: str = "cuda"
    base_features: int = 32
    max_features: int = 320

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchmarkOptions":
        """The options of parsed ``add_arguments`` flags."""
        return cls(patch=tuple(args.patch), in_channels=args.in_channels, classes=args.classes, batch=args.batch,
                   train_batch=args.train_batch, iterations=args.iterations, warmup=args.warmup,
                   train=not args.no_train, cuda_graphs=args.cuda_graphs, torch_compile=args.compile,
                   channels_last=args.channels_last, profile=args.profile, precisions=tuple(args.precisions),
                   measure_seconds=args.measure_seconds or None, compile_skip_graphed=args.compile_skip_graphed,
                   compile_always=tuple(args.compile_always), time_budget=args.time_budget)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchmarkOptions()
    p.add_argument("--patch", type=int, nargs=3, default=list(d.patch), metavar=("D", "H", "W"))
    p.add_argument("--in-channels", type=int, default=d.in_channels)
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument("--batch", type=int, default=d.batch, help="inference batch (default 1)")
    p.add_argument("--train-batch", type=int, default=d.train_batch, help="training-step batch (default 2, nnU-Net's)")
    p.add_argument("--iterations", type=int, default=d.iterations, help="the most timed calls per measurement")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed calls before each measurement")
    p.add_argument("--measure-seconds", type=float, default=d.measure_seconds,
                   help="each measurement warms up for at most this long (at least one call) and times calls for "
                        "at most this long (at least three); 0: no cap (default %(default)s)")
    p.add_argument("--networks", nargs="+", default=list(DEFAULT_NETWORKS), choices=[*NETWORKS, "all"], metavar="NAME",
                   help=f"any of {', '.join(NETWORKS)}; 'all': every one, in this order (default: %(default)s)")
    p.add_argument("--precisions", nargs="+", default=list(d.precisions), choices=PRECISIONS,
                   help="forward precisions, eager and graphed (torch.compile: fp16 only; the training step: fp16)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.png (default: print only)")
    p.add_argument("--family-json", type=Path, default=None,
                   help="write the JSON to this path after every network (the run's rows so far)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no network and no measurement after this many seconds; those are recorded as "
                        "skipped (a GPU call then always ends with its JSON written)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time inference replayed from CUDA graphs (this package's networks as its predictor "
                        "runs them: BatchNorm folded; reports the largest logit difference to the plain fp32 "
                        "forward) and the whole training step replayed from one CUDA graph with the fused SGD "
                        "(as this package's trainers train; MobileViM in channels_last_3d)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile(network): the fp16 forward and the training step (nnU-Net 2.8 "
                        "compiles by default on a GPU), with --cuda-graphs also the compiled network inside the "
                        "replayed training step; costs a compilation per network and mode")
    p.add_argument("--compile-skip-graphed", action="store_true",
                   help="with --compile: compile a network's forward / training step only where its graph replay "
                        "did not run, except for the networks of --compile-always")
    p.add_argument("--compile-always", nargs="*", default=list(d.compile_always), choices=list(NETWORKS),
                   metavar="NAME",
                   help="networks compiled even with --compile-skip-graphed (default: nnU-Net's, which nnU-Net "
                        "trains compiled and the goals compare with)")
    p.add_argument("--predict-e2e", action="store_true",
                   help="instead: time whole prediction commands on ten CT-sized volumes and one 256^3 volume, "
                        "stock nnUNetv2_predict and nnunetv2_mobilevim predict, each with nnU-Net's default model "
                        "and MobileViM_s, fresh processes, the first call separately (research.predict_e2e)")
    p.add_argument("--channels-last", action="store_true",
                   help="run every network and input in channels_last_3d memory format")
    p.add_argument("--profile", action="store_true",
                   help="print where the fp16 forward and the eager training step of each network of this package "
                        "spend their GPU time (torch.profiler)")


def network_names(names: Sequence[str]) -> List[str]:
    """``names`` with ``"all"`` expanded to every network; ValueError for an unknown name."""
    out = [n for name in names for n in (NETWORKS if name == "all" else [name])]
    unknown = [n for n in out if n not in NETWORKS]
    if unknown:
        raise ValueError(f"unknown network(s) {unknown}: choose from {', '.join(NETWORKS)} or all")
    return out


def build(name: str, in_channels: int, classes: int, patch: Sequence[int], base_features: int = 32,
          max_features: int = 320) -> nn.Module:
    """The network called ``name`` (a key of ``NETWORKS``) for ``in_channels`` x ``patch`` inputs and
    ``classes`` output channels, built by its trainer from ``nnunet_configuration(patch, ...)``, deep
    supervision off."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}: choose one of {', '.join(NETWORKS)}")
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    spec = NETWORKS[name]
    cm = ConfigurationManager(nnunet_configuration(patch, spec.planner, base_features, max_features))
    trainer = spec.trainer_class()
    if spec.nnunet:
        return trainer.build_network_architecture(None, cm, in_channels, classes, False)  # nnU-Net's reads no plans
    return trainer.network_from_plan(cm, in_channels, classes, False)


def count_macs_per_sample(net: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """MACs of one forward of ``net`` on ``x`` (1, C, D, H, W): ``summary.count_macs`` (FlopCounterMode,
    MobileViM's scans by its Eq. 7) plus every Mamba-1 block's selective scan at 4 MACs per token, inner
    channel and state (discretisation, update, read-out; MobileViM's count), which the counter does not
    see inside the kernels. On a CPU the PyTorch scan's read-out einsum is also counted by the counter."""
    from ..ssm.mamba import Mamba, MambaGroup
    from .summary import count_macs

    scans = [0]

    def hook(module, inputs, _output) -> None:  # Mamba: (B, L, C); MambaGroup: (B, G, L, C)
        block = module if isinstance(module, Mamba) else module.blocks[0]
        scans[0] += 4 * math.prod(inputs[0].shape[:-1]) * block.d_inner * block.d_state

    # MambaGroup runs its blocks' weights itself (their forward is never called): no scan counted twice
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (Mamba, MambaGroup))]
    try:
        counted = count_macs(net, x)
    finally:
        for h in handles:
            h.remove()
    return {"macs_per_sample": counted["macs"] + scans[0], "macs_scan": counted["macs_scan"] + scans[0]}


def _time_ms(fn: Callable[[], object], iterations: int, warmup: int, device: str = "cuda",
             seconds: Optional[float] = None) -> Tuple[float, int]:
    """Median milliseconds of ``fn`` and how many calls were timed: ``warmup`` untimed calls, then up to
    ``iterations`` timed ones, each between CUDA events (on a CPU: the wall clock). With ``seconds``,
    warm-up ends once that long has passed (after at least one call), and so does timing (after at
    least three calls)."""
    import torch

    cuda = device == "cuda"
    start = time.perf_counter()
    for i in range(warmup):
        if seconds is not None and i >= 1 and time.perf_counter() - start > seconds:
            break
        fn()
        if cuda and seconds is not None:
            torch.cuda.synchronize()  # the clock above must see the GPU's time
    if cuda:
        torch.cuda.synchronize()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < iterations:
        if seconds is not None and len(times) >= min(3, iterations) and time.perf_counter() - start > seconds:
            break
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), len(times)


def _time_cuda(fn: Callable[[], object], iterations: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    return _time_ms(fn, iterations, warmup, "cuda")[0]


def pick_best(values: Dict[str, Optional[float]], higher_is_better: bool) -> Tuple[Optional[str], Optional[float]]:
    """The mode with the best of ``values`` (mode -> measurement; None: not measured) and that value,
    (None, None) if none was measured: the highest for speeds, the lowest for times."""
    measured = {mode: v for mode, v in values.items() if v is not None}
    if not measured:
        return None, None
    mode = (max if higher_is_better else min)(measured, key=measured.__getitem__)
    return mode, measured[mode]


class _Budget:
    """``--time-budget``: seconds since the run started, against the budget (None: no budget)."""

    def __init__(self, seconds: Optional[float], clock: Callable[[], float]) -> None:
        self.seconds, self.clock, self.start = seconds, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def reason(self) -> str:
        return f"skipped: the time budget of {self.seconds:g} s was spent ({self.elapsed():.0f} s)"


def _describe(err: BaseException) -> str:
    """One line for the JSON: the error's type and the start of its message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:400]}"


def _free(device: str) -> None:
    gc.collect()  # captured graphs and compiled code reference their network in cycles
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def new_row(name: str) -> Dict:
    """A row with every ``ROW_KEYS`` key (None until measured)."""
    row: Dict = {k: None for k in ROW_KEYS}
    row.update(network=name, best_mode={}, unavailable={})
    return row


def _autocast(device: str, dtype):
    import torch

    return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)


COMPILE_SKIPPED = "skipped: graph replay ran (--compile-skip-graphed)"


def compile_skipped(options: BenchmarkOptions, name: str, graph_ran: bool) -> bool:
    """Whether ``--compile-skip-graphed`` leaves out torch.compile of network ``name``'s forward or
    training step: where its graph replay ran, unless ``name`` is one of ``--compile-always``."""
    return options.compile_skip_graphed and graph_ran and name not in options.compile_always


def _first_replay(call: Callable[[], object]) -> None:
    """The first call of a graph runner (it captures); RuntimeError if it fell back to the eager network."""
    from ..acceleration.cuda_graphs import FastPathWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FastPathWarning)
        call()
    fell_back = [str(w.message) for w in caught if issubclass(w.category, FastPathWarning)]
    if fell_back:
        raise RuntimeError(fell_back[0])


def measure(name: str, options: BenchmarkOptions, row: Optional[Dict] = None,
            budget: Optional[_Budget] = None) -> Dict:
    """One row of the benchmark: network ``name`` (a key of ``NETWORKS``) measured as ``options`` says.
    Fills ``row`` (``new_row(name)`` when None) as it goes, so that what was measured stays when a later
    step raises; a failed optional mode goes to ``row["unavailable"]``, a failed eager measurement to
    ``row["error"]`` (and the row ends there)."""
    import torch

    o = options
    row = new_row(name) if row is None else row
    budget = budget or _Budget(None, time.monotonic)
    spec = NETWORKS[name]
    ours = not spec.nnunet
    dev = torch.device(o.device)
    layout = torch.channels_last_3d if o.channels_last else torch.contiguous_format
    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    precisions = sorted(set(o.precisions), key=lambda p: (p != "fp16", PRECISIONS.index(p)))  # the goals' first
    row["trainer"] = spec.trainer.rsplit(".", 1)[1]
    row["plan"] = spec.planner

    def attempt(key: str, fn: Callable[[], None], required: bool = False) -> bool:
        """Run one measurement; False (and why, in the row) if it was skipped or failed. Memory is handed
        back after graph replay and compilation (their objects hold it in reference cycles) and failures."""
        if budget.spent():
            row["unavailable"][key] = budget.reason()
            return False
        ok = False
        try:
            fn()
            ok = True
        except Exception as err:  # out of memory, a failed capture or compilation, ...: record it and go on
            if required:
                row["error"] = f"{key}: {_describe(err)}"
            else:
                row["unavailable"][key] = _describe(err)
        if not ok or not key.endswith("_eager"):
            _free(o.device)
        return ok

    with torch.device(dev):
        net = build(name, o.in_channels, o.classes, o.patch, o.base_features, o.max_features)
    net = net.to(memory_format=layout).eval()
    row["params"] = sum(p.numel() for p in net.parameters())
    x = torch.randn(o.batch, o.in_channels, *o.patch, device=dev).to(memory_format=layout)
    attempt("macs_per_sample", lambda: row.update(count_macs_per_sample(net, x[:1])))

    def fps(key: str, module: Callable, dtype, warmup: int) -> None:
        def forward():
            with torch.no_grad(), _autocast(dev.type, dtype):
                module(x)
        ms, _ = _time_ms(forward, o.iterations, warmup, dev.type, o.measure_seconds)
        row[key] = 1000.0 * o.batch / ms

    def peak_gb() -> Optional[float]:
        return torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None

    def reset_peak() -> None:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    # forward: eager
    for p in precisions:
        reset_peak()
        if not attempt(f"fps_{p}_eager", lambda: fps(f"fps_{p}_eager", net, dtypes[p], o.warmup), required=True):
            return row
        if p == "fp16":
            row["infer_peak_gb"] = peak_gb()
    # forward: graph replay
    graphed = set()
    if o.cuda_graphs:
        if dev.type != "cuda":
            row["unavailable"].update({f"fps_{p}_graph": "CUDA graphs need a CUDA device" for p in precisions})
        else:
            from ..acceleration.inference import CUDAGraphRunner, FastInference

            # this package's networks as its predictor runs them; nnU-Net's with cuDNN autotuning, as nnU-Net runs them
            runner = FastInference(net).eval() if ours else CUDAGraphRunner(net, autotune_cudnn=True)
            for p in precisions:
                def graph_forward(p=p):
                    with torch.no_grad(), _autocast("cuda", dtypes[p]):
                        _first_replay(lambda: runner(x))
                    fps(f"fps_{p}_graph", runner, dtypes[p], max(o.warmup - 1, 1))
                if attempt(f"fps_{p}_graph", graph_forward):
                    graphed.add(p)
            if "fp32" in graphed:
                def logits_check():
                    with torch.no_grad():
                        ref = net(x)
                        row["graph_max_abs_diff_fp32"] = (runner(x) - ref).abs().max().item()
                        row["logit_max_abs_fp32"] = ref.abs().max().item()
                attempt("graph_max_abs_diff_fp32", logits_check)
            del runner
            _free(o.device)
    # forward: torch.compile (fp16)
    if o.torch_compile and "fp16" in precisions:
        if compile_skipped(o, name, graph_ran="fp16" in graphed):
            row["unavailable"]["fps_fp16_compile"] = COMPILE_SKIPPED
        else:
            def compiled_forward():
                compiled = torch.compile(net)
                t0 = time.perf_counter()
                with torch.no_grad(), _autocast(dev.type, torch.float16):
                    compiled(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                row["compile_seconds_forward"] = time.perf_counter() - t0
                fps("fps_fp16_compile", compiled, torch.float16, max(o.warmup - 1, 1))
            attempt("fps_fp16_compile", compiled_forward)
    for p in precisions:
        mode, value = pick_best({m: row.get(f"fps_{p}_{m}") for m in MODES}, higher_is_better=True)
        row[f"fps_{p}_best"] = value
        row["best_mode"]["forward" if p == "fp16" else f"forward_{p}"] = mode
    if o.profile and ours and dev.type == "cuda":
        row["profile"] = profile_forward(net, x)
    if o.train:
        _measure_training(row, net, spec, o, attempt)
    return row


def _measure_training(row: Dict, net: nn.Module, spec: Network, o: BenchmarkOptions, attempt: Callable) -> None:
    """The training-step half of ``measure``: eager, graph replay, torch.compile, the compiled network inside
    the replayed step; the best of them."""
    import torch

    dev = torch.device(o.device)
    name = row["network"]
    layout = torch.channels_last_3d if o.channels_last else torch.contiguous_format
    net.train()
    xt = torch.randn(o.train_batch, o.in_channels, *o.patch, device=dev).to(memory_format=layout)
    target = torch.randint(0, o.classes, (o.train_batch, *o.patch), device=dev)

    def timed(key: str, step: Callable[[], object], warmup: int, reset: bool = True) -> None:
        if dev.type == "cuda" and reset:
            torch.cuda.reset_peak_memory_stats()
        row[key], _ = _time_ms(step, o.iterations, warmup, dev.type, o.measure_seconds)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
        row["train_peak_gb" if key.endswith("_eager") else key.replace("train_step_ms", "train_peak_gb")] = peak

    def eager():
        opt, scaler = _nnunet_optimizer(net)
        timed("train_step_ms_eager", lambda: _train_step(net, net, opt, scaler, xt, target), o.warmup)
    if not attempt("train_step_ms_eager", eager, required=True):
        return
    graphed = False
    if o.cuda_graphs:
        if dev.type != "cuda":
            row["unavailable"]["train_step_ms_graph"] = "CUDA graphs need a CUDA device"
        else:
            graphed = attempt("train_step_ms_graph", lambda: _graphed_training(row, net, spec, o, xt, target, timed))
    if o.torch_compile:
        if compile_skipped(o, name, graph_ran=graphed):
            row["unavailable"]["train_step_ms_compile"] = COMPILE_SKIPPED
        else:
            def compiled_step():
                compiled = torch.compile(net)
                opt, scaler = _nnunet_optimizer(net)
                t0 = time.perf_counter()
                _train_step(net, compiled, opt, scaler, xt, target)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                row["compile_seconds_train"] = time.perf_counter() - t0
                timed("train_step_ms_compile", lambda: _train_step(net, compiled, opt, scaler, xt, target),
                      max(o.warmup - 1, 1))
            attempt("train_step_ms_compile", compiled_step)
    if o.cuda_graphs and o.torch_compile:
        if dev.type != "cuda":
            row["unavailable"]["train_step_ms_graph_compile"] = "CUDA graphs need a CUDA device"
        elif compile_skipped(o, name, graph_ran=graphed):
            row["unavailable"]["train_step_ms_graph_compile"] = COMPILE_SKIPPED
        else:
            attempt("train_step_ms_graph_compile",
                    lambda: _graphed_training(row, net, spec, o, xt, target, timed, compiled=True))
    mode, value = pick_best({m: row.get(f"train_step_ms_{m}") for m in TRAIN_MODES}, higher_is_better=False)
    row["train_step_ms_best"], row["best_mode"]["train"] = value, mode
    if o.profile and not spec.nnunet and dev.type == "cuda":
        row["train_profile"] = profile_train_step(net, xt, target)


def _graphed_training(row: Dict, net: nn.Module, spec: Network, o: BenchmarkOptions, xt, target,
                      timed: Callable, compiled: bool = False) -> None:
    """The whole training step replayed from one CUDA graph, as this package's trainers run it: the fused
    SGD (``nnunet.optim.SGD``, nnU-Net's settings), channels_last_3d where the trainer trains in it;
    ``compiled``: with ``torch.compile(net)``'s forward inside (``train_step_ms_graph_compile``)."""
    import torch

    from ..acceleration.training import GraphedTrainStep
    from ..nnunet.optim import SGD

    channels_last = o.channels_last or getattr(spec.trainer_class(), "channels_last", False)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    net.to(memory_format=layout)
    try:
        opt = SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5, fused=True)
        scaler = torch.amp.GradScaler("cuda")
        # one eager step creates the optimiser's and GradScaler's state and autotunes cuDNN; then the capture
        forward = torch.compile(net) if compiled else net  # the first (eager) step compiles it
        step = GraphedTrainStep(lambda x, t: _step_body(net, forward, opt, scaler, x, t), [opt], warmup=1)
        x = xt.contiguous(memory_format=layout)
        key = "train_step_ms_graph_compile" if compiled else "train_step_ms_graph"
        row[key.replace("train_step_ms", "train_memory_format")] = "channels_last_3d" if channels_last else "contiguous"
        torch.cuda.reset_peak_memory_stats()
        for _ in range(step.warmup + 1):  # not cut short by --measure-seconds
            step(x, target)
        if len(step) != 1:
            raise RuntimeError("the training step was not captured (it ran eagerly)")
        timed(key, lambda: step(x, target), 1, reset=False)
    finally:
        net.to(memory_format=torch.channels_last_3d if o.channels_last else torch.contiguous_format)


def _step_body(net: nn.Module, forward: Callable, opt, scaler, xt, target):
    """nnU-Net's step after ``zero_grad``: autocast fp16 forward + loss, scaled backward, unscale, clip to
    norm 12, optimiser step, scaler update; returns the loss (no host sync: a CUDA graph can hold it)."""
    import torch

    with torch.autocast(xt.device.type, dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(forward(xt), target)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def _train_step(net: nn.Module, forward: Callable, opt, scaler, xt, target) -> None:
    """One nnU-Net-style step: zero grads, then ``_step_body``."""
    opt.zero_grad(set_to_none=True)
    _step_body(net, forward, opt, scaler, xt, target)


def _nnunet_optimizer(net: nn.Module):
    """nnU-Net's SGD (lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5; torch's default kernel) and a
    GradScaler for the network's device."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    return opt, torch.amp.GradScaler(next(net.parameters()).device.type)


def kernel_table(events: Sequence, steps: int, top: int = 12) -> Dict:
    """Per step, from ``torch.profiler``'s ``key_averages()`` of the CUDA events of ``steps`` steps: GPU
    kernel time (ms), kernel launches, and the ``top`` kernels by time with their share and calls."""
    total_us = sum(e.self_device_time_total for e in events) / steps
    ranked = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    table = [{"kernel": e.key[:90], "ms": e.self_device_time_total / steps / 1000,
              "share": e.self_device_time_total / steps / max(total_us, 1e-9), "calls": e.count / steps}
             for e in ranked]
    return {"gpu_ms": total_us / 1000, "kernels": sum(e.count for e in events) / steps, "top": table}


def _profiled(run: Callable[[], object], steps: int, what: str) -> Dict:
    """``run`` called ``steps`` times under torch.profiler (after a synchronize); the kernel table, the wall
    time per call with the profiler on, and the table printed to stderr."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    result = kernel_table([e for e in prof.key_averages() if e.device_type.name == "CUDA"], steps)
    result["wall_ms"] = wall * 1000
    print(f"\n{what} profile: {result['gpu_ms']:.2f} ms GPU kernel time and {result['kernels']:.0f} kernels per "
          f"call, {result['wall_ms']:.2f} ms wall (profiler on)", file=sys.stderr)
    for t in result["top"]:
        print(f"  {t['ms']:7.3f} ms {t['share']:6.1%} x{t['calls']:5.0f}  {t['kernel']}", file=sys.stderr)
    return result


def profile_train_step(net: nn.Module, xt, target, steps: int = 3) -> Dict:
    """Where one eager training step spends its GPU time (kernel time, launches, top kernels): the floor
    a graphed step approaches."""
    opt, scaler = _nnunet_optimizer(net)
    for _ in range(3):
        _train_step(net, net, opt, scaler, xt, target)
    return _profiled(lambda: _train_step(net, net, opt, scaler, xt, target), steps, "training-step")


def profile_forward(net: nn.Module, x: torch.Tensor, steps: int = 5) -> Dict:
    """Where one fp16-autocast forward spends its GPU time (kernel time, launches, top kernels)."""
    import torch

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(3):
            net(x)
        return _profiled(lambda: net(x), steps, "forward")


def goals(result: Dict) -> Dict[str, Optional[float]]:
    """The issue's two ratios where both sides were measured (None otherwise): MobileViM_s's best fp16
    forward over PlainConvUNet's best (goal >= 5) and MobileViM_s's best training step over
    PlainConvUNet's compiled one (goal <= 0.5)."""
    rows = {r["network"]: r for r in result["rows"]}
    ours, base = rows.get("mobilevim_s", {}), rows.get("plainconvunet", {})

    def ratio(a, b):
        return a / b if a is not None and b else None
    return {"fps_fp16_best_vs_plainconvunet_best": ratio(ours.get("fps_fp16_best"), base.get("fps_fp16_best")),
            "train_step_ms_best_vs_plainconvunet_compile": ratio(ours.get("train_step_ms_best"),
                                                                 base.get("train_step_ms_compile"))}


def markdown(result: Dict) -> str:
    """The rows as two markdown tables (forward, training step), then the goals' ratios."""
    rows = result["rows"]
    base = next((r for r in rows if r["network"] == "plainconvunet"), {})
    precisions = [p for p in PRECISIONS if p != "fp16" and any(r.get(f"fps_{p}_best") for r in rows)]

    def num(value, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    def vs(value, reference) -> str:
        return f"{value / reference:.2f}x" if value is not None and reference else "-"

    def failed(r: Dict, columns: int) -> Optional[str]:
        why = r.get("error") or r.get("skipped")
        return f"| {r['network']} | {why} |" + " |" * (columns - 2) if why else None

    head = ("| network | params (M) | GMACs/sample | fp16 FPS eager | graph | compile | best "
            "| best vs PlainConvUNet best | " + "".join(f"{p} FPS best | " for p in precisions)
            + "inference peak (GB) |")
    lines = ["Forward (batch %d)" % result["batch"], "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = failed(r, head.count("|") - 1)
        if line is None:
            mode = r["best_mode"].get("forward")
            line = (f"| {r['network']} | {num(r['params'] and r['params'] / 1e6, '{:.2f}')} | "
                    f"{num(r.get('macs_per_sample') and r['macs_per_sample'] / 1e9)} | "
                    + " | ".join(num(r.get(f"fps_fp16_{m}")) for m in MODES)
                    + f" | {num(r['fps_fp16_best'])} ({mode or '-'}) | "
                    f"{vs(r['fps_fp16_best'], base.get('fps_fp16_best'))} | "
                    + "".join(f"{num(r.get(f'fps_{p}_best'))} | " for p in precisions)
                    + f"{num(r.get('infer_peak_gb'), '{:.2f}')} |")
        lines.append(line)
    head = ("| network | train step eager (ms) | graph | compile | graph + compile | best | best vs PlainConvUNet "
            "compiled | peak eager (GB) | peak graph (GB) | peak compile (GB) | peak graph + compile (GB) |")
    lines += ["", "Training step (batch %d, fp16)" % result["train_batch"], "", head,
              "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = failed(r, head.count("|") - 1)
        if line is None:
            line = (f"| {r['network']} | " + " | ".join(num(r.get(f"train_step_ms_{m}")) for m in TRAIN_MODES)
                    + f" | {num(r['train_step_ms_best'])} ({r['best_mode'].get('train') or '-'}) | "
                    f"{vs(r['train_step_ms_best'], base.get('train_step_ms_compile'))} | "
                    + " | ".join(num(r.get(k), "{:.2f}") for k in ("train_peak_gb", "train_peak_gb_graph",
                                                                   "train_peak_gb_compile",
                                                                   "train_peak_gb_graph_compile")) + " |")
        lines.append(line)
    unavailable = [f"- {r['network']} {k}: {why}" for r in rows for k, why in r.get("unavailable", {}).items()]
    if unavailable:
        lines += ["", "Not measured:"] + unavailable
    g = result.get("goals") or goals(result)
    lines += ["", f"MobileViM_s fp16 forward, best / PlainConvUNet's best: "
                  f"{num(g['fps_fp16_best_vs_plainconvunet_best'], '{:.2f}x')} (goal >= 5x); "
                  f"training step, best / PlainConvUNet's compiled: "
                  f"{num(g['train_step_ms_best_vs_plainconvunet_compile'], '{:.2f}x')} (goal <= 0.5x)"]
    return "\n".join(lines)


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["rows"]:
        if r.get("fps_fp16_best") is None:
            continue
        ax.scatter(r["params"] / 1e6, r["fps_fp16_best"], s=60)
        ax.annotate(r["network"], (r["params"] / 1e6, r["fps_fp16_best"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M, log scale)")
    ax.set_ylabel("forward passes / s (fp16 autocast, best mode, batch %d)" % result["batch"])
    ax.set_title(f"{result['device']}, patch {'x'.join(map(str, result['patch']))}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _commit() -> Optional[str]:
    """The checkout's commit, None outside a git checkout (the GPU machine's copy of the tree)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def benchmark(networks: Sequence[str], options: BenchmarkOptions, command: str = "",
              on_row: Optional[Callable[[Dict], None]] = None, clock: Callable[[], float] = time.monotonic) -> Dict:
    """``measure`` each of ``networks`` (keys of ``NETWORKS``, or ``"all"``, in this order): the rows with
    the set-up they share (device, patch, scan backend, ...; ``command``: the command line to record).
    Each network is measured on its own: a failure is recorded in its row (``error``) and the next one
    runs; once ``options.time_budget`` seconds (by ``clock``) have passed, the rest are recorded as
    ``skipped``. ``on_row(result)`` is called after every network (e.g. to write the JSON so far)."""
    names = network_names(networks)  # refused before anything runs
    import torch

    from ..ssm import resolve_backend

    o = options
    cuda = o.device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train and nnUNetv2_predict set it
    result = {"device": torch.cuda.get_device_name(0) if cuda else o.device, "torch": torch.__version__,
              "patch": list(o.patch), "in_channels": o.in_channels, "classes": o.classes, "batch": o.batch,
              "train_batch": o.train_batch, "precisions": list(o.precisions), "iterations": o.iterations,
              "warmup": o.warmup, "measure_seconds": o.measure_seconds, "time_budget": o.time_budget,
              "scan_backend": resolve_backend(cuda), "memory_format": "channels_last_3d" if o.channels_last
              else "contiguous", "date": time.strftime("%Y-%m-%d"), "command": command, "commit": _commit(),
              "rows": []}
    budget = _Budget(o.time_budget, clock)
    for i, name in enumerate(names):
        row = new_row(name)
        if budget.spent():
            row["skipped"] = budget.reason()
        else:
            print(f"[{i + 1}/{len(names)}, {budget.elapsed():.0f} s] {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                measure(name, o, row, budget)
            except Exception as err:  # a network that cannot be built or measured here: say why, go on
                row["error"] = _describe(err)
            finally:
                if o.torch_compile:
                    torch._dynamo.reset()  # compiled code holds the network
                _free(o.device)
            row["seconds"] = time.perf_counter() - started
            print(f"    {name}: {_summary(row)}, {row['seconds']:.0f} s", file=sys.stderr, flush=True)
        result["rows"].append(row)
        result["goals"] = goals(result)
        result["seconds"] = budget.elapsed()
        if on_row is not None:
            on_row(result)
    return result


def _summary(row: Dict) -> str:
    """One line of progress for a measured row."""
    if row.get("error"):
        return f"error: {row['error']}"

    def num(value) -> str:
        return "-" if value is None else f"{value:.1f}"
    return (f"fp16 FPS best {num(row['fps_fp16_best'])} ({row['best_mode'].get('forward')}), train step best "
            f"{num(row['train_step_ms_best'])} ms ({row['best_mode'].get('train')})")


def write_json(result: Dict, path: Path) -> None:
    """``result`` as JSON at ``path``, replaced whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, path)


def run_benchmark(args: argparse.Namespace) -> int:
    """``nnunetv2_mobilevim benchmark`` with the flags of ``add_arguments``: prints the tables (or, with
    ``--predict-e2e``, the JSON), writes ``--family-json`` after every network and OUT.json (and OUT.png)
    when ``--out`` is given."""
    import torch

    if not torch.cuda.is_available():
        print("nnunetv2_mobilevim benchmark: error: needs a CUDA GPU (the goals are GPU speed goals)", file=sys.stderr)
        return 2
    out: Optional[Path] = args.out
    if args.predict_e2e:
        import tempfile

        from ..research import predict_e2e

        root = Path(tempfile.mkdtemp(prefix="mobilevim-predict-e2e-"))
        target = out.with_suffix(".json") if out else root / "predict_e2e.json"
        result = predict_e2e.measure(root, target, command="nnunetv2_mobilevim benchmark " + " ".join(sys.argv[2:]))
        result.update(device=torch.cuda.get_device_name(0), torch=torch.__version__)
        target.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["rows"], indent=1))
        return 0
    family: Optional[Path] = args.family_json
    result = benchmark(list(args.networks), BenchmarkOptions.from_args(args),
                       command="nnunetv2_mobilevim benchmark " + " ".join(sys.argv[2:]),
                       on_row=(lambda r: write_json(r, family)) if family else None)
    print(markdown(result))
    if family:
        print(f"wrote {family}", file=sys.stderr)
    if out:
        write_json(result, out.with_suffix(".json"))
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0
