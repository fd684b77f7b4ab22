"""Network configuration as data: ``network_configs/taming_*.json`` loaded into :class:`TamingConfig`.

One file per Taming Mambas variant (Lumetti et al.): where the Mamba Layers go, their scan orders, whether
each order is also read backwards, and the d_state rule. Unknown keys, missing keys and out-of-range
values are refused with a message that names the file and the key.

Scan orders are permutations of the spatial axes of nnU-Net's tensor, outermost first, the last one
fastest (``flatten_tokens``'s convention). The paper writes them with the letters of its (H, W, D) volume;
as in the released code, H, W, D are the first, second and third spatial axis, so the paper's
(H, W, D), (H, D, W), (W, H, D), (D, W, H) are [0, 1, 2], [0, 2, 1], [1, 0, 2], [2, 1, 0].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple, Union

from .. import config_files

#: Variants shipped with the package, by the name ``taming_from_plan`` takes.
SHIPPED_VARIANTS = {
    "segmamba": "taming_segmamba.json",
    "bisegmamba": "taming_bisegmamba.json",
    "multisegmamba": "taming_multisegmamba.json",
    "segmambaskip": "taming_segmambaskip.json",
}

#: "encoder": a Mamba Layer on every encoder stage's output, the bottleneck included, so the next stage
#: and the skip both see it (SegMamba, BiSegMamba, MultiSegMamba). "skips": one on every skip
#: connection before it is concatenated in the decoder, none on the encoder path or the bottleneck
#: (SegMambaSkip, Fig. 2).
PLACEMENTS = ("encoder", "skips")

ScanOrders = Tuple[Tuple[int, ...], ...]


@dataclass(frozen=True)
class TamingConfig:
    """Everything that fixes the Mamba part of a Taming Mambas network; the convolutional U-Net around
    it comes from the nnU-Net plan."""

    name: str
    placement: str  # one of PLACEMENTS
    bidirectional: bool  # each order also read backwards by its own Mamba Layer (Fig. 1b)
    scan_orders_3d: ScanOrders  # axis permutations for 3D plans, one Mamba Layer (pair) each
    scan_orders_2d: ScanOrders  # the same for 2D plans
    d_state_max: int  # d_state = min(C, d_state_max), C the layer's channels (Sec. 3.3: 256)
    d_conv: int
    expand: int
    rescale_residual_init: bool  # residual projections scaled by 1/sqrt(N) at initialisation (Sec. 3.3)
    mamba: bool = True  # False: the NoMamba twin, every Mamba sub-layer removed

    def __post_init__(self) -> None:
        for key in ("scan_orders_3d", "scan_orders_2d"):
            try:
                orders = tuple(tuple(int(a) for a in order) for order in getattr(self, key))
            except TypeError:
                raise ValueError(f"invalid Taming configuration {self.name!r}: {key} must be a list of "
                                 f"axis lists") from None
            object.__setattr__(self, key, orders)
        problems = []
        if self.placement not in PLACEMENTS:
            problems.append(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for key, ndim in (("scan_orders_3d", 3), ("scan_orders_2d", 2)):
            orders = getattr(self, key)
            if not orders:
                problems.append(f"{key} needs at least one order")
            if any(sorted(order) != list(range(ndim)) for order in orders):
                problems.append(f"{key} entries must be permutations of {list(range(ndim))}, got {list(orders)}")
            if len(set(orders)) != len(orders):
                problems.append(f"{key} repeats an order")
        for key in ("d_state_max", "d_conv", "expand"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                problems.append(f"{key} must be an integer >= 1")
        for key in ("bidirectional", "rescale_residual_init", "mamba"):
            if not isinstance(getattr(self, key), bool):
                problems.append(f"{key} must be true or false")
        if problems:
            raise ValueError(f"invalid Taming configuration {self.name!r}: " + "; ".join(problems))

    def scan_orders(self, spatial_dims: int) -> ScanOrders:
        if spatial_dims not in (2, 3):
            raise ValueError(f"Taming networks are 2D or 3D, got {spatial_dims} spatial axes")
        return self.scan_orders_3d if spatial_dims == 3 else self.scan_orders_2d

    def d_state(self, channels: int) -> int:
        return min(channels, self.d_state_max)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "TamingConfig":
        return config_files.from_dict(cls, data, source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_taming_config(variant: Union[str, Path, TamingConfig] = "segmamba") -> TamingConfig:
    """A shipped variant name (``SHIPPED_VARIANTS``), a path to a JSON file, or an already built config."""
    return config_files.load(TamingConfig, variant, SHIPPED_VARIANTS, "Taming Mambas")
