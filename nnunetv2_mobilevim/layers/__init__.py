"""Building blocks of MobileViM, one job per module."""

from .conv_blocks import Bottleneck, ConvNormAct, ConvPair, MBConvDownsample, UpLink
from .decoder import MobileViMDecoder
from .dual_direction_mamba import DualDirectionMamba
from .mobile_mamba_block import DiminMamba, MobileMambaBlock
from .scale_bridger import ScaleBridger

__all__ = ["Bottleneck", "ConvNormAct", "ConvPair", "MBConvDownsample", "UpLink", "MobileViMDecoder",
           "DualDirectionMamba", "DiminMamba", "MobileMambaBlock", "ScaleBridger"]
