"""How closely two folders of nnU-Net predictions agree, e.g. ``nnunetv2_mobilevim predict`` against
``nnUNetv2_predict`` with the same model, folds and flags.

Per segmentation file of the reference folder (``CASE`` + the dataset's file ending):

- whether the candidate has it, and whether both hold the same set of files (.npz, .pkl included);
- whether the image geometry (size, spacing, origin, direction) and the pixel type (of the probabilities
  too) are equal;
- the Dice of every label present in either file (a label in one file only scores 0);
- with ``CASE.npz`` in both: the largest and the mean absolute difference of the probabilities, the
  share of probability values that differ at all, and the largest *implied logit difference* (below);
  with ``CASE.pkl`` in both: whether the properties nnU-Net stored there (geometry, crop box, shapes)
  are equal.

The summary's headline numbers: ``dice_agreement_min`` (the smallest Dice over files and labels),
``max_abs_probability_difference`` and ``max_implied_logit_difference`` (the largest over files; None
without .npz pairs).

The implied logit difference of a probability pair (p, q) is the smallest u such that moving every
logit by at most u explains q - p: the softmax's (and the sigmoid's) derivative bounds
|dp_k| <= 2 p_k (1 - p_k) u, so u = |q - p| / (2 c) with c the largest p (1 - p) between p and q (1/4
where they lie on both sides of 1/2), after allowing a few float32 steps of the probabilities
themselves (``PROBABILITY_ROUNDING``). It is the measure to use where both predictions come from
float16 logits, as nnU-Net's do (its sliding window accumulates them in float16): a logit that rounds
to the neighbouring float16 value moves a probability near 1/2 by up to a quarter of that step but one
near 0 or 1 hardly at all, so a bound on |q - p| is either loose where p saturates or flaky where it
does not; u is one float16 step whichever p is. A real defect (a voxel set to background, a shifted
resampling) moves saturated probabilities and shows as u of order 1.

    python -m nnunetv2_mobilevim.research.prediction_agreement REFERENCE CANDIDATE [-o agreement.json]
        [--min-dice 0.999] [--max-probability-difference 1e-3] [--max-logit-difference 0.0625]

With thresholds, the summary has ``ok`` and the exit status is 1 where they are not met. The .pkl
files are read with pickle, as nnU-Net reads them: compare only folders you trust.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

_SIDE_FILES = (".npz", ".pkl", ".json")
PROBABILITY_ROUNDING = 2.0 ** -22  # two float32 steps just below 1: stored probabilities' own rounding


def implied_logit_difference(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per value of two probability arrays (same shape, any layout): the smallest bound u on the logits'
    change that explains the difference to first order, |q - p| <= 2 c u (see the module docstring);
    0 where they agree within ``PROBABILITY_ROUNDING``, inf where a saturated probability moved."""
    p, q = reference.astype(np.float64), candidate.astype(np.float64)
    c = np.maximum(p * (1 - p), q * (1 - q))
    c = np.where((p - 0.5) * (q - 0.5) <= 0, 0.25, c)  # p(1-p) peaks at 1/2 between them
    excess = np.maximum(np.abs(q - p) - PROBABILITY_ROUNDING, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(excess > 0, excess / (2 * c), 0.0)


def dice_per_label(reference: np.ndarray, candidate: np.ndarray) -> Dict[int, float]:
    """Dice 2|R & C| / (|R| + |C|) of every label present in ``reference`` or ``candidate`` (same shape)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} and {candidate.shape}")
    scores = {}
    for label in np.union1d(np.unique(reference), np.unique(candidate)):
        r, c = reference == label, candidate == label
        scores[int(label)] = float(2 * np.logical_and(r, c).sum() / (r.sum() + c.sum()))
    return scores


def _file_ending(folder: Path) -> str:
    """The dataset's file ending from the folder's dataset.json (nnU-Net writes one), else .nii.gz."""
    dataset_json = folder / "dataset.json"
    if dataset_json.is_file():
        return json.loads(dataset_json.read_text()).get("file_ending", ".nii.gz")
    return ".nii.gz"


def _plain(value):
    """Properties as plain, comparable Python values (tuples and arrays as lists, numpy scalars as numbers)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _load_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _logit_statistics(u: np.ndarray) -> dict:
    return {"max_implied_logit_difference": float(u.max()), "mean_implied_logit_difference": float(u.mean())}


def compare_files(reference: Path, candidate: Path, file_ending: str = ".nii.gz") -> dict:
    """One case: geometry, pixel type and per-label Dice of two segmentation files ``CASE + file_ending``,
    and the probabilities and properties stored beside them (``CASE.npz``, ``CASE.pkl``) where both
    folders have them."""
    import SimpleITK as sitk

    a, b = sitk.ReadImage(str(reference)), sitk.ReadImage(str(candidate))
    geometry = [{"size": img.GetSize(), "spacing": img.GetSpacing(), "origin": img.GetOrigin(),
                 "direction": img.GetDirection()} for img in (a, b)]
    x, y = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    result = {"geometry_equal": geometry[0] == geometry[1], "dtype_equal": x.dtype == y.dtype,
              "shape_equal": x.shape == y.shape, "reference_geometry": _plain(geometry[0]),
              "candidate_geometry": _plain(geometry[1])}
    dice = dice_per_label(x, y) if x.shape == y.shape else {}
    result["dice"] = {str(k): v for k, v in dice.items()}
    result["dice_min"] = min(dice.values()) if dice else 0.0
    stem = reference.name[:-len(file_ending)] if reference.name.endswith(file_ending) else reference.stem
    npz = [reference.parent / f"{stem}.npz", candidate.parent / f"{stem}.npz"]
    result["max_abs_probability_difference"] = None
    if all(p.is_file() for p in npz):
        pa, pb = (np.load(p)["probabilities"] for p in npz)
        result["probability_dtype_equal"] = pa.dtype == pb.dtype
        if pa.shape == pb.shape:
            diff = np.abs(pa.astype(np.float64) - pb.astype(np.float64))
            result.update(max_abs_probability_difference=float(diff.max()),
                          mean_abs_probability_difference=float(diff.mean()),
                          probability_values_differing=float((diff > 0).mean()),
                          **_logit_statistics(implied_logit_difference(pa, pb)))
        else:
            result.update(max_abs_probability_difference=math.inf, **_logit_statistics(np.array([math.inf])))
        result["probability_shape_equal"] = pa.shape == pb.shape
    pkl = [reference.parent / f"{stem}.pkl", candidate.parent / f"{stem}.pkl"]
    if all(p.is_file() for p in pkl):
        result["properties_equal"] = _plain(_load_pickle(pkl[0])) == _plain(_load_pickle(pkl[1]))
    return result


def compare_folders(reference: Path, candidate: Path, file_ending: Optional[str] = None) -> dict:
    """The agreement of ``candidate``'s predictions with ``reference``'s (see the module docstring)."""
    reference, candidate = Path(reference), Path(candidate)
    ending = file_ending or _file_ending(reference)
    names = {folder: sorted(p.name for p in folder.iterdir() if p.is_file()) for folder in (reference, candidate)}
    missing = sorted(set(names[reference]) - set(names[candidate]))
    extra = sorted(set(names[candidate]) - set(names[reference]))
    cases = [n for n in names[reference] if n.endswith(ending) and not n.endswith(_SIDE_FILES)]
    files = {n[:-len(ending)]: compare_files(reference / n, candidate / n, ending) for n in cases
             if (candidate / n).is_file()}
    differences = [f["max_abs_probability_difference"] for f in files.values()
                   if f["max_abs_probability_difference"] is not None]
    return {
        "reference": str(reference), "candidate": str(candidate), "file_ending": ending,
        "cases": len(cases), "compared": len(files), "missing_in_candidate": missing, "extra_in_candidate": extra,
        "same_files": not missing and not extra and bool(cases),
        "geometry_equal": all(f["geometry_equal"] for f in files.values()) and len(files) == len(cases),
        "dtype_equal": all(f["dtype_equal"] and f.get("probability_dtype_equal", True) for f in files.values()),
        "properties_equal": all(f.get("properties_equal", True) for f in files.values()),
        "dice_agreement_min": min((f["dice_min"] for f in files.values()), default=None),
        "max_abs_probability_difference": max(differences) if differences else None,
        "max_implied_logit_difference": max((f["max_implied_logit_difference"] for f in files.values()
                                             if "max_implied_logit_difference" in f), default=None),
        "mean_implied_logit_difference_max": max((f["mean_implied_logit_difference"] for f in files.values()
                                                  if "mean_implied_logit_difference" in f), default=None),
        "probability_pairs": len(differences),
        "mean_abs_probability_difference_max": max((f["mean_abs_probability_difference"] for f in files.values()
                                                    if "mean_abs_probability_difference" in f), default=None),
        "files": files,
    }


def check(summary: dict, min_dice: float, max_probability_difference: Optional[float] = None,
          max_logit_difference: Optional[float] = None) -> bool:
    """Whether ``summary`` shows the same files, geometry, pixel type and properties, every Dice at least
    ``min_dice`` and, if given, every probability within ``max_probability_difference`` and every implied
    logit difference within ``max_logit_difference``."""
    ok = (summary["same_files"] and summary["geometry_equal"] and summary["dtype_equal"]
          and summary["properties_equal"] and summary["dice_agreement_min"] is not None
          and summary["dice_agreement_min"] >= min_dice)
    if max_probability_difference is not None:
        ok = ok and summary["max_abs_probability_difference"] is not None \
            and summary["max_abs_probability_difference"] <= max_probability_difference
    if max_logit_difference is not None:
        ok = ok and summary["max_implied_logit_difference"] is not None \
            and summary["max_implied_logit_difference"] <= max_logit_difference
    return bool(ok)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.prediction_agreement",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="prediction folder taken as the reference (nnUNetv2_predict)")
    parser.add_argument("candidate", type=Path, help="prediction folder to compare with it")
    parser.add_argument("-o", type=Path, default=None, help="write the summary (JSON) here")
    parser.add_argument("--file-ending", default=None, help="default: from REFERENCE/dataset.json, else .nii.gz")
    parser.add_argument("--min-dice", type=float, default=None, help="threshold for dice_agreement_min")
    parser.add_argument("--max-probability-difference", type=float, default=None,
                        help="threshold for max_abs_probability_difference (needs .npz in both folders)")
    parser.add_argument("--max-logit-difference", type=float, default=None,
                        help="threshold for max_implied_logit_difference (needs .npz in both folders)")
    args = parser.parse_args(argv)
    for folder in (args.reference, args.candidate):
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
    summary = compare_folders(args.reference, args.candidate, args.file_ending)
    thresholds = (args.min_dice, args.max_probability_difference, args.max_logit_difference)
    if any(t is not None for t in thresholds):
        summary["ok"] = check(summary, args.min_dice if args.min_dice is not None else 0.0,
                              args.max_probability_difference, args.max_logit_difference)
    text = json.dumps(summary, indent=1)
    if args.o is not None:
        args.o.parent.mkdir(parents=True, exist_ok=True)
        args.o.write_text(text)
    headline = {k: summary[k] for k in ("cases", "compared", "same_files", "geometry_equal", "dtype_equal",
                                        "properties_equal", "dice_agreement_min", "max_abs_probability_difference",
                                        "max_implied_logit_difference")}
    print(json.dumps({**headline, **({"ok": summary["ok"]} if "ok" in summary else {})}))
    return 0 if summary.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
