"""One training step of every shipped network on a GPU: time, peak memory, finite loss, and the kernel
path against the PyTorch scan on a small input.

Run on the GPU machine:
    python -m nnunetv2_mobilevim.research.network_steps [-c 3d_fullres] [--trainers T ...] [--steps 5]

Networks as their trainers build them for the example plans (``nnunet/example_plans.json``; Synapse CT,
patch 48x192x192, 14 classes), batch 2, fp16 autocast, SGD, eager (no CUDA graphs, no compile): a
first look, not the benchmark. Writes ``$OUT/network_steps.json`` when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

DEFAULT = ["nnUNetTrainerMobileViM", "nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaEnc", "nnUNetTrainerTamingSegMamba",
           "nnUNetTrainerBiSegMamba", "nnUNetTrainerMultiSegMamba", "nnUNetTrainerSegMambaSkip",
           "nnUNetTrainer_DeviceAug"]


def _outputs(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def step_row(trainer_name: str, configuration: str, steps: int) -> Dict:
    from ..cli.listing import example_plans, find_trainer, network_name
    from ..nnunet.base_trainer import nnUNetTrainerMambaBase
    from ..ssm.backend import reset_backend_state

    trainer = find_trainer(trainer_name)
    cm, inputs, classes, _ = example_plans()[configuration]
    if issubclass(trainer, nnUNetTrainerMambaBase):
        net = trainer.network_from_plan(cm, inputs, classes, True)
    else:
        net = trainer.build_network_architecture(None, cm, inputs, classes, True)
    net = net.cuda().train()
    row: Dict = {"trainer": trainer_name, "network": network_name(net),
                 "params": sum(p.numel() for p in net.parameters())}
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(2, inputs, *cm.patch_size, device="cuda")
    target = torch.randint(0, classes, (2, *cm.patch_size), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = _outputs(net(x))[0]
            loss = torch.nn.functional.cross_entropy(out.float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    row.update(step_ms_median=1000 * sorted(times[1:])[len(times[1:]) // 2], first_step_s=times[0],
               peak_gb=torch.cuda.max_memory_allocated() / 2 ** 30, losses_finite=all(map(lambda v: v == v, losses)))
    # the kernels against the exact PyTorch scan, fp32, on a small input
    net.eval()
    small = torch.randn(1, inputs, *[min(s, 32) if i else s for i, s in enumerate(cm.patch_size)], device="cuda")
    outs = {}
    for backend in ("mamba_ssm", "torch"):
        os.environ["NNUNETV2_MOBILEVIM_SCAN"] = backend
        reset_backend_state()
        try:
            with torch.no_grad():
                outs[backend] = _outputs(net(small))[0].float()
        except Exception as err:  # a network the small input does not fit: say so and go on
            row["kernel_check"] = f"skipped ({type(err).__name__}: {str(err)[:200]})"
            break
    os.environ.pop("NNUNETV2_MOBILEVIM_SCAN", None)
    reset_backend_state()
    if len(outs) == 2:
        row["kernel_vs_torch_max_rel"] = ((outs["mamba_ssm"] - outs["torch"]).abs().max()
                                          / outs["torch"].abs().max()).item()
    del net, opt
    torch.cuda.empty_cache()
    return row


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--trainers", nargs="+", default=DEFAULT)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the kernel check in fp32
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "configuration": args.configuration, "batch": 2, "rows": []}
    for name in args.trainers:
        try:
            row = step_row(name, args.configuration, args.steps)
        except torch.OutOfMemoryError as err:
            row = {"trainer": name, "error": f"out of memory: {str(err)[:200]}"}
            torch.cuda.empty_cache()
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "network_steps.json"), "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
