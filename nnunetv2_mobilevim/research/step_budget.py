"""Where one training iteration's GPU time goes once augmentation runs on the device.

Run on the GPU machine:
    python -m nnunetv2_mobilevim.research.step_budget [--patch 96 96 96] [--no-compile]

On synthetic tensors (no dataset), batch 2, nnU-Net's 3d_fullres transforms for the patch:
- the enlarged initial patch copied from pinned memory to the GPU;
- every augmentation step forced on (probability 1), eager: GPU ms and kernels per call;
- the whole pipeline eager and replayed from its CUDA graph, and replayed without each step that nnU-Net
  applies to a fraction of the samples, or with the spatial step's crop only (what skipping that work for
  a whole batch would save);
- MobileViM_s's whole training step replayed from one CUDA graph (AdamW, fp16 AMP, CE loss), with
  its forward as written and, unless --no-compile, its forward under ``torch.compile`` inside the graph;
- the replayed augmentation and the replayed step one after the other on one stream, and overlapped
  (the augmentation of the next batch on a side stream while the step runs).
Writes ``$OUT/step_budget.json`` when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict

import numpy as np
import torch

from ..cli.benchmark import _step_body  # nnU-Net's step after zero_grad, as benchmark times it
from ..cli.benchmark import _time_cuda as _events_ms  # median GPU ms by CUDA events, as benchmark measures


def _wall_ms(fn: Callable[[], object], iterations: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iterations):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iterations * 1000


def _kernels(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def _transforms(patch):
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    rotation = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
    initial = [int(s) for s in get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))]
    scales = [[1.0] * 3] + [[0.5 ** i] * 3 for i in range(1, 5)]
    transforms = nnUNetTrainer.get_training_transforms(
        list(patch), rotation, scales, (0, 1, 2), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1, 2], regions=None, ignore_label=None)
    return transforms, initial


def _crop_only(spatial):
    """``spatial`` (a ``DeviceSpatial``) as it acts on a sample it neither rotates nor scales: nnU-Net's
    centre crop of the initial patch, without computing the resampling."""
    from ..acceleration.augmentation.spatial import _crop

    def run(image, seg):
        starts = spatial._starts(spatial.draw(image))
        return _crop(image, starts, spatial.patch_size, 0.0), _crop(seg, starts, spatial.patch_size, spatial._pad_label)
    return run


def augmentation(patch, out: Dict) -> Dict:
    from ..acceleration.augmentation.pipeline import DeviceAugmentation, ReplayedAugmentation, Step, translate

    transforms, initial = _transforms(patch)
    out["initial_patch"] = initial
    host_image = torch.randn(2, 1, *initial).pin_memory()
    host_seg = torch.randint(0, 3, (2, 1, *initial)).to(torch.int16).pin_memory()  # nnU-Net's loader dtype
    out["h2d_ms"] = _events_ms(lambda: (host_image.to("cuda", non_blocking=True),
                                        host_seg.to("cuda", non_blocking=True)))
    image, seg = host_image.cuda(), host_seg.cuda()
    pipeline = DeviceAugmentation.from_nnunet(transforms, labels=[-1, 0, 1, 2])
    steps = {}
    x, s = image, seg
    with torch.no_grad():
        for step in pipeline.steps:
            forced = translate(step.sources, 1.0, labels=[-1, 0, 1, 2])
            xi, si = x, s
            steps[step.name + ("" if step.name not in steps else " (2)")] = {
                "ms": _events_ms(lambda: forced(xi.clone(), si.clone())),
                "kernels": _kernels(lambda: forced(xi.clone(), si.clone())) - 2, "probability": step.probability}
            x, s = forced(x.clone(), s.clone())
            if isinstance(s, list):
                break
        out["steps_forced"] = steps
        out["pipeline_eager_ms_gpu"] = _events_ms(lambda: pipeline(image, seg))
        out["pipeline_eager_ms_wall"] = _wall_ms(lambda: pipeline(image, seg))
        out["pipeline_kernels"] = _kernels(lambda: pipeline(image, seg))
        replayed = ReplayedAugmentation(pipeline)
        out["pipeline_replayed_ms"] = _events_ms(lambda: replayed(image, seg))
        out["pipeline_replayed_ms_wall"] = _wall_ms(lambda: replayed(image, seg))
        # what a graph that skipped one rarely applied step for the whole batch would save: the replayed
        # pipeline without it (not nnU-Net's augmentation: a measurement only)
        without = {}
        for i, step in enumerate(pipeline.steps):
            if step.probability < 1:
                lacking = ReplayedAugmentation(DeviceAugmentation(pipeline.steps[:i] + pipeline.steps[i + 1:]))
                without[f"{i} {step.name}"] = _events_ms(lambda: lacking(image, seg))
        # the spatial step computes the rotated / scaled resampling for every sample; where none of the batch
        # is rotated or scaled (41 % of batches of 2 with nnU-Net's p = 0.2 each) the crop alone would do
        crop = Step("crop only", _crop_only(pipeline.steps[0].run), pipeline.steps[0].sources, 1.0)
        cropping = ReplayedAugmentation(DeviceAugmentation([crop] + pipeline.steps[1:]))
        without["0 SpatialTransform resampling (the crop kept)"] = _events_ms(lambda: cropping(image, seg))
        out["pipeline_replayed_without_step_ms"] = without
    return {"replayed": replayed, "image": image, "seg": seg, "host": (host_image, host_seg)}


def training_step(patch, compiled: bool):
    from ..acceleration.training import GraphedTrainStep
    from ..networks.mobilevim import MobileViM

    net = MobileViM(input_channels=1, num_classes=3, variant="s").cuda().to(memory_format=torch.channels_last_3d)
    net.train()
    forward = torch.compile(net.forward) if compiled else net.forward
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cuda")

    def full_resolution(x):  # the deep-supervision head's first output
        out = forward(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    step = GraphedTrainStep(lambda x, target: _step_body(net, full_resolution, opt, scaler, x, target), [opt])
    x = torch.randn(2, 1, *patch, device="cuda").to(memory_format=torch.channels_last_3d)
    target = torch.randint(0, 3, (2, *patch), device="cuda")
    return step, x, target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, nargs=3, default=[96, 96, 96])
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    patch = tuple(args.patch)
    out: Dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "patch": list(patch),
                 "batch": 2, "date": time.strftime("%Y-%m-%d"),
                 "command": "python -m nnunetv2_mobilevim.research.step_budget " + " ".join(argv or [])}
    aug = augmentation(patch, out)
    print(json.dumps(out, indent=1), flush=True)
    for compiled in ([False] if args.no_compile else [False, True]):
        name = "compiled_forward" if compiled else "forward"
        try:
            t0 = time.perf_counter()
            step, x, target = training_step(patch, compiled)
            for _ in range(5):
                step(x, target)
            torch.cuda.synchronize()
            out[f"step_{name}_setup_s"] = time.perf_counter() - t0
            out[f"step_{name}_ms"] = _events_ms(lambda: step(x, target))
            out[f"step_{name}_kernels"] = _kernels(lambda: step(x, target))
            replayed, image, seg = aug["replayed"], aug["image"], aug["seg"]
            with torch.no_grad():
                out[f"step_{name}_then_aug_ms"] = _wall_ms(lambda: (replayed(image, seg), step(x, target).cpu()))
                side = torch.cuda.Stream()

                def overlapped():
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        replayed(image, seg)
                    loss = step(x, target).cpu()
                    torch.cuda.current_stream().wait_stream(side)
                    return loss
                out[f"step_{name}_overlapped_aug_ms"] = _wall_ms(overlapped)
            step = None  # frees the graph before the next variant
        except Exception as err:  # an experiment: record why it failed and go on
            out[f"step_{name}_error"] = f"{type(err).__name__}: {err}"[:2000]
        print(json.dumps({k: v for k, v in out.items() if k.startswith("step_")}, indent=1), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "step_budget.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
