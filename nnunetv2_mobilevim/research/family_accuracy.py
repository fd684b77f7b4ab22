"""The family's accuracy on one schedule: nnU-Net's default (compiled), every network of this package with
its default recipe and each no-Mamba twin, gathered from ``research.compare`` runs made in parts.

    python -m nnunetv2_mobilevim.research.family_accuracy trainers         # compare's trainer specs, one per line
    python -m nnunetv2_mobilevim.research.compare --dataset shapes --epochs E --iterations I --baseline-compile \\
        --workdir W --trainers SPEC ... --out part1.json                    # as many parts as the device calls need
    python -m nnunetv2_mobilevim.research.family_accuracy merge --device "NVIDIA H200" --commit C --date D \\
        --out docs/results/h200_family_accuracy.json part1.json part2.json ...
    ... merge --commit C1 --commit parts/later/=C2 ...   # parts under parts/later/ ran at C2, the rest at C1

A device call lasts at most 10 minutes, so one schedule for all trainers is trained in parts (each part
one ``compare`` command with some of the specs; the same ``--workdir`` reuses the preprocessed dataset).
``merge`` refuses parts whose schedules (epochs, iterations) differ or whose nnU-Net baseline was not
compiled, and writes ``{"device", "schedule", "rows": [{"trainer", "dataset", "dice_per_class",
"dice_mean", "epoch_s_median", "peak_gb", "gpu_shared", ...}]}`` (``gpu_shared``: the part ran with
``--shared-gpu``, beside another training, so its epoch times are not comparable); a trainer trained
twice on a dataset (a second seed) gives two rows, numbered by ``run``. Parts may run side by side on one
GPU after ``compare --prepare-only`` has written the dataset once. A trainer too slow for one call trains
with ``compare --time-limit`` and is continued by the same command with ``--continue`` in the next call
(same workdir); the first part's unfinished row is skipped, and the trainer stays in ``missing`` until a
part holds its finished row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

#: nnU-Net's default, then each network's default recipe followed by its no-Mamba twin; MobileViM_s also
#: with nnU-Net's CPU augmentation (``:da=0``) to compare the two pipelines
FAMILY = (
    "nnUNetTrainer",
    "nnUNetTrainerMobileViM", "nnUNetTrainerMobileViM:da=0", "nnUNetTrainerMobileViM_xs",
    "nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaBot_NoMamba",
    "nnUNetTrainerUMambaEnc", "nnUNetTrainerUMambaEnc_NoMamba",
    "nnUNetTrainerTamingSegMamba", "nnUNetTrainerTamingSegMamba_NoMamba",
    "nnUNetTrainerSegMambaSkip", "nnUNetTrainerSegMambaSkip_NoMamba",
    "nnUNetTrainerBiSegMamba", "nnUNetTrainerBiSegMamba_NoMamba",
    "nnUNetTrainerMultiSegMamba", "nnUNetTrainerMultiSegMamba_NoMamba",
)


def part_commits(values: Sequence[str], names: Sequence[str]) -> Dict[str, str]:
    """The commit each part ran at, from ``--commit`` values: ``C`` (every part not otherwise named) or
    ``PREFIX=C`` (the parts whose file name starts with PREFIX; the longest matching prefix wins).
    ValueError when a prefix matches no part, or a part is left without a commit."""
    default = [v for v in values if "=" not in v]
    prefixed = [tuple(v.split("=", 1)) for v in values if "=" in v]
    if len(default) > 1:
        raise ValueError(f"--commit without a prefix was given {len(default)} times: {', '.join(default)}")
    for prefix, _ in prefixed:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(f"--commit {prefix}=...: no part's file name starts with {prefix}")
    commits = {}
    for name in names:
        matches = sorted((p for p in prefixed if name.startswith(p[0])), key=lambda p: len(p[0]))
        commit = matches[-1][1] if matches else (default[0] if default else None)
        if commit is None:
            raise ValueError(f"no --commit names the commit of {name}")
        commits[name] = commit
    return commits


def merge(parts: Dict[str, dict], device: str, provenance: Optional[Dict[str, str]] = None,
          commits: Optional[Dict[str, str]] = None) -> dict:
    """The rows of ``compare`` results ``parts`` (file name -> its JSON) in the family-accuracy format;
    ``provenance`` (e.g. the date of the runs) is copied to the top level; ``commits`` (file name -> the
    commit it ran at) goes into each row and, the distinct commits joined, to the top level.

    ValueError when the parts' schedules differ, or when nnU-Net's own trainer trained without
    torch.compile (the baseline the family is compared with is nnU-Net's GPU default)."""
    if not parts:
        raise ValueError("no compare results to merge")
    for name, part in parts.items():
        lacking = [k for k in ("dataset", "epochs", "iterations_per_epoch", "rows") if k not in part]
        if lacking:
            raise ValueError(f"{name} is not a result of research.compare (it lacks {', '.join(lacking)})")
    schedules = {name: (p["epochs"], p["iterations_per_epoch"]) for name, p in parts.items()}
    if len(set(schedules.values())) > 1:
        listed = ", ".join(f"{name}: {e} x {i}" for name, (e, i) in schedules.items())
        raise ValueError(f"the parts were trained on different schedules (epochs x iterations): {listed}; "
                         "one schedule for all trainers is the point of the comparison")
    epochs, iterations = next(iter(schedules.values()))
    rows: List[dict] = []
    runs: Dict[tuple, int] = {}
    for name, part in parts.items():
        for row in part["rows"]:
            if row.get("incomplete"):  # stopped by compare --time-limit: its continuation is another part
                continue
            spec = row.get("spec", row["trainer"])
            if row["trainer"] == "nnUNetTrainer" and not row.get("torch_compile"):
                raise ValueError(f"{name}: nnUNetTrainer trained without torch.compile; run compare with "
                                 "--baseline-compile (nnU-Net's default on a GPU)")
            key = (spec, part["dataset"])
            runs[key] = runs.get(key, 0) + 1
            rows.append({"trainer": spec, "dataset": part["dataset"], "dice_per_class": row["dice"],
                         "dice_mean": row["dice_mean"], "epoch_s_median": row["epoch_seconds_median"],
                         "peak_gb": row["peak_gpu_gb"], "run": runs[key], "params": row.get("params"),
                         "dice_best_mean": row.get("dice_best_mean"),
                         "dice_best_no_tta_mean": row.get("dice_best_no_tta_mean"),
                         "any_nan_loss": row.get("any_nan_loss"), "gpu_shared": bool(part.get("gpu_shared")),
                         "source": name, "command": part.get("command"),
                         **({"commit": commits[name]} if commits else {})})
    if commits:
        provenance = {"commit": ", ".join(dict.fromkeys(commits[name] for name in parts)), **(provenance or {})}
    return {"device": device, **(provenance or {}), "schedule": {"epochs": epochs, "iterations": iterations},
            "rows": rows,
            "missing": [[spec, dataset] for dataset in sorted({p["dataset"] for p in parts.values()})
                        for spec in FAMILY if (spec, dataset) not in runs]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.family_accuracy",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("trainers", help="print the trainer specs for compare, one per line")
    m = sub.add_parser("merge", help="merge compare results into the family-accuracy JSON")
    m.add_argument("parts", nargs="+", type=Path, help="compare --out files")
    m.add_argument("--device", required=True, help='the GPU, e.g. "NVIDIA H200"')
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--commit", action="append", default=[], metavar="[PREFIX=]COMMIT",
                   help="the commit the parts ran at (recorded); PREFIX=COMMIT for the parts whose file name "
                   "starts with PREFIX; repeatable")
    m.add_argument("--date", help="when the parts ran, e.g. 2026-12-03 (recorded)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "trainers":
        print("\n".join(FAMILY))
        return 0
    try:
        parts = {str(p): json.loads(p.read_text()) for p in args.parts}
        commits = part_commits(args.commit, list(parts)) if args.commit else None
        result = merge(parts, args.device, {"date": args.date} if args.date else None, commits)
    except (OSError, ValueError, KeyError) as err:
        print(f"family_accuracy merge: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}: {len(result['rows'])} rows; not yet trained: "
          f"{', '.join(f'{s} ({d})' for s, d in result['missing']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
