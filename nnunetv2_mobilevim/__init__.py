"""MobileViM_s and MobileViM_xs (Dai, Wang, Liu 2025) as a plugin for stock nnU-Net v2."""

from .config import MobileViMConfig, load_config
from .layers import DiminMamba, DualDirectionMamba, MobileMambaBlock, ScaleBridger
from .network import MobileViM, count_parameters

__version__ = "0.1.0"

__all__ = ["MobileViM", "MobileViMConfig", "load_config", "DualDirectionMamba", "DiminMamba",
           "MobileMambaBlock", "ScaleBridger", "count_parameters", "__version__"]
