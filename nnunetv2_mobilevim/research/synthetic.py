"""Synthetic 3D segmentation datasets in nnU-Net's raw format (for tests and the accuracy study).

Each case is a noisy, smoothly shaded volume with labelled objects:
    1  large ellipsoids        (easy, frequent)
    2  small spheres           (rare: class imbalance)
    3  thin tubes              (1-2 voxels across: fine structures)
    4  shells                  (hollow ellipsoids: shape, not intensity, tells them from class 1)
Intensities of the classes overlap partly, so context matters. ``num_classes`` picks how many of
these appear (1-4).

Two variants exercise nnU-Net's label options: ``ignore_label=True`` (sparse annotation: training
labels annotated on every third slice of the first axis only, the rest set to the ignore label) and
``regions=True`` (BraTS-style nested regions: region k holds labels k..num_classes).

    python -m nnunetv2_mobilevim.research.synthetic OUT_FOLDER --cases 20 --test-cases 5 --shape 96 96 96
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

LABEL_NAMES = ["background", "ellipsoid", "small_sphere", "thin_tube", "shell"]


def _grid(shape: Sequence[int]) -> Tuple[np.ndarray, ...]:
    return np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")


def make_case(shape: Sequence[int], num_classes: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One (image float32, label uint8) pair of ``shape``."""
    z, y, x = _grid(shape)
    coords = np.stack([z, y, x])
    size = np.array(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    image = 0.2 * rng.standard_normal() + np.zeros(shape, dtype=np.float32)
    means = {1: 1.0, 2: 1.6, 3: 1.3, 4: 0.9}

    def ellipsoid_dist(center, radii, rotation):
        rel = np.tensordot(rotation, coords - center[:, None, None, None], axes=1)
        return np.sqrt(sum((rel[i] / radii[i]) ** 2 for i in range(3)))

    def random_rotation():
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        return q.astype(np.float32)

    if num_classes >= 1:
        for _ in range(rng.integers(1, 3)):
            d = ellipsoid_dist(rng.uniform(0.3, 0.7, 3) * size, rng.uniform(0.12, 0.25, 3) * size, random_rotation())
            label[d < 1] = 1
    if num_classes >= 4:
        for _ in range(rng.integers(1, 3)):
            d = ellipsoid_dist(rng.uniform(0.25, 0.75, 3) * size, rng.uniform(0.1, 0.18, 3) * size, random_rotation())
            label[(d < 1) & (d > 0.7)] = 4
    if num_classes >= 3:
        for _ in range(rng.integers(1, 4)):
            start, direction = rng.uniform(0.1, 0.9, 3) * size, rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            rel = coords - start[:, None, None, None]
            along = np.tensordot(direction, rel, axes=1)
            across = np.sqrt(np.maximum((rel ** 2).sum(0) - along ** 2, 0))
            label[(across < rng.uniform(0.7, 1.3)) & (np.abs(along) < 0.4 * size.min())] = 3
    if num_classes >= 2:
        for _ in range(rng.integers(1, 5)):
            d = ellipsoid_dist(rng.uniform(0.15, 0.85, 3) * size, np.full(3, rng.uniform(1.5, 3.5)), np.eye(3))
            label[d < 1] = 2
    for cls, mean in means.items():
        if cls <= num_classes:
            image[label == cls] += mean * rng.uniform(0.8, 1.2)
    shading = 0.3 * np.sin(coords[0] / size[0] * rng.uniform(1, 3) + rng.uniform(0, 6))
    image = image + shading + rng.normal(0, 0.35, shape).astype(np.float32)
    return image.astype(np.float32), label


def write_dataset(out: Path, cases: int = 10, test_cases: int = 2, shape: Sequence[int] = (48, 48, 48),
                  num_classes: int = 4, spacing: Sequence[float] = (1.0, 1.0, 1.0), seed: int = 0,
                  channels: int = 1, test_shape: Sequence[int] = None, ignore_label: bool = False,
                  regions: bool = False) -> Path:
    """Write imagesTr/labelsTr/imagesTs/labelsTs and dataset.json (NIfTI) into ``out``; test cases have
    ``test_shape`` (default: ``shape``).

    ``ignore_label``: dataset.json's labels get ``"ignore": num_classes + 1`` (nnU-Net wants the highest
    value) and each training label map keeps its annotation on every third slice of the first axis
    only (``ignore_label_mask``); test labels stay fully annotated. ``regions``: dataset.json declares
    nested regions (region k = labels k..num_classes, BraTS-style) with ``regions_class_order`` 1..num_classes,
    so nnU-Net trains on regions and writes predictions back as the same label values."""
    import SimpleITK as sitk

    if regions and num_classes < 2:
        raise ValueError(f"regions=True needs num_classes >= 2 (nested regions), got {num_classes}")
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)

    def save(array: np.ndarray, path: Path) -> None:
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
        sitk.WriteImage(img, str(path), useCompression=True)

    for i in range(cases + test_cases):
        split = "Tr" if i < cases else "Ts"
        image, label = make_case(shape if split == "Tr" else (test_shape or shape), num_classes, rng)
        name = f"case_{i:03d}"
        for c in range(channels):
            channel = image if c == 0 else image * (1 + 0.5 * c) + rng.normal(0, 0.2, image.shape).astype(np.float32)
            save(channel, out / f"images{split}" / f"{name}_{c:04d}.nii.gz")
        if ignore_label and split == "Tr":
            label = np.where(ignore_label_mask(label.shape), np.uint8(num_classes + 1), label)
        save(label, out / f"labels{split}" / f"{name}.nii.gz")
    labels = region_labels(num_classes) if regions else {n: i for i, n in enumerate(LABEL_NAMES[:num_classes + 1])}
    dataset = {
        "channel_names": {str(c): f"synthetic{c}" for c in range(channels)},
        "labels": labels,
        "numTraining": cases,
        "file_ending": ".nii.gz",
        "name": out.name,
        "description": "synthetic shapes from nnunetv2_mobilevim.research.synthetic",
    }
    if ignore_label:
        dataset["labels"]["ignore"] = num_classes + 1
    if regions:
        dataset["regions_class_order"] = list(range(1, num_classes + 1))
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return out


