"""``nnunetv2_mobilevim benchmark``: MobileViM next to nnU-Net's own networks, one process, one run.

For each network: parameters, MACs per sample (PyTorch's FlopCounterMode, plus the selective scan by
Eq. 7 for MobileViM), bytes an unfused fp16 forward moves, forward passes per second at the inference
batch (fp32, fp16 autocast, bf16 autocast), nnU-Net's training step (fp16 autocast, GradScaler,
clipping, SGD) and the peak GPU memory of inference and training; optionally the same replayed from
CUDA graphs (``--cuda-graphs``) and the compiled step of nnU-Net's networks (``--compile``).
cuDNN autotuning is on, as nnU-Net sets it. Timing: CUDA events around each call after warm-up;
medians. Output: markdown tables on stdout, a JSON file and a PNG (speed against parameters).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is imported inside the functions: building the CLI parser must stay light
    import torch
    from torch import nn

MOBILEVIM_VARIANTS = {"mobilevim_s": "s", "mobilevim_xs": "xs"}  # benchmark name -> MobileViM variant
NNUNET_NETWORKS = ("plainconvunet", "resenc_m")  # nnU-Net's PlainConvUNet and ResEnc-M (``_nnunet_unet``)
NETWORKS = (*MOBILEVIM_VARIANTS, *NNUNET_NETWORKS)


@dataclass(frozen=True)
class BenchmarkOptions:
    """What ``benchmark`` measures for each network; one field per flag of ``add_arguments`` except
    ``--networks``, ``--out`` and ``--predict-e2e``. ``patch``: (D, H, W); ``batch``: the inference batch;
    ``train_batch``: the training-step batch; ``iterations``: timed calls per measurement (the training
    step: half as many, at least 5), after ``warmup`` calls."""

    patch: Tuple[int, int, int] = (128, 128, 128)
    in_channels: int = 1
    classes: int = 4
    batch: int = 1
    train_batch: int = 2
    iterations: int = 30
    warmup: int = 5
    train: bool = True  # time nnU-Net's training step (--no-train: off)
    cuda_graphs: bool = False
    torch_compile: bool = False  # --compile
    channels_last: bool = False
    profile: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchmarkOptions":
        """The options of parsed ``add_arguments`` flags."""
        return cls(patch=tuple(args.patch), in_channels=args.in_channels, classes=args.classes, batch=args.batch,
                   train_batch=args.train_batch, iterations=args.iterations, warmup=args.warmup,
                   train=not args.no_train, cuda_graphs=args.cuda_graphs, torch_compile=args.compile,
                   channels_last=args.channels_last, profile=args.profile)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchmarkOptions()
    p.add_argument("--patch", type=int, nargs=3, default=list(d.patch), metavar=("D", "H", "W"))
    p.add_argument("--in-channels", type=int, default=d.in_channels)
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument("--batch", type=int, default=d.batch, help="inference batch (default 1)")
    p.add_argument("--train-batch", type=int, default=d.train_batch, help="training-step batch (default 2, nnU-Net's)")
    p.add_argument("--iterations", type=int, default=d.iterations, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.png (default: print only)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time inference replayed from a CUDA graph (MobileViM: BatchNorm folded too; reports the "
                        "largest logit difference to the plain fp32 forward) and the training step with forward and "
                        "backward replayed from CUDA graphs (MobileViM: in channels_last_3d, as its trainer runs it)")
    p.add_argument("--compile", action="store_true",
                   help="also time the training step of torch.compile(network) for nnU-Net's networks (nnU-Net 2.8 "
                        "compiles by default on a GPU; MobileViM trains through CUDA graphs instead)")
    p.add_argument("--predict-e2e", action="store_true",
                   help="instead: time nnUNetv2_predict of one 256^3 volume (sliding window, mirroring) with "
                        "nnUNetTrainerMobileViM_smoke vs nnU-Net's nnUNetTrainer_1epoch on the same plans "
                        "(needs nnU-Net)")
    p.add_argument("--channels-last", action="store_true",
                   help="run every network and input in channels_last_3d memory format")
    p.add_argument("--profile", action="store_true",
                   help="print where the fp16 forward of each MobileViM spends its GPU time (torch.profiler)")


def _nnunet_unet(kind: str, in_channels: int, classes: int, patch) -> nn.Module:
    """nnU-Net's networks with the topology its planners give an isotropic patch: stride-2 stages while
    every axis stays >= 4 (at most 6 stages), features 32 doubling to 320, InstanceNorm, LeakyReLU;
    PlainConvUNet with 2 convs per stage (default 3d_fullres), ResidualEncoderUNet with the ResEnc-M
    blocks per stage (1, 3, 4, 6, 6, 6) and 1 decoder conv."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from torch import nn

    n_stages, strides, patch = 1, [[1, 1, 1]], list(patch)
    size = list(patch)
    while len(strides) < 6 and all(s % 2 == 0 and s // 2 >= 4 for s in size):  # isotropic cube halving
        strides.append([2, 2, 2])
        size = [s // 2 for s in size]
        n_stages += 1
    features = [min(32 * 2 ** i, 320) for i in range(n_stages)]
    common = dict(input_channels=in_channels, n_stages=n_stages, features_per_stage=features, conv_op=nn.Conv3d,
                  kernel_sizes=[[3, 3, 3]] * n_stages, strides=strides, num_classes=classes, conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=False)
    if kind == "plainconvunet":
        return PlainConvUNet(n_conv_per_stage=[2] * n_stages, n_conv_per_stage_decoder=[2] * (n_stages - 1), **common)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 3, 4, 6, 6, 6][:n_stages],
                               n_conv_per_stage_decoder=[1] * (n_stages - 1), **common)


