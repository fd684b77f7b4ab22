"""Derive the embedded demo dataset (brain extraction on real head MRI) from registry packages.

Run from the repository root on a Debian machine with apt-get and pip:

    python -m nnunetv2_mobilevim.demo_data.derive [--work /tmp/derive]

Sources (licences in PROVENANCE.md beside this file): Debian ``mricron-data`` (Colin27 T1 and its
brain extraction ch2better, one real person), Debian ``insighttoolkit5-examples`` (a second real person),
the PyPI wheels ``nilearn``
(MNI152 2009a symmetric template) and ``nimare`` (MNI152 NLin6Asym template). Every volume is
reoriented to RAS, resampled to 3 mm isotropic (linear for images, nearest-equivalent for masks),
cropped to the head with a 3-voxel margin, and written as nnU-Net raw files. Brain masks are
binarised (> 0, or GM+WM > 0.5 for the 2009a template), closed (2 iterations, 3 mm voxels) and
hole-filled, so all four follow one definition: the brain envelope with the fluid it encloses.
"""

from __future__ import annotations

import argparse
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from scipy import ndimage

HERE = Path(__file__).resolve().parent
SPACING = 3.0

# case id -> (image source, mask source(s), split)
CASES = {
    "colin27": ("mricron:ch2.nii.gz", ["mricron:ch2better.nii.gz"], "Tr"),
    "mni2009a": ("nilearn:mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                 ["nilearn:mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "nilearn:mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"], "Tr"),
    "mni6asym": ("nimare:tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
                 ["nimare:tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz"], "Tr"),
    "itkperson": ("itk:KmeansTest_T1UCharRaw.nii.gz", ["itk:KmeansTest_T1RawSkullStrip.nii.gz"], "Ts"),
}
LOCATIONS = {
    "mricron": "deb/usr/share/mricron/templates",
    "itk": "deb/usr/share/doc/insighttoolkit5-examples/examples/Data",
    "nilearn": "nilearn/nilearn/datasets/data",
    "nimare": "nimare/nimare/resources/templates",
}


def fetch(work: Path) -> None:
    """Download and unpack the four source packages into ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "mricron-data", "insighttoolkit5-examples"], cwd=work, check=True)
    for deb in work.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(work / "deb")], check=True)
    subprocess.run(["python3", "-m", "pip", "download", "--no-deps", "-d", str(work / "wheels"), "nilearn", "nimare"],
                   check=True)
    for wheel in (work / "wheels").glob("*.whl"):
        name = wheel.name.split("-")[0]
        with zipfile.ZipFile(wheel) as zf:
            wanted = ("datasets/data/mni_icbm152", "templates/tpl-MNI152NLin6Asym_res-01")
            members = [m for m in zf.namelist() if m.endswith(".nii.gz") and any(w in m for w in wanted)]
            zf.extractall(work / name, members)


def load_ras(path: Path) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(str(path)))


def target_grid(img: nib.Nifti1Image) -> tuple[tuple, np.ndarray]:
    """The image's field of view on a SPACING mm isotropic RAS grid: (shape, affine)."""
    zooms = np.array(img.header.get_zooms()[:3], dtype=float)
    shape = tuple(int(round(n * z / SPACING)) for n, z in zip(img.shape[:3], zooms))
    affine = img.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag(SPACING / zooms)
    return shape, affine


def resample(img: nib.Nifti1Image, grid: tuple, data: np.ndarray = None) -> np.ndarray:
    """``data`` (default: the image's) on ``grid``, linear interpolation in world coordinates."""
    data = np.asanyarray(img.dataobj) if data is None else data
    src = nib.Nifti1Image(data.astype(np.float32), img.affine)
    return np.asanyarray(resample_from_to(src, grid, order=1).dataobj)


def derive(work: Path, out: Path) -> None:
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for case, (image_src, mask_srcs, split) in CASES.items():
        def path(src: str) -> Path:
            pkg, name = src.split(":")
            return work / LOCATIONS[pkg] / name

        source = load_ras(path(image_src))
        grid = target_grid(source)
        affine = grid[1].copy()
        image = resample(source, grid)
        sources = [load_ras(path(m)) for m in mask_srcs]
        arrays = [np.asanyarray(m.dataobj).astype(np.float32) for m in sources]
        # GM + WM probabilities (2009a) or a label / skull-stripped image (> 0 is brain)
        binary = (sum(arrays) > 0.5) if len(arrays) > 1 else (arrays[0] > 0)
        mask = resample(sources[0], grid, binary) > 0.5
        # one definition for all: the brain envelope (sulci and ventricles closed, holes filled)
        structure = ndimage.generate_binary_structure(3, 2)
        mask = ndimage.binary_closing(np.pad(mask, 3), structure, iterations=2)[3:-3, 3:-3, 3:-3]
        mask = ndimage.binary_fill_holes(mask)
        labels, count = ndimage.label(mask)
        if count > 1:  # keep the largest component
            mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        head = image > np.percentile(image, 60) * 0.25
        lo = np.maximum(np.argwhere(head).min(0) - 3, 0)
        hi = np.argwhere(head).max(0) + 4
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        image, mask = image[crop], mask[crop]
        affine[:3, 3] += affine[:3, :3] @ lo
        scaled = np.round(image / max(image.max(), 1e-6) * 1000).astype(np.int16)
        nib.save(nib.Nifti1Image(scaled, affine), str(out / f"images{split}" / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(out / f"labels{split}" / f"{case}.nii.gz"))
        print(f"{case:10s} {split} {image.shape} brain {mask.mean():.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mobilevim-derive"))
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--skip-fetch", action="store_true")
    args = parser.parse_args()
    if not args.skip_fetch:
        fetch(args.work)
    derive(args.work, args.out)


if __name__ == "__main__":
    main()
