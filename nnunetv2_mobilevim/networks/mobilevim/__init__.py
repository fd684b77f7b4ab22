"""MobileViM_s / MobileViM_xs (Dai, Wang, Liu 2025): configuration, building blocks, the network."""

from .config import MobileViMConfig, load_config
from .conv_blocks import Bottleneck, ConvNormAct, ConvPair, MBConvDownsample, UpLink
from .decoder import MobileViMDecoder
from .mobile_mamba_block import DiminMamba, MobileMambaBlock
from .network import MobileViM, count_parameters, deep_supervision_scales, mobilevim_from_plan, strides_from_pooling
from .scale_bridger import ScaleBridger

__all__ = ["MobileViMConfig", "load_config", "Bottleneck", "ConvNormAct", "ConvPair", "MBConvDownsample", "UpLink",
           "MobileViMDecoder", "DiminMamba", "MobileMambaBlock", "MobileViM", "count_parameters",
           "deep_supervision_scales", "mobilevim_from_plan", "strides_from_pooling", "ScaleBridger"]
