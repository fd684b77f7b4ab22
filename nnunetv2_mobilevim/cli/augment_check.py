"""``nnunetv2_mobilevim augment-check``: is the device pipeline nnU-Net's augmentation, on your data?

For a preprocessed dataset and configuration, builds nnU-Net 2.8's training transforms exactly as
``nnUNetTrainer`` does, translates them (``acceleration.augmentation``), loads a few cases with nnU-Net's
own loader and compares, transform by transform, what both pipelines make of the same inputs:

- random transforms (spatial, noise, blur, brightness, contrast, low resolution, gamma, mirroring):
  over ``draws`` draws per case, the mean of each output statistic (intensity mean and standard
  deviation, the mean of the lower half along every axis, the foreground fraction) per case; the
  difference must stay within ``Z`` standard errors; and how often a sample is changed at all (the
  application probabilities) within ``Z`` binomial standard errors;
- deterministic steps (masking, label removal, regions, deep-supervision targets): the outputs for the
  same input must be equal.

Writes ``augment_check.json`` (one entry per transform: the statistic that came closest to its
tolerance, both values, the tolerance, ``ok``; every statistic under ``details``) and
``augment_check.png`` (the same cases through both whole pipelines, side by side).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

Z = 4.5  # standard errors a statistic may differ by: a false alarm in ~1 of 10^5 comparisons
# steps without random draws: compared for equality on the same input
DETERMINISTIC = ("MaskImageTransform", "RemoveLabelTransform", "ConvertSegmentationToRegionsTransform",
                 "DownsampleSegForDSTransform")


def nnunet_training_setup(dataset: str, configuration: str, plans: str = "nnUNetPlans") -> SimpleNamespace:
    """What ``nnUNetTrainer.get_dataloaders`` computes before it builds the loaders, without a trainer:
    the training transforms, the initial patch size, the label manager and the preprocessed folder."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if nnUNet_preprocessed is None:
        raise ValueError("nnUNet_preprocessed is not set: export it (and run nnUNetv2_plan_and_preprocess first)")
    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(join(nnUNet_preprocessed, name))
    if not (folder / f"{plans}.json").is_file():
        raise ValueError(f"{folder / (plans + '.json')} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset}")
    plans_manager = PlansManager(load_json(str(folder / f"{plans}.json")))
    if configuration not in plans_manager.available_configurations:
        raise ValueError(f"configuration {configuration!r} is not in the plans; available: "
                         f"{', '.join(plans_manager.available_configurations)}")
    cm = plans_manager.get_configuration(configuration)
    lm = plans_manager.get_label_manager(load_json(str(folder / "dataset.json")))
    # nnU-Net's own methods, on a stand-in with the two attributes they read
    stand_in = SimpleNamespace(configuration_manager=cm, enable_deep_supervision=True, is_ddp=False,
                               print_to_log_file=lambda *args, **kwargs: None)
    rotation, dummy_2d, initial_patch, mirror_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(stand_in)
    ds_scales = nnUNetTrainer._get_deep_supervision_scales(stand_in)
    transforms = nnUNetTrainer.get_training_transforms(
        cm.patch_size, rotation, ds_scales, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
        is_cascaded=False, foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    data_folder = folder / cm.data_identifier
    if not data_folder.is_dir():
        raise ValueError(f"{data_folder} does not exist: preprocess {configuration} first "
                         f"(nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration})")
    return SimpleNamespace(transforms=transforms, initial_patch=[int(i) for i in initial_patch],
                           patch=list(cm.patch_size), label_manager=lm, data_folder=data_folder, name=name)


def load_cases(setup: SimpleNamespace, cases: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``cases`` cases cropped by nnU-Net's loader at the initial patch size, as its workers give them to
    the device pipeline: image ``(cases, C, *initial_patch)`` float32, labels ``(cases, 1, ...)`` int16."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    np.random.seed(seed)
    dataset = infer_dataset_class(str(setup.data_folder))(str(setup.data_folder))
    loader = nnUNetDataLoader(dataset, cases, setup.initial_patch, setup.patch, setup.label_manager,
                              oversample_foreground_percent=0.33, transforms=None)
    batch = loader.generate_train_batch()
    return batch["data"], batch["target"]


def _statistics(image: Tensor, seg) -> Dict[str, Tensor]:
    """Per sample (B,): intensity mean and std, the mean of the lower half along each spatial axis, and
    the foreground fraction of the (first) label map."""
    image = image.float()
    flat = image.flatten(1)
    out = {"image mean": flat.mean(1), "image std": flat.std(1)}
    for axis in range(2, image.dim()):
        half = image.narrow(axis, 0, image.shape[axis] // 2)
        out[f"mean of the lower half of axis {axis - 2}"] = half.flatten(1).mean(1)
    labels = seg[0] if isinstance(seg, list) else seg
    if labels is not None:
        out["foreground fraction"] = (labels[:, :1] > 0).flatten(1).float().mean(1)
    return out


def _nnunet_per_sample(sources: Sequence[object], image: Tensor, seg: Tensor) -> Tuple[Tensor, object]:
    """nnU-Net's transforms applied to each sample separately (as its loader does), stacked."""
    images, segs = [], []
    for b in range(image.shape[0]):
        sample = {"image": image[b].clone(), "segmentation": seg[b].clone()}
        for transform in sources:
            sample = transform(**sample)
        images.append(sample["image"])
        segs.append(sample["segmentation"])
    if isinstance(segs[0], list):
        return torch.stack(images), [torch.stack(s) for s in zip(*segs)]
    return torch.stack(images), torch.stack(segs)


def _compare_means(ours: List[Dict[str, Tensor]], theirs: List[Dict[str, Tensor]]) -> List[dict]:
    """Per statistic: the mean over draws and cases of both pipelines; the tolerance is ``Z`` standard
    errors of the difference (cases paired, draws independent)."""
    rows = []
    for key in ours[0]:
        a = torch.stack([d[key] for d in ours]).double()  # (draws, cases)
        b = torch.stack([d[key] for d in theirs]).double()
        n = a.shape[0]
        diff = (a.mean(0) - b.mean(0)).mean().item()
        se = math.sqrt(((a.var(0) + b.var(0)) / n).sum().item()) / a.shape[1]
        tolerance = Z * se + 1e-6 * max(a.abs().mean().item(), b.abs().mean().item(), 1e-12)
        rows.append({"statistic": f"{key}, mean over draws", "nnunet": b.mean().item(), "device": a.mean().item(),
                     "tolerance": tolerance, "difference": diff, "ok": abs(diff) <= tolerance})
    return rows


def _changed(before: Tensor, after: Tensor) -> Tensor:
    """(B,) bool: the sample's image was changed (shape changes count as changed)."""
    if before.shape != after.shape:
        return torch.ones(before.shape[0], dtype=torch.bool)
    return (before != after).flatten(1).any(1)


def _compare_rates(ours: Tensor, theirs: Tensor, what: str) -> dict:
    p_o, p_t = ours.float().mean().item(), theirs.float().mean().item()
    p = (p_o + p_t) / 2
    tolerance = Z * math.sqrt(max(p * (1 - p), 1e-12) * (1 / ours.numel() + 1 / theirs.numel())) + 1e-9
    return {"statistic": what, "nnunet": p_t, "device": p_o, "tolerance": tolerance, "difference": p_o - p_t,
            "ok": abs(p_o - p_t) <= tolerance}


def check_transforms(transforms, image: Tensor, seg: Tensor, draws: int, device: torch.device,
                     progress: Callable[[str], None] = lambda message: None) -> Tuple[List[dict], Tuple]:
    """Every step of the translated pipeline against nnU-Net's transform(s) it reproduces, on the inputs
    nnU-Net's own preceding transforms make. Returns the entries and nnU-Net's final output."""
    from ..acceleration.augmentation.pipeline import DeviceAugmentation, translate, unwrap_random

    pipeline = DeviceAugmentation.from_nnunet(transforms)
    entries = []
    for step in pipeline.steps:
        progress(step.name)
        forced = translate(step.sources, 1.0)
        sources = [unwrap_random(t)[0] for t in step.sources]
        dev_image, dev_seg = image.to(device), seg.to(device)
        ours_once = forced(dev_image.clone(), dev_seg.clone())
        theirs_once = _nnunet_per_sample(sources, image, seg)
        if step.name in DETERMINISTIC:
            details = [{"statistic": "largest |difference| for the same input", "nnunet": 0.0,
                        "device": _largest_difference(ours_once, theirs_once), "tolerance": 0.0}]
            details[0]["ok"] = details[0]["device"] == 0.0
        else:
            ours_stats, theirs_stats, ours_changed, theirs_changed = [], [], [], []
            for _ in range(draws):
                out_image, out_seg = forced(dev_image.clone(), dev_seg.clone())
                ours_stats.append({k: v.cpu() for k, v in _statistics(out_image, out_seg).items()})
                theirs_stats.append(_statistics(*_nnunet_per_sample(sources, image, seg)))
                if step.probability < 1:
                    ours_changed.append(_changed(dev_image, step.run(dev_image.clone(), dev_seg.clone())[0]).cpu())
                    theirs_changed.append(_changed(image, _nnunet_per_sample(step.sources, image, seg)[0]))
            details = _compare_means(ours_stats, theirs_stats)
            if step.probability < 1:
                details.append(_compare_rates(torch.cat(ours_changed), torch.cat(theirs_changed),
                                              f"fraction of samples changed (RandomTransform p={step.probability})"))
        worst = max(details, key=lambda d: abs(d.get("difference", d["device"] - d["nnunet"]))
                    / max(d["tolerance"], 1e-300) if d["tolerance"] > 0 else float(not d["ok"]))
        entries.append({"transform": step.name, "statistic": worst["statistic"], "nnunet": worst["nnunet"],
                        "device": worst["device"], "tolerance": worst["tolerance"],
                        "ok": all(d["ok"] for d in details), "details": details})
        image, seg = theirs_once  # the next step sees what nnU-Net's transforms made of this one
    return entries, (image, seg)


def _largest_difference(a, b) -> float:
    (ia, sa), (ib, sb) = a, b
    sa, sb = (sa if isinstance(sa, list) else [sa]), (sb if isinstance(sb, list) else [sb])
    if ia.shape != ib.shape or len(sa) != len(sb) or any(x.shape != y.shape for x, y in zip(sa, sb)):
        return float("inf")
    worst = (ia.cpu().float() - ib.cpu().float()).abs().max().item()
    for x, y in zip(sa, sb):
        worst = max(worst, (x.cpu().float() - y.cpu().float()).abs().max().item())
    return worst


def plot_side_by_side(path: Path, nnunet: Tuple[Tensor, object], device: Tuple[Tensor, object]) -> None:
    """The middle slice (first spatial axis) of every case's first channel, nnU-Net's pipeline left,
    the device pipeline right, the foreground outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = nnunet[0].shape[0]
    fig, axes = plt.subplots(cases, 2, figsize=(6, 3 * cases), squeeze=False)
    for column, (title, (image, seg)) in enumerate((("nnU-Net (CPU)", nnunet), ("device pipeline", device))):
        labels = seg[0] if isinstance(seg, list) else seg
        for b in range(cases):
            img, lab = image[b, 0].float().cpu(), labels[b, 0].float().cpu()
            if img.dim() == 3:
                img, lab = img[img.shape[0] // 2], lab[lab.shape[0] // 2]
            ax = axes[b, column]
            ax.imshow(img.numpy(), cmap="gray")
            if lab.max() > 0:
                ax.contour((lab > 0).numpy().astype(float), levels=[0.5], colors="tab:orange", linewidths=0.8)
            ax.set_axis_off()
            if b == 0:
                ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_augment_check(dataset: str, configuration: str, output: Path, plans: str = "nnUNetPlans", cases: int = 4,
                      draws: int = 32, device: str = "auto", seed: int = 0,
                      log: Optional[Callable[[str], None]] = print) -> int:
    """The command: returns 0 when every transform agrees, 1 otherwise."""
    from ..acceleration.augmentation.pipeline import DeviceAugmentation
    from ..acceleration.augmentation.sampling import Untranslatable

    log = log or (lambda message: None)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    setup = nnunet_training_setup(dataset, configuration, plans)
    try:
        pipeline = DeviceAugmentation.from_nnunet(setup.transforms)
    except Untranslatable as err:
        raise ValueError(str(err)) from None
    torch.manual_seed(seed)
    image, seg = load_cases(setup, cases, seed)
    log(f"augment-check: {setup.name} {configuration}, {cases} cases at {setup.initial_patch} -> {setup.patch}, "
        f"{draws} draws per transform, device pipeline on {dev}")
    entries, _ = check_transforms(setup.transforms, image, seg, draws, dev,
                                  progress=lambda name: log(f"  comparing {name}"))
    output.mkdir(parents=True, exist_ok=True)
    ok = all(e["ok"] for e in entries)
    report = {"dataset": setup.name, "configuration": configuration, "cases": cases, "draws": draws,
              "device": str(dev), "z": Z, "ok": ok, "transforms": entries}
    (output / "augment_check.json").write_text(json.dumps(report, indent=2))
    nnunet_out = _nnunet_per_sample([setup.transforms], image, seg)
    ours_out = pipeline(image.to(dev), seg.to(dev))
    plot_side_by_side(output / "augment_check.png", nnunet_out, ours_out)
    for e in entries:
        log(f"  {'ok  ' if e['ok'] else 'DIFF'} {e['transform']}: {e['statistic']}: nnU-Net {e['nnunet']:.5g}, "
            f"device {e['device']:.5g} (tolerance {e['tolerance']:.3g})")
    log(f"augment-check: {'every transform agrees' if ok else 'some transforms disagree'}; "
        f"wrote {output / 'augment_check.json'} and {output / 'augment_check.png'}")
    return 0 if ok else 1
