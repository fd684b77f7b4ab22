"""The device augmentation on CUDA: the same parameters give the CPU's outputs (which the CPU tests hold
to nnU-Net's), and every step agrees with nnU-Net's transform in distribution on the GPU.

Run on the GPU machine: pytest -m gpu tests/acceleration/augmentation/test_gpu_augmentation.py -s
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_helpers import report
from test_pipeline import _inputs, nnunet_transforms

from nnunetv2_mobilevim.acceleration.augmentation.pipeline import DeviceAugmentation, translate
from nnunetv2_mobilevim.cli.augment_check import check_transforms

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _to(params, device):
    """Drawn parameters (a tensor or a NamedTuple of tensors and None) on ``device``."""
    if isinstance(params, torch.Tensor):
        return params.to(device)
    return type(params)(*[p.to(device) if isinstance(p, torch.Tensor) else p for p in params])


@pytest.mark.parametrize("dummy_2d", [False, True])
def test_each_step_on_cuda_equals_the_cpu_for_the_same_parameters(no_tf32, dummy_2d):
    """Parameters drawn once, applied on both devices. Resampling and arithmetic to 1e-4 of the
    image's scale; labels: boundary voxels may flip where CUDA's grid_sample rounds a float16 tie the
    other way, at most 1e-3 of them."""
    torch.manual_seed(0)
    image, seg = _inputs(patch_in=(40, 44, 36))
    pipeline = DeviceAugmentation.from_nnunet(nnunet_transforms(patch=(32, 32, 28), dummy_2d=dummy_2d,
                                                                mask=[True, False]))
    for step in pipeline.steps:
        forced = translate(step.sources, 1.0)
        inner = getattr(forced, "transform", forced)  # intensity steps are wrapped as image-only steps
        if not hasattr(inner, "draw"):  # deterministic label steps
            cpu, gpu = forced(image.clone(), seg.clone()), forced(image.cuda(), seg.cuda())
        elif inner is forced:  # image and labels (spatial, mirror)
            params = inner.draw(image)
            cpu = inner.apply(image.clone(), seg.clone(), params)
            gpu = inner.apply(image.cuda(), seg.cuda(), _to(params, "cuda"))
        else:
            params = inner.draw(image)
            cpu = (inner.apply(image.clone(), params), seg)
            gpu = (inner.apply(image.cuda(), _to(params, "cuda")), seg.cuda())
        err = ((gpu[0].cpu() - cpu[0]).abs().max() / cpu[0].abs().max()).item()
        labels_cpu = cpu[1] if isinstance(cpu[1], list) else [cpu[1]]
        labels_gpu = gpu[1] if isinstance(gpu[1], list) else [gpu[1]]
        flipped = max((a.cpu() != b).float().mean().item() for a, b in zip(labels_gpu, labels_cpu))
        report(f"{step.name}: CUDA vs CPU, image max relative / label voxels differing {err:.2e} /", flipped)
        assert err < 1e-4 and flipped <= 1e-3, (step.name, err, flipped)
        image, seg = cpu if not isinstance(cpu[1], list) else (cpu[0], seg)


def test_every_step_agrees_with_nnunet_on_cuda(no_tf32):
    torch.manual_seed(0)
    np.random.seed(0)
    image, seg = _inputs(patch_in=(24, 28, 22))
    transforms = nnunet_transforms(patch=(16, 20, 16), mask=[True, False])
    entries, _ = check_transforms(transforms, image, seg, draws=64, device=torch.device("cuda"))
    for e in entries:
        report(f"{e['transform']}: {e['statistic']}: nnU-Net {e['nnunet']:.4g}, CUDA {e['device']:.4g}, tolerance",
               e["tolerance"])
    failures = [(e["transform"], d) for e in entries for d in e["details"] if not d["ok"]]
    assert not failures, failures


def test_replayed_pipeline_draws_fresh_and_keeps_the_distribution():
    """Replayed from a CUDA graph: every replay draws new parameters (PyTorch's CUDA generator advances),
    and the output statistics over 64 replays agree with 64 eager calls within 4.5 standard errors."""
    from nnunetv2_mobilevim.acceleration.augmentation.pipeline import ReplayedAugmentation
    from nnunetv2_mobilevim.cli.augment_check import _compare_means, _statistics

    torch.manual_seed(0)
    image, seg = (t.cuda() for t in _inputs(patch_in=(40, 44, 36)))
    pipeline = DeviceAugmentation.from_nnunet(nnunet_transforms(patch=(32, 32, 28)), labels=[-1, 0, 1, 2])
    replayed = ReplayedAugmentation(pipeline)
    first = replayed(image, seg)
    assert len(replayed) == 1  # captured, not fallen back
    second = replayed(image, seg)
    assert first[0].shape == (2, 2, 32, 32, 28) and [t.shape[2:] for t in first[1]] == [(32, 32, 28), (16, 16, 14),
                                                                                         (8, 8, 7)]
    assert not torch.equal(first[0], second[0])  # fresh noise at least
    ours = [{k: v.cpu() for k, v in _statistics(*replayed(image, seg)).items()} for _ in range(64)]
    eager = [{k: v.cpu() for k, v in _statistics(*pipeline(image, seg)).items()} for _ in range(64)]
    rows = _compare_means(ours, eager)
    for row in rows:
        report(f"replayed vs eager: {row['statistic']}: {row['device']:.4g} vs {row['nnunet']:.4g}, tolerance",
               row["tolerance"])
    assert all(row["ok"] for row in rows), rows
    assert len(replayed) == 1
