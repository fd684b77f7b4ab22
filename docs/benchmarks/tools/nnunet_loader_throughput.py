"""CPU time of nnU-Net's training augmentation per batch, in one process, and the ceiling it puts on
training iterations per second when N augmentation workers share the work.

    python docs/benchmarks/tools/nnunet_loader_throughput.py demo|shapes [BATCHES] [WORKDIR]

Builds the dataset as ``compare`` does (plan + preprocess), then draws BATCHES training batches
through ``nnUNetTrainer``'s own data loader and transforms in this process (``nnUNet_n_proc_DA=0``,
one torch thread, as one augmentation worker runs). The loader is the same for every trainer of a
plan (the network does not enter it), so the ceiling holds for nnU-Net's network and MobileViM alike.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

dataset_name = sys.argv[1] if len(sys.argv) > 1 else "demo"
batches = int(sys.argv[2]) if len(sys.argv) > 2 else 30
root = Path(sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp(prefix="loader-"))
os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
                  nnUNet_results=str(root / "res"))

import torch  # noqa: E402

from nnunetv2_mobilevim.compare import prepare_dataset  # noqa: E402
from nnunetv2_mobilevim.nnunet import run as nnunet_run  # noqa: E402

torch.set_num_threads(1)
dataset, _, _ = prepare_dataset(dataset_name, root, processes=os.cpu_count() or 1)

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

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