def build(name: str, in_channels: int, classes: int, patch: Sequence[int]) -> nn.Module:
    """The network called ``name`` (one of ``NETWORKS``) for ``in_channels`` x ``patch`` inputs and
    ``classes`` output channels."""
    if name in MOBILEVIM_VARIANTS:
        from ..networks.mobilevim import MobileViM

        return MobileViM(input_channels=in_channels, num_classes=classes, variant=MOBILEVIM_VARIANTS[name])
    if name in NNUNET_NETWORKS:
        return _nnunet_unet(name, in_channels, classes, patch)
    raise ValueError(f"unknown network {name!r}: choose one of {', '.join(NETWORKS)}")


def _time_cuda(fn: Callable[[], None], iterations: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, options: BenchmarkOptions) -> Dict:
    """One row of the benchmark: network ``name`` (one of ``NETWORKS``) measured as ``options`` says."""
    import torch

    from .summary import count_bytes, count_macs

    o = options
    dev = torch.device("cuda")
    layout = torch.channels_last_3d if o.channels_last else torch.contiguous_format
    net = build(name, o.in_channels, o.classes, o.patch).to(dev, memory_format=layout)
    ours = name in MOBILEVIM_VARIANTS
    row: Dict = {"network": name, "params": sum(p.numel() for p in net.parameters())}
    net.eval()
    x = torch.randn(o.batch, o.in_channels, *o.patch, device=dev).to(memory_format=layout)
    row["macs_per_sample"] = count_macs(net, x[:1])["macs"]
    row["bytes_per_sample_fp16"] = count_bytes(net, x[:1], torch.float16)
    for label, dtype in (("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        def forward():
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                net(x)
        torch.cuda.reset_peak_memory_stats()
        ms = _time_cuda(forward, o.iterations, o.warmup)
        row[f"fps_{label}"] = 1000.0 * o.batch / ms
        if label == "fp16":
            row["infer_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if o.cuda_graphs:
        from ..acceleration.inference import CUDAGraphRunner, fold_batchnorm

        # MobileViM as its fast path runs it; nnU-Net's networks with cuDNN autotuning, as nnU-Net runs them
        runner = CUDAGraphRunner(fold_batchnorm(net) if ours else net, autotune_cudnn=not ours)
        with torch.no_grad():
            ref = net(x)
            row["fast_max_abs_diff_fp32"] = (runner(x) - ref).abs().max().item()
            row["logit_max_abs_fp32"] = ref.abs().max().item()

        def graphed():
            with torch.autocast("cuda", dtype=torch.float16):
                runner(x)
        row["fps_fp16_graph"] = 1000.0 * o.batch / _time_cuda(graphed, o.iterations, o.warmup)
    if o.profile and ours:
        row["profile"] = profile_forward(net, x)
    if o.train:
        net.train()
        xt = torch.randn(o.train_batch, o.in_channels, *o.patch, device=dev).to(memory_format=layout)
        target = torch.randint(0, o.classes, (o.train_batch, *o.patch), device=dev)
        torch.cuda.reset_peak_memory_stats()
        row["train_step_ms"] = _train_step_ms(net, net, xt, target, o.iterations, o.warmup)
        row["train_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if o.cuda_graphs:
            from ..acceleration.training import TrainingGraphs

            if ours:  # in channels_last_3d, as nnUNetTrainerMobileViM trains it
                net.to(memory_format=torch.channels_last_3d)
            torch.cuda.reset_peak_memory_stats()
            forward = TrainingGraphs(net, net.forward)
            row["train_step_ms_graph"] = _train_step_ms(net, forward, xt, target, o.iterations, o.warmup)
            row["train_peak_gb_graph"] = torch.cuda.max_memory_allocated() / 2 ** 30
            del forward
            net.to(memory_format=layout)
        if o.profile and ours:
            row["train_profile"] = profile_train_step(net, xt, target)
        if o.torch_compile and not ours:  # MobileViM trains through CUDA graphs instead
            start = time.perf_counter()
            compiled = torch.compile(net)
            row["train_step_ms_compiled"] = _train_step_ms(net, compiled, xt, target, o.iterations, o.warmup)
            row["compile_and_time_seconds"] = time.perf_counter() - start
    return row


def _train_step(net: nn.Module, forward: Callable, opt, scaler, xt, target) -> None:
    """One nnU-Net-style step: zero grads, fp16 autocast forward + loss, scaled backward, unscale,
    clip to norm 12, SGD step, scaler update."""
    import torch

    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(forward(xt), target)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    scaler.step(opt)
    scaler.update()


def _nnunet_optimizer(net: nn.Module):
    """nnU-Net's SGD (lr 1e-2, Nesterov momentum 0.99, weight decay 3e-5) and a GradScaler."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    return opt, torch.amp.GradScaler("cuda")


def _train_step_ms(net: nn.Module, forward: Callable, xt, target, iterations: int, warmup: int) -> float:
    """Median ms of ``_train_step`` with nnU-Net's optimiser, over half of ``iterations`` (at least 5)."""
    opt, scaler = _nnunet_optimizer(net)
    return _time_cuda(lambda: _train_step(net, forward, opt, scaler, xt, target), max(5, iterations // 2), warmup)


def profile_train_step(net: nn.Module, xt, target, steps: int = 3) -> Dict:
    """GPU kernel time and kernel launches of one eager training step: the floor a graphed step approaches."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    opt, scaler = _nnunet_optimizer(net)
    for _ in range(3):
        _train_step(net, net, opt, scaler, xt, target)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            _train_step(net, net, opt, scaler, xt, target)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in events) / steps / 1000
    kernels = sum(e.count for e in events) / steps
    print(f"\ntraining-step profile: {gpu_ms:.2f} ms GPU kernel time, {kernels:.0f} kernels per step", file=sys.stderr)
    return {"gpu_ms": gpu_ms, "kernels": kernels}


def profile_forward(net: nn.Module, x: torch.Tensor, steps: int = 5) -> Dict:
    """GPU kernel time per forward (fp16 autocast), kernel launches per forward, top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(3):
            net(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                net(x)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total_us = sum(e.self_device_time_total for e in events) / steps
    launches = sum(e.count for e in events) / steps
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    table = [{"kernel": e.key[:90], "ms_per_forward": e.self_device_time_total / steps / 1000,
              "share": e.self_device_time_total / steps / max(total_us, 1e-9), "calls": e.count / steps} for e in top]
    print(f"\nprofile: {total_us / 1000:.2f} ms GPU kernel time and {launches:.0f} kernels per forward, "
          f"{wall * 1000:.2f} ms wall (profiler on)", file=sys.stderr)
    for t in table:
        print(f"  {t['ms_per_forward']:7.3f} ms {t['share']:6.1%} x{t['calls']:5.0f}  {t['kernel']}", file=sys.stderr)
    return {"gpu_ms": total_us / 1000, "kernels": launches, "wall_ms": wall * 1000, "top": table}


def markdown(result: Dict) -> str:
    rows = result["rows"]
    base = next((r for r in rows if r["network"] == "plainconvunet"), None)
    head = ("| network | params (M) | GMACs/sample | fwd fp32 FPS | fwd fp16 FPS | fwd bf16 FPS | "
            "fp16 FPS vs PlainConvUNet | train step (ms) | train vs PlainConvUNet | train peak (GB) | "
            "peak vs PlainConvUNet |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = lambda k: f"{r[k] / base[k]:.2f}x" if base and k in r and k in base else "-"  # noqa: E731
        lines.append(
            f"| {r['network']} | {r['params'] / 1e6:.2f} | {r['macs_per_sample'] / 1e9:.1f} | {r['fps_fp32']:.1f} | "
            f"{r['fps_fp16']:.1f} | {r['fps_bf16']:.1f} | {ratio('fps_fp16')} | "
            f"{r.get('train_step_ms', float('nan')):.1f} | {ratio('train_step_ms')} | "
            f"{r.get('train_peak_gb', float('nan')):.2f} | {ratio('train_peak_gb')} |")
    if any("fps_fp16_graph" in r for r in rows):
        lines += ["", "| network | fwd fp16 FPS, CUDA graph | vs PlainConvUNet (graph) "
                      "| max abs logit diff vs plain fp32 |",
                  "|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['fps_fp16_graph'] / base['fps_fp16_graph']:.2f}x" if base and "fps_fp16_graph" in base else "-"
            lines.append(f"| {r['network']} | {r['fps_fp16_graph']:.1f} | {ratio} | "
                         f"{r['fast_max_abs_diff_fp32']:.2e} (logits up to {r['logit_max_abs_fp32']:.1f}) |")
    variants = [(k, label) for k, label in (("train_step_ms", "eager"), ("train_step_ms_graph", "CUDA graph"),
                                            ("train_step_ms_compiled", "torch.compile"))
                if any(k in r for r in rows)]
    if len(variants) > 1 and base:
        lines += ["", "| network | " + " | ".join(f"train step {label} (ms)" for _, label in variants)
                  + " | best vs PlainConvUNet eager | best vs PlainConvUNet best |",
                  "|---|" + "---|" * (len(variants) + 2)]
        base_best = min(base[k] for k, _ in variants if k in base)
        for r in rows:
            best = min(r[k] for k, _ in variants if k in r)
            cells = " | ".join(f"{r[k]:.1f}" if k in r else "-" for k, _ in variants)
            lines.append(f"| {r['network']} | {cells} | {best / base['train_step_ms']:.2f}x "
                         f"| {best / base_best:.2f}x |")
    return "\n".join(lines)


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["rows"]:
        ax.scatter(r["params"] / 1e6, r["fps_fp16"], s=60)
        ax.annotate(r["network"], (r["params"] / 1e6, r["fps_fp16"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M, log scale)")
    ax.set_ylabel("forward passes / s (fp16 autocast, batch %d)" % result["batch"])
    ax.set_title(f"{result['device']}, patch {'x'.join(map(str, result['patch']))}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def predict_e2e() -> Dict:
    """Train both trainers for a moment on a synthetic 128^3 dataset (weights do not matter for timing),
    then time nnUNetv2_predict of one 256^3 volume for each: the whole command (process start included)
    and the predictor alone (nnUNetPredictor.predict_from_files after initialisation)."""
    import os
    import tempfile

    import torch

    from ..nnunet import run as nnunet_run
    from ..research.synthetic import write_dataset

    root = Path(tempfile.mkdtemp(prefix="mobilevim-predict-"))
    os.environ.update(nnunet_run.folder_variables(root), nnUNet_compile="f")
    env = dict(os.environ)  # what the nnU-Net commands below run with
    write_dataset(root / "raw" / "Dataset777_Predict", cases=5, test_cases=1, shape=(128, 128, 128),
                  num_classes=3, test_shape=(256, 256, 256))
    nnunet_run.plan_and_preprocess(["-d", 777, "-c", "3d_fullres", "-np", 4], env)
    trainers = ["nnUNetTrainer_1epoch", "nnUNetTrainerMobileViM_smoke"]
    rows = []
    for trainer in trainers:
        print(f"[predict-e2e] training {trainer} briefly ...", file=sys.stderr, flush=True)
        nnunet_run.train([777, "3d_fullres", 0, "-tr", trainer], env)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    images = root / "raw" / "Dataset777_Predict" / "imagesTs"
    for trainer in trainers:
        walls = []
        for rep in range(2):
            start = time.perf_counter()
            nnunet_run.predict(["-i", images, "-o", root / f"cli_{trainer}_{rep}", "-d", 777, "-c", "3d_fullres",
                                "-tr", trainer, "-f", 0], env)
            walls.append(time.perf_counter() - start)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cuda"))
        model = root / "res" / "Dataset777_Predict" / f"{trainer}__nnUNetPlans__3d_fullres"
        predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,),
                                                       checkpoint_name="checkpoint_final.pth")
        inner = []
        for rep in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            predictor.predict_from_files(str(images), str(root / f"api_{trainer}_{rep}"), save_probabilities=False,
                                         overwrite=True, num_processes_preprocessing=2,
                                         num_processes_segmentation_export=2)
            torch.cuda.synchronize()
            inner.append(time.perf_counter() - start)
        plans = json.loads((model / "plans.json").read_text())
        rows.append({"trainer": trainer, "cli_seconds": min(walls), "predictor_seconds": min(inner),
                     "patch": plans["configurations"]["3d_fullres"]["patch_size"]})
        print(f"[predict-e2e] {trainer}: nnUNetv2_predict {min(walls):.1f} s (whole command), "
              f"predictor {min(inner):.1f} s", file=sys.stderr, flush=True)
    base, ours = rows
    return {"volume": [256, 256, 256], "rows": rows, "cli_ratio": ours["cli_seconds"] / base["cli_seconds"],
            "predictor_ratio": ours["predictor_seconds"] / base["predictor_seconds"]}


def benchmark(networks: Sequence[str], options: BenchmarkOptions, command: str = "") -> Dict:
    """``measure`` each of ``networks`` (names of ``NETWORKS``, in this order) on the GPU; the rows with
    the set-up they share (device, patch, scan backend, ...; ``command``: the command line to record)."""
    import torch

    from ..ssm import resolve_backend

    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        raise ValueError(f"unknown network(s) {unknown}: choose from {', '.join(NETWORKS)}")
    torch.backends.cudnn.benchmark = True  # as nnUNetv2_train and nnUNetv2_predict set it
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "patch": list(options.patch),
              "in_channels": options.in_channels, "classes": options.classes, "batch": options.batch,
              "train_batch": options.train_batch, "scan_backend": resolve_backend(True),
              "memory_format": "channels_last_3d" if options.channels_last else "contiguous",
              "date": time.strftime("%Y-%m-%d"), "command": command, "rows": []}
    for i, name in enumerate(networks):
        print(f"[{i + 1}/{len(networks)}] {name} ...", file=sys.stderr, flush=True)
        result["rows"].append(measure(name, options))
        gc.collect()  # captured graphs reference their network in a cycle
        torch.cuda.empty_cache()  # the measured network is gone once measure() returns
    return result


def run_benchmark(args: argparse.Namespace) -> int:
    """``nnunetv2_mobilevim benchmark`` with the flags of ``add_arguments``: prints the tables (or, with
    ``--predict-e2e``, the JSON) and writes OUT.json (and OUT.png) when ``--out`` is given."""
    import torch

    if not torch.cuda.is_available():
        print("nnunetv2_mobilevim benchmark: error: needs a CUDA GPU (the goals are GPU speed goals)", file=sys.stderr)
        return 2
    out: Optional[Path] = args.out
    if args.predict_e2e:
        result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **predict_e2e()}
        print(json.dumps(result, indent=2))
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        return 0
    result = benchmark(list(args.networks), BenchmarkOptions.from_args(args),
                       command="nnunetv2_mobilevim benchmark " + " ".join(sys.argv[2:]))
    print(markdown(result))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0