CT_LABEL_NAMES = ["background", "organ", "kidney", "aorta", "bone"]
CT_HU = {"air": -1000.0, "fat": -100.0, "soft_tissue": 40.0, "organ": 60.0, "kidney": 150.0, "aorta": 250.0,
         "bone": 700.0}


def ct_spacing(rng: np.random.Generator) -> Tuple[float, float, float]:
    """A (z, y, x) spacing in mm like an abdominal CT's: square pixels of 0.7-0.9 mm and slices 3.1-3.6 times
    as thick (about 2.2-3.2 mm), so every case is anisotropic beyond nnU-Net's threshold of 3 and nnU-Net
    resamples it with the coarse axis separately (``determine_do_sep_z_and_axis``)."""
    pixel = float(rng.uniform(0.7, 0.9))
    return float(pixel * rng.uniform(3.1, 3.6)), pixel, pixel


def make_ct_case(shape: Sequence[int], spacing: Sequence[float],
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One (image int16 in Hounsfield-like units, label uint8) pair of ``shape`` (z, y, x) at ``spacing`` mm:
    a body (fat rim, soft tissue) in air inside a circular field of view, with labels 1 organ, 2 kidneys,
    3 aorta (a tube along z), 4 bone (a vertebral column along z), and noise. Anatomy is placed in mm, so
    cases of different spacing show it at different voxel sizes. Outside the field of view (a disc of
    0.42 x the in-plane size) and on the first and last slice the value is 0, as a scanner's FOV mask and
    padding write it: nnU-Net's crop to the non-zero region crops there."""
    z, y, x = np.meshgrid(*[(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing)],
                          indexing="ij")
    fov = 0.42 * min(shape[1] * spacing[1], shape[2] * spacing[2])
    body_a, body_b = fov * rng.uniform(0.8, 0.9), fov * rng.uniform(0.6, 0.7)  # body half-axes along x, y (mm)
    cy, cx = rng.uniform(-0.05, 0.05, 2) * fov
    body = ((x - cx) / body_a) ** 2 + ((y - cy) / body_b) ** 2
    image = np.full(shape, CT_HU["air"], dtype=np.float32)
    image[body < 1] = CT_HU["fat"]
    image[body < 0.8] = CT_HU["soft_tissue"]
    label = np.zeros(shape, dtype=np.uint8)

    def ellipsoid(center, radii):
        return sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), center, radii)) < 1

    z_extent = shape[0] * spacing[0] / 2
    organ_radii = (z_extent * rng.uniform(0.6, 0.9), body_b * rng.uniform(0.4, 0.5), body_a * rng.uniform(0.3, 0.4))
    organ = ellipsoid((rng.uniform(-0.2, 0.2) * z_extent, cy - 0.1 * body_b, cx - 0.35 * body_a), organ_radii)
    label[organ & (body < 0.8)] = 1
    for side in (-1, 1):
        kidney = ellipsoid((rng.uniform(-0.3, 0.3) * z_extent, cy + 0.35 * body_b, cx + side * 0.45 * body_a),
                           (z_extent * rng.uniform(0.3, 0.45), body_b * 0.2, body_a * rng.uniform(0.1, 0.14)))
        label[kidney] = 2
    aorta_y, aorta_x = cy + 0.1 * body_b, cx + rng.uniform(0.05, 0.15) * body_a
    label[(y - aorta_y) ** 2 + (x - aorta_x) ** 2 < (body_a * rng.uniform(0.07, 0.09)) ** 2] = 3
    spine_y, spine_x = cy + 0.55 * body_b, cx
    label[(y - spine_y) ** 2 + (x - spine_x) ** 2 < (body_b * rng.uniform(0.18, 0.22)) ** 2] = 4
    for cls, name in enumerate(CT_LABEL_NAMES[1:], start=1):
        image[label == cls] = CT_HU[name] + rng.normal(0, 10)
    image += rng.normal(0, 15, shape).astype(np.float32)
    outside = (x ** 2 + y ** 2) > fov ** 2
    outside[[0, -1]] = True
    image[outside], label[outside] = 0, 0
    return np.round(image).astype(np.int16), label


