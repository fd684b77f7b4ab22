"""Where an nnU-Net training iteration goes: data wait, train_step wall, GPU kernel time.

Run on the GPU machine:
    python -m nnunetv2_mobilevim.research.step_profile [shapes|demo] [TRAINER[:compile] ...] [--trace]

Default: shapes; nnU-Net's trainer eager and compiled, MobileViM_SGD, MobileViM. Trainers as
nnUNetv2_train builds them, with their augmentation workers, one after another in this process; work
folder /tmp/prof (reused once planned). Writes ``$OUT/step_profile_DATASET.json``; with ``--trace`` also
the profiled steps' timeline per trainer, ``$OUT/step_profile_trace_TRAINER[_compile].json.gz`` (torch.profiler's
Chrome trace: open it in Perfetto or chrome://tracing), which shows where the host waits, not only for how long,
and in the JSON its summary (``timeline_summary``: GPU busy time per stream and in all, first to last GPU event).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ..nnunet import run as nnunet_run

DEFAULT_TRAINERS = ["nnUNetTrainer", "nnUNetTrainer:compile", "nnUNetTrainerMobileViM_SGD", "nnUNetTrainerMobileViM"]


def write_trace(prof, path: Path) -> Path:
    """The profile's timeline as a gzipped Chrome trace at ``path`` (a name ending in ``.gz``, for which
    PyTorch's ``export_chrome_trace`` compresses; a few profiled steps of a 3D network are tens of MB)."""
    if path.suffix != ".gz":
        raise ValueError(f"{path}: a trace file name ends in .gz")
    prof.export_chrome_trace(str(path))
    return path


def timeline_summary(path: Path, steps: int) -> Dict:
    """Per profiled step, from a trace ``write_trace`` wrote: the GPU's busy time on each stream and on
    all of them together (the union of kernel, copy and memset intervals, so overlapping streams count
    once), the span from the first to the last GPU event (busy time plus the gaps between events), and
    the span of the whole trace. ``steps``: how many steps the trace holds."""
    import gzip

    events = [e for e in json.loads(gzip.decompress(path.read_bytes()))["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], str(e["tid"])) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    per_stream: Dict[str, list] = {}
    for start, end, stream in gpu:
        count_busy = per_stream.setdefault(stream, [0, 0.0])
        count_busy[0] += 1
        count_busy[1] += end - start
    union, covered_to = 0.0, float("-inf")
    for start, end, _ in gpu:  # sorted by start: add what lies beyond the part already counted
        if end > covered_to:
            union += end - max(start, covered_to)
            covered_to = end
    ms = 1000.0 * steps  # trace times are in microseconds
    return {"steps": steps,
            "trace_span_ms": (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / ms
            if events else 0.0,
            "gpu_busy_ms": union / ms,
            "gpu_first_to_last_ms": (max(end for _, end, _ in gpu) - gpu[0][0]) / ms if gpu else 0.0,
            "streams": {stream: {"events": n / steps, "busy_ms": busy / ms}
                        for stream, (n, busy) in per_stream.items()}}


def profile_trainer(name: str, compile_flag: str, dataset: str, trace: Optional[Path] = None) -> Dict:
    """Median data wait and ``train_step`` wall over 30 steps (after 8 warm-up steps; with the device
    pipeline also the host time of ``prefetch_next_batch`` inside the step), then GPU kernel
    time and the top CPU / GPU ops of 5 profiled steps, for trainer ``name`` with
    ``nnUNet_compile=compile_flag`` ("t" or "f"); with ``trace`` those steps' timeline there (``write_trace``)."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from torch.profiler import ProfilerActivity, profile

    os.environ["nnUNet_compile"] = compile_flag  # read by initialize() in on_train_start
    cls = recursive_find_trainer_class_by_name(name)
    tr = nnunet_run.short_trainer(cls, dataset, 1, 50, torch.device("cuda"))
    tr.on_train_start()
    tr.network.train()
    prefetch_ms: list = []
    if hasattr(tr, "prefetch_next_batch"):  # the device pipeline: host time of fetching the next batch
        prefetch = tr.prefetch_next_batch

        def timed_prefetch():
            t = time.perf_counter()
            prefetch()
            prefetch_ms.append(1000 * (time.perf_counter() - t))
        tr.prefetch_next_batch = timed_prefetch
    for _ in range(8):  # cuDNN autotuning, graph capture or compilation
        tr.train_step(next(tr.dataloader_train))
    torch.cuda.synchronize()
    prefetch_ms.clear()
    waits, steps = [], []
    for _ in range(30):
        t0 = time.perf_counter()
        batch = next(tr.dataloader_train)
        t1 = time.perf_counter()
        tr.train_step(batch)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        steps.append(t2 - t1)
    prefetch_timed = list(prefetch_ms)  # the 30 timed steps' (not the profiled ones)
    batches = [next(tr.dataloader_train) for _ in range(5)]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for b in batches:
            tr.train_step(b)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    cuda = [e for e in ev if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in cuda) / 5 / 1000
    top_cpu = sorted([e for e in ev if e.device_type.name == "CPU"], key=lambda e: e.cpu_time_total, reverse=True)[:15]
    top_gpu = sorted(cuda, key=lambda e: e.self_device_time_total, reverse=True)[:10]
    row = {"data_wait_ms": 1000 * float(np.median(waits)), "train_step_ms": 1000 * float(np.median(steps)),
           "prefetch_host_ms": float(np.median(prefetch_timed)) if prefetch_timed else None,
           "gpu_kernel_ms_per_step": gpu_ms, "kernels_per_step": sum(e.count for e in cuda) / 5,
           "top_cpu": [(e.key[:60], round(e.cpu_time_total / 5 / 1000, 2), e.count // 5) for e in top_cpu],
           "top_gpu": [(e.key[:60], round(e.self_device_time_total / 5 / 1000, 2), e.count // 5) for e in top_gpu]}
    if trace is not None:
        row["trace"] = write_trace(prof, trace).name
        row["timeline"] = timeline_summary(trace, len(batches))
    if hasattr(tr, "dataloader_train"):
        tr.on_train_end()
    return row


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.step_profile",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="shapes", choices=["shapes", "demo"])
    parser.add_argument("trainers", nargs="*", default=DEFAULT_TRAINERS, metavar="TRAINER",
                        help="trainer class names; ':compile' trains with nnUNet_compile=t")
    parser.add_argument("--trace", action="store_true",
                        help="also write each trainer's profiled steps as a gzipped Chrome trace into $OUT")
    args = parser.parse_args(argv)
    out_dir = Path(os.environ.get("OUT", "/tmp"))

    root = Path("/tmp/prof")
    os.environ.update(nnunet_run.folder_variables(root))
    import torch

    from .compare import prepare_dataset

    dataset, _, _ = prepare_dataset(args.dataset, root)
    torch.backends.cudnn.benchmark = True
    out = {}
    for entry in args.trainers:
        name, compile_flag = entry.split(":")[0], "t" if entry.endswith(":compile") else "f"
        key = f"{name} compile={compile_flag}"
        trace = out_dir / f"step_profile_trace_{name}{'_compile' if compile_flag == 't' else ''}.json.gz"
        out[key] = profile_trainer(name, compile_flag, dataset, trace if args.trace else None)
        print(key, json.dumps({k: v for k, v in out[key].items() if not k.startswith("top")}), flush=True)
        for row in out[key]["top_cpu"]:
            print("   cpu", row)
        for row in out[key]["top_gpu"]:
            print("   gpu", row)
    path = out_dir / f"step_profile_{args.dataset}.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
