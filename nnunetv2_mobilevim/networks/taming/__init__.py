"""Taming Mambas (Lumetti et al.): SegMamba-dagger (here TamingSegMamba, not Xing's SegMamba),
BiSegMamba, MultiSegMamba and SegMambaSkip, each with a NoMamba twin, built from nnU-Net 2.8 plans."""

from .blocks import TamingMambaLayer
from .config import SHIPPED_VARIANTS, TamingConfig, load_taming_config
from .network import TamingMambaUNet, count_parameters, taming_from_plan

__all__ = ["TamingMambaLayer", "SHIPPED_VARIANTS", "TamingConfig", "load_taming_config", "TamingMambaUNet",
           "count_parameters", "taming_from_plan"]
