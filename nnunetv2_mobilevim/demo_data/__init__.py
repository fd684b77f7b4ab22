"""The demo's real head-MRI brain-extraction dataset (3 training volumes, 1 held-out person;
PROVENANCE.md) and its writer in nnU-Net's raw format, shared by the demo and the comparisons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DATASET_ID, DATASET = 990, "Dataset990_MobileViMDemo"
DATA = Path(__file__).resolve().parent


def write_raw_dataset(raw: Path) -> Path:
    """The demo dataset in nnU-Net's raw format under ``raw``; returns its folder."""
    out = raw / DATASET
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        shutil.copytree(DATA / folder, out / folder, dirs_exist_ok=True)
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "brain": 1},
        "numTraining": len(list((out / "labelsTr").glob("*.nii.gz"))),
        "file_ending": ".nii.gz",
        "name": DATASET,
        "description": "brain extraction on real head MRI, see nnunetv2_mobilevim/demo_data/PROVENANCE.md",
    }, indent=2))
    return out
