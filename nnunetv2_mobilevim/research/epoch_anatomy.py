"""Where nnU-Net's epoch time goes, per trainer: waiting for the data loader, the training step,
validation, and the rest; and how fast nnU-Net's data loader alone delivers batches on this host.

    python -m nnunetv2_mobilevim.research.epoch_anatomy demo|shapes EPOCHS ITERATIONS TRAINER[:OPTION...] ...

Each trainer runs nnU-Net's own ``run_training`` loop in a fresh Python process, as ``compare`` does
(fold ``all``, EPOCHS x ITERATIONS, a fifth as many validation iterations, its default augmentation
workers); only timestamps are added around its hooks, and over each epoch's training loop the host's
busy CPU cores (all processes: the trainer and its augmentation workers) and the GPU's busy fraction
(NVML's utilisation, sampled; needs ``nvidia-ml-py``, else not measured): ``research.host_load``.
Options after the trainer's name: ``compile`` trains with ``nnUNet_compile=t``; ``da=0|1`` sets
``NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION`` (nnU-Net's augmentation in the workers, or on the device);
``procs=N`` sets ``nnUNet_n_proc_DA`` (augmentation workers). The peak GPU memory of each run is
recorded. This package's trainers read no loss back per step (they queue up to ``steps_ahead`` steps on
the GPU), so for them ``train_step`` times are the host's and the GPU's work shows in the training loop's
total, which ends after a synchronisation (their validation ends with its one read-back, so it is
GPU-inclusive too). ``epoch_s_median`` is nnU-Net's logged epoch; ``epoch_to_epoch_s_median`` adds
nnU-Net's end of epoch (checkpoints, progress.png). Before training, the loader alone is timed (100
batches after 20 warm-up batches, GPU idle): no network can make an epoch shorter than ITERATIONS of
those. Writes ``$OUT/epoch_anatomy_DATASET.json`` after each trainer; a trainer that fails is recorded
with its error, the others still run, and the command then exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..nnunet import run as nnunet_run
from .host_load import LoadWindow, nvml_utilization_reader


def timed(cls):
    """``cls`` with timestamps around the hooks of nnU-Net's training loop."""

    class Timed(cls):
        marks = []

        def _mark(self, what):
            self.marks.append((what, self.current_epoch, time.perf_counter()))

        def on_train_start(self):
            super().on_train_start()
            self.load, self._window = {}, LoadWindow(nvml_utilization_reader(self.device))
            loader = getattr(self.dataloader_train, "loader", self.dataloader_train)  # without the device prefetcher
            for _ in range(20):
                next(loader)
            t0 = time.perf_counter()
            for _ in range(100):
                next(loader)
            self.loader_alone_ms = 10 * (time.perf_counter() - t0)

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            self._window.start()
            self._mark("train_start")

        def train_step(self, batch):
            self._mark("step_start")
            out = super().train_step(batch)
            self._mark("step_end")
            return out

        def on_train_epoch_end(self, outputs):
            if self.device.type == "cuda":  # the trainers queue steps ahead: the loop ends when the GPU has done them
                import torch

                torch.cuda.synchronize(self.device)
            self._mark("train_end")
            self.load[self.current_epoch] = self._window.stop()
            super().on_train_epoch_end(outputs)

        def on_validation_epoch_start(self):
            super().on_validation_epoch_start()
            self._mark("val_start")

        def on_validation_epoch_end(self, outputs):
            super().on_validation_epoch_end(outputs)
            self._mark("val_end")

    Timed.__name__ = Timed.__qualname__ = cls.__name__  # output folder and checkpoints keep the name
    return Timed


def per_epoch(marks, epoch, load=None):
    """One epoch's parts from the marks (and its load window's ``cpu_cores_busy``, ``gpu_busy_fraction``)."""
    m = [(w, t) for w, e, t in marks if e == epoch]
    starts = [t for w, t in m if w == "step_start"]
    ends = [t for w, t in m if w == "step_end"]
    train_start = next(t for w, t in m if w == "train_start")
    train_end = next(t for w, t in m if w == "train_end")
    val_start = next(t for w, t in m if w == "val_start")
    val_end = next(t for w, t in m if w == "val_end")
    waits = [starts[0] - train_start] + [s - e for s, e in zip(starts[1:], ends[:-1])]
    return {"data_wait_s": sum(waits), "train_step_s": sum(e - s for s, e in zip(starts, ends)),
            "train_loop_s": train_end - train_start, "validation_s": val_end - val_start,
            "step_ms_median": 1000 * float(np.median([e - s for s, e in zip(starts, ends)])),
            "wait_ms_median": 1000 * float(np.median(waits)),
            **(load or {"cpu_cores_busy": None, "gpu_busy_fraction": None})}


