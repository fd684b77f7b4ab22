"""Network configuration as data: ``network_configs/*.json`` loaded into :class:`MobileViMConfig`.

A variant is named by ``"s"``/``"xs"`` (the shipped files) or by a path to a JSON file with the same
keys. Unknown keys, missing keys and out-of-range values are refused with a message that names the
file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple, Union

from .. import config_files

#: Variants shipped with the package, by short name.
SHIPPED_VARIANTS = {"s": "mobilevim_s.json", "xs": "mobilevim_xs.json"}

NORMS = ("batch", "instance")


@dataclass(frozen=True)
class MobileViMConfig:
    """Everything that fixes a MobileViM architecture (Table 1 / the released configuration).

    The last four fields are the components of the paper's ablation (Table 4); switching one off
    builds that ablation row.
    """

    name: str
    stem_channels: int
    stage_channels: Tuple[int, int, int, int]
    mamba_layers: Tuple[int, int, int, int]  # l, Dual-direction Mamba layers per stage
    downsample_expand: int  # MBConv expansion of the DWConv downsampling blocks
    d_state: int  # M, SSM state size
    d_conv: int  # kernel of the causal depthwise conv1d
    expand: int  # inner width = expand * token dim (2E in Algorithm 1)
    dimin_token_size: int  # P, neighbouring profile positions per token
    bottleneck_expand: int  # decoder bottleneck expansion
    uplink_expand: float  # decoder up-link hidden width, fraction of its input channels
    norm: str = "batch"  # "batch" (the paper) or "instance" (nnU-Net's habit)
    scale_bridger: bool = True
    mamba: bool = True
    dimension_independent: bool = True
    dual_direction: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_channels", tuple(int(c) for c in self.stage_channels))
        object.__setattr__(self, "mamba_layers", tuple(int(n) for n in self.mamba_layers))
        problems = []
        if len(self.stage_channels) != 4 or len(self.mamba_layers) != 4:
            problems.append("stage_channels and mamba_layers need exactly 4 entries (four stages)")
        if any(c < 2 or c % 2 for c in self.stage_channels):
            problems.append("stage_channels must be even and >= 2 (the Mamba branch works on C/2)")
        if any(n < 0 for n in self.mamba_layers):
            problems.append("mamba_layers must be >= 0")
        for key in ("stem_channels", "downsample_expand", "d_state", "d_conv", "expand",
                    "dimin_token_size", "bottleneck_expand"):
            if int(getattr(self, key)) < 1:
                problems.append(f"{key} must be >= 1")
        if not 0 < self.uplink_expand <= 4:
            problems.append("uplink_expand must be in (0, 4]")
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS}, got {self.norm!r}")
        if problems:
            raise ValueError(f"invalid MobileViM configuration {self.name!r}: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "MobileViMConfig":
        return config_files.from_dict(cls, data, source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(variant: Union[str, Path, MobileViMConfig] = "s") -> MobileViMConfig:
    """``"s"``, ``"xs"``, a path to a JSON file, or an already built config."""
    return config_files.load(MobileViMConfig, variant, SHIPPED_VARIANTS, "MobileViM")
