"""Where an nnU-Net training iteration goes: data wait, train_step wall, GPU kernel time.

Run on the GPU machine from the repository root:
    python docs/benchmarks/tools/nnunet_step_profile.py [shapes|demo] [TRAINER[:compile] ...]
(default: shapes, nnU-Net's trainer eager and compiled, MobileViM_SGD, MobileViM; writes
$OUT/step_profile_DATASET.json). Trainers as nnUNetv2_train builds them, with their augmentation workers."""
import json, os, sys, time
from pathlib import Path
import numpy as np
import torch

root = Path("/tmp/prof")
os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"))
from nnunetv2_mobilevim.nnunet.registration import ext_trainer_dir
os.environ["nnUNet_extTrainer"] = str(ext_trainer_dir())
from nnunetv2_mobilevim.nnunet import run as nnunet_run
from nnunetv2_mobilevim.compare import prepare_dataset
dataset_name = sys.argv[1] if len(sys.argv) > 1 else "shapes"
dataset, _, _ = prepare_dataset(dataset_name, root)
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from torch.profiler import ProfilerActivity, profile

out = {}
torch.backends.cudnn.benchmark = True
entries = [(e.split(":")[0], "t" if e.endswith(":compile") else "f") for e in sys.argv[2:]] or [
    ("nnUNetTrainer", "f"), ("nnUNetTrainer", "t"), ("nnUNetTrainerMobileViM_SGD", "f"), ("nnUNetTrainerMobileViM", "f")]
for name, compile_flag in entries:
    os.environ["nnUNet_compile"] = compile_flag  # read by initialize() in on_train_start
    cls = recursive_find_trainer_class_by_name(name)
    tr = nnunet_run.short_trainer(cls, dataset, 1, 50, torch.device("cuda"))
    tr.on_train_start()
    tr.network.train()
    for _ in range(8):  # cuDNN autotuning, graph capture or compilation
        tr.train_step(next(tr.dataloader_train))
    torch.cuda.synchronize()
    waits, steps = [], []
    for _ in range(30):
        t0 = time.perf_counter(); batch = next(tr.dataloader_train); t1 = time.perf_counter()
        tr.train_step(batch); torch.cuda.synchronize(); t2 = time.perf_counter()
        waits.append(t1 - t0); steps.append(t2 - t1)
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
    key = f"{name} compile={compile_flag}"
    out[key] = {"data_wait_ms": 1000 * float(np.median(waits)), "train_step_ms": 1000 * float(np.median(steps)),
                "gpu_kernel_ms_per_step": gpu_ms, "kernels_per_step": sum(e.count for e in cuda) / 5,
                "top_cpu": [(e.key[:60], round(e.cpu_time_total / 5 / 1000, 2), e.count // 5) for e in top_cpu],
                "top_gpu": [(e.key[:60], round(e.self_device_time_total / 5 / 1000, 2), e.count // 5) for e in top_gpu]}
    print(key, json.dumps({k: v for k, v in out[key].items() if not k.startswith("top")}), flush=True)
    for row in out[key]["top_cpu"]:
        print("   cpu", row)
    for row in out[key]["top_gpu"]:
        print("   gpu", row)
    tr.on_train_end() if hasattr(tr, "dataloader_train") else None
Path(os.environ.get("OUT", "/tmp")).joinpath(f"step_profile_{dataset_name}.json").write_text(json.dumps(out, indent=1))