def _median(values):
    """The median, or None where a value was not measured."""
    return None if any(v is None for v in values) else float(np.median(values))


def measure(entry, dataset, epochs, iterations):
    """One trainer's run (in the calling process); the median over epochs 2.. of each part."""
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    name, *options = entry.split(":")
    torch.backends.cudnn.benchmark = True
    os.environ["nnUNet_compile"] = "t" if "compile" in options else "f"
    for option in options:  # this process is fresh: the switches are read after this
        key, _, value = option.partition("=")
        if key in ("da", "procs"):
            os.environ[{"da": "NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION", "procs": "nnUNet_n_proc_DA"}[key]] = value
        elif key != "compile":
            raise ValueError(f"unknown option {option!r} in {entry!r}: compile, da=0|1, procs=N")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = nnunet_run.short_trainer(timed(recursive_find_trainer_class_by_name(name)), dataset, epochs,
                                       iterations, device)
    trainer.run_training()
    logger = getattr(trainer.logger, "local_logger", trainer.logger)
    log = logger.my_fantastic_logging
    epoch_s = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    starts = log["epoch_start_timestamps"]
    rows = [per_epoch(trainer.marks, e, trainer.load.get(e)) for e in range(1, epochs)]  # epoch 0: compile, capture
    summary = {k: _median([r[k] for r in rows]) for k in rows[0]}
    summary.update(epoch_s_median=float(np.median(epoch_s[1:])),
                   epoch_to_epoch_s_median=float(np.median(np.diff(starts[1:]))) if epochs > 2 else None,
                   loader_alone_ms_per_batch=trainer.loader_alone_ms,
                   augmentation_workers=getattr(trainer.dataloader_train, "num_processes", None),
                   augmentation_on_device=getattr(trainer, "device_pipeline", None) is not None,
                   peak_gpu_memory_gb=(torch.cuda.max_memory_allocated() / 2 ** 30
                                       if torch.cuda.is_available() else None),
                   patch=list(trainer.configuration_manager.patch_size), batch=trainer.batch_size,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main``: DATASET EPOCHS ITERATIONS TRAINER[:compile] ..."""
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.epoch_anatomy",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["demo", "shapes"])
    parser.add_argument("epochs", type=int, help="epochs per trainer (epoch 0 is left out of the medians)")
    parser.add_argument("iterations", type=int, help="training iterations per epoch")
    parser.add_argument("trainers", nargs="+", metavar="TRAINER",
                        help="trainer class names, optionally with :compile, :da=0|1, :procs=N")
    parser.add_argument("--root", default=None, help="folder for nnU-Net's folders (reused when the dataset is "
                                                     "already preprocessed there; default: a new temporary folder)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    dataset_name, epochs, iterations = args.dataset, args.epochs, args.iterations

    from .compare import prepare_dataset

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="anatomy-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(nnunet_run.folder_variables(root), nnUNet_compile="f")
    dataset, _, _ = prepare_dataset(dataset_name, root, processes=os.cpu_count() or 1)
    result = {"dataset": dataset_name, "epochs": epochs, "iterations": iterations, "host_cpus": os.cpu_count(),
              "command": "python -m nnunetv2_mobilevim.research.epoch_anatomy " + " ".join(argv),
              "trainers": {}}
    out = Path(os.environ.get("OUT", "/tmp")).joinpath(f"epoch_anatomy_{dataset_name}.json")
    failures = measure_all(args.trainers, lambda entry: nnunet_run.in_fresh_process(
        measure, entry, dataset, epochs, iterations), out, result)
    if failures:
        raise SystemExit(f"{failures} of {len(args.trainers)} trainers failed (their errors are in {out})")


def measure_all(entries: Sequence[str], run: Callable[[str], dict], out: Path, result: dict) -> int:
    """``run(entry)`` for each entry in order, into ``result["trainers"]``; a trainer that fails is recorded
    with its error and the next one still runs, and ``out`` is rewritten after each (a run cut off by a
    time limit keeps what finished). Returns the number of failures."""
    failures = 0
    for entry in entries:
        try:
            summary = run(entry)
        except Exception as err:  # any failure of one trainer's run: record it, measure the others
            failures += 1
            summary = {"error": f"{type(err).__name__}: {err}"[:2000]}
        result["trainers"][entry] = summary
        print(entry, json.dumps(summary), flush=True)
        out.write_text(json.dumps(result, indent=1))
    return failures


if __name__ == "__main__":
    main()
