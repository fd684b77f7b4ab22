"""U-Mamba configuration as data: ``network_configs/umamba_*.json`` loaded into :class:`UMambaConfig`.

The nnU-Net plan fixes widths, kernels, strides and block counts; a config file fixes only what U-Mamba
adds on top (where the Mamba layers sit, how they scan, their sizes). A variant is named by ``"bot"`` /
``"enc"`` (the shipped files) or by a path to a JSON file with the same keys. Unknown keys, missing keys
and out-of-range values are refused with a message naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .. import config_files

#: Variants shipped with the package, by short name.
SHIPPED_VARIANTS = {"bot": "umamba_bot.json", "enc": "umamba_enc.json"}

#: Which encoder stages end in a Mamba layer: the bottleneck only, every stage, or every other stage
#: counted back from the bottleneck (so the bottleneck always has one).
MAMBA_STAGES = ("bottleneck", "all", "alternate")

#: "released": the per-stage block counts U-Mamba's code derives from the plan (one residual block in
#: the encoder stages from ceil(n/2) on and in the decoder entries from ceil(n/2) on);
#: "plan": the plan's counts as they are.
BLOCK_COUNTS = ("released", "plan")


@dataclass(frozen=True)
class UMambaConfig:
    """Everything beyond the nnU-Net plan that fixes a U-Mamba network (Ma, Li, Wang 2024)."""

    name: str
    mamba: bool  # False builds the NoMamba twin: every Mamba layer (LayerNorm + Mamba) is an identity
    mamba_stages_3d: str  # one of MAMBA_STAGES, for 3D plans
    mamba_stages_2d: str  # one of MAMBA_STAGES, for 2D plans
    channel_tokens: bool  # scan channels as tokens where a stage has no more pixels/voxels than channels
    d_state: int  # N, SSM state size
    d_conv: int  # kernel of the causal depthwise conv1d
    expand: int  # inner width = expand * token width
    block_counts: str  # one of BLOCK_COUNTS
    full_resolution_skip_2d: bool  # False: the 2D decoder's last stage gets no skip (the released 2D code)

    def __post_init__(self) -> None:
        problems = []
        for key in ("mamba_stages_3d", "mamba_stages_2d"):
            if getattr(self, key) not in MAMBA_STAGES:
                problems.append(f"{key} must be one of {MAMBA_STAGES}, got {getattr(self, key)!r}")
        if self.block_counts not in BLOCK_COUNTS:
            problems.append(f"block_counts must be one of {BLOCK_COUNTS}, got {self.block_counts!r}")
        for key in ("d_state", "d_conv", "expand"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{key} must be an integer >= 1, got {value!r}")
        for key in ("mamba", "channel_tokens", "full_resolution_skip_2d"):
            if not isinstance(getattr(self, key), bool):
                problems.append(f"{key} must be true or false, got {getattr(self, key)!r}")
        if problems:
            raise ValueError(f"invalid U-Mamba configuration {self.name!r}: " + "; ".join(problems))

    def mamba_stages(self, dimension: int) -> str:
        """The stage rule for a 2D or 3D plan."""
        return self.mamba_stages_2d if dimension == 2 else self.mamba_stages_3d

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "UMambaConfig":
        return config_files.from_dict(cls, data, source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(variant: Union[str, Path, UMambaConfig] = "bot") -> UMambaConfig:
    """``"bot"``, ``"enc"``, a path to a JSON file, or an already built config."""
    return config_files.load(UMambaConfig, variant, SHIPPED_VARIANTS, "U-Mamba")