def write_ct_dataset(out: Path, cases: int = 6, test_cases: int = 2, shape: Sequence[int] = (20, 48, 48),
                     seed: int = 0, test_shapes: Optional[Sequence[Sequence[int]]] = None,
                     test_spacings: Optional[Sequence[Sequence[float]]] = None) -> Path:
    """Write a CT-like dataset (``make_ct_case``) in nnU-Net's raw format into ``out``: imagesTr/labelsTr/
    imagesTs/labelsTs and dataset.json with the channel named "CT" (nnU-Net plans CTNormalization); test
    case k has shape ``test_shapes[k]`` and (z, y, x) spacing ``test_spacings[k]`` where given (default:
    ``shape``, a spacing drawn as for the training cases). Each
    case has its own spacing (``ct_spacing``), origin and a direction that flips x and y (as LPS-stored
    NIfTI do), so nnU-Net resamples every case to and from its target spacing and the geometry a
    prediction must carry over is not the default."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for i in range(cases + test_cases):
        split = "Tr" if i < cases else "Ts"
        spacing = ct_spacing(rng)
        origin = tuple(float(v) for v in rng.uniform(-200, 200, 3))
        case_shape = shape
        if split == "Ts":
            case_shape = test_shapes[i - cases] if test_shapes else shape
            spacing = tuple(float(s) for s in test_spacings[i - cases]) if test_spacings else spacing
        image, label = make_ct_case(case_shape, spacing, rng)
        for array, path in ((image, out / f"images{split}" / f"ct_{i:03d}_0000.nii.gz"),
                            (label, out / f"labels{split}" / f"ct_{i:03d}.nii.gz")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(tuple(reversed(spacing)))
            img.SetOrigin(origin)
            img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
            sitk.WriteImage(img, str(path), useCompression=True)
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"},
        "labels": {n: i for i, n in enumerate(CT_LABEL_NAMES)},
        "numTraining": cases,
        "file_ending": ".nii.gz",
        "name": out.name,
        "description": "synthetic CT-like anisotropic cases from nnunetv2_mobilevim.research.synthetic",
    }, indent=2))
    return out


def ignore_label_mask(shape: Sequence[int]) -> np.ndarray:
    """Bool array of ``shape``, True where a sparsely annotated training label is set to the ignore label:
    everywhere except every third slice of the first axis (slices 0, 3, 6, ...)."""
    ignored = np.ones(shape, dtype=bool)
    ignored[::3] = False
    return ignored


def region_labels(num_classes: int) -> dict:
    """dataset.json ``labels`` for nested regions, e.g. for 3 classes {"background": 0,
    "labels_1_to_3": [1, 2, 3], "labels_2_to_3": [2, 3], "thin_tube": 3}."""
    labels = {"background": 0}
    for k in range(1, num_classes):
        labels[f"labels_{k}_to_{num_classes}"] = list(range(k, num_classes + 1))
    labels[LABEL_NAMES[num_classes]] = num_classes
    return labels


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.synthetic",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="dataset folder, e.g. $nnUNet_raw/Dataset502_Shapes")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--test-cases", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96])
    parser.add_argument("--classes", type=int, default=4, choices=[1, 2, 3, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-label", action="store_true",
                        help="sparse training labels with nnU-Net's ignore label")
    parser.add_argument("--regions", action="store_true", help="nested regions (region-based training)")
    parser.add_argument("--ct", action="store_true",
                        help="CT-like anisotropic cases instead (write_ct_dataset; --classes and label options unused)")
    args = parser.parse_args(argv)
    if args.ct:
        write_ct_dataset(args.out, args.cases, args.test_cases, args.shape, seed=args.seed)
        print(f"wrote {args.cases} training and {args.test_cases} CT-like test cases to {args.out}")
        return
    write_dataset(args.out, args.cases, args.test_cases, args.shape, args.classes, seed=args.seed,
                  ignore_label=args.ignore_label, regions=args.regions)
    print(f"wrote {args.cases} training and {args.test_cases} test cases to {args.out}")


if __name__ == "__main__":
    main()
