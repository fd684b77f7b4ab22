"""Where nnU-Net finds our trainers: the folder for the ``nnUNet_extTrainer`` variable (nnU-Net >= 2.8)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"


def ext_trainer_dir() -> Path:
    """The installed folder of thin shim modules that nnU-Net's trainer lookup imports."""
    return Path(__file__).resolve().parent.parent / "ext_trainers"


def is_registered() -> bool:
    """True when ``nnUNet_extTrainer`` lists our folder."""
    ours = ext_trainer_dir().resolve()
    entries = [e for e in os.environ.get(ENV_VAR, "").split(os.pathsep) if e.strip()]
    return any(Path(e).expanduser().resolve() == ours for e in entries)
