"""CPU time of nnU-Net's training augmentation per batch, in one process, and the ceiling it puts on
training iterations per second when N augmentation workers share the work.

    python -m nnunetv2_mobilevim.research.loader_throughput demo|shapes [BATCHES] [WORKDIR]

Builds the dataset as ``compare`` does (plan + preprocess), then draws BATCHES training batches
through ``nnUNetTrainer``'s own data loader and transforms in this process (``nnUNet_n_proc_DA=0``,
one torch thread, as one augmentation worker runs). The loader is the same for every trainer of a
plan (the network does not enter it), so the ceiling holds for nnU-Net's network and MobileViM alike.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..nnunet import run as nnunet_run


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.loader_throughput",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="demo", choices=["demo", "shapes"])
    parser.add_argument("batches", nargs="?", type=int, default=30, help="timed batches (default 30)")
    parser.add_argument("workdir", nargs="?", type=Path, default=None,
                        help="nnU-Net's raw/pre/res folders (default: a new temp dir; reused if planned already)")
    args = parser.parse_args(argv)
    dataset_name, batches = args.dataset, args.batches
    root = args.workdir or Path(tempfile.mkdtemp(prefix="loader-"))
    os.environ.update(nnunet_run.folder_variables(root))

    import torch

    from .compare import prepare_dataset

    torch.set_num_threads(1)
    dataset, _, _ = prepare_dataset(dataset_name, root, processes=os.cpu_count() or 1)

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    os.environ["nnUNet_n_proc_DA"] = "0"  # after planning: the planner passes this number to torch.set_num_threads

    trainer = nnunet_run.short_trainer(nnUNetTrainer, dataset, 1, batches, torch.device("cpu"))
    trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    next(loader)  # first batch: file opening, caches
    seconds = []
    for _ in range(batches):
        t0 = time.perf_counter()
        next(loader)
        seconds.append(time.perf_counter() - t0)
    per_batch = float(np.median(seconds))
    result = {"dataset": dataset_name, "patch": list(trainer.configuration_manager.patch_size),
              "batch": trainer.batch_size, "batches": batches, "cpu": os.uname().machine,
              "cpu_count": os.cpu_count(), "seconds_per_batch_one_process": per_batch,
              "ceiling_ms_per_iteration": {n: 1000 * per_batch / n for n in (1, 2, 4, 8, 12, 16)}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
