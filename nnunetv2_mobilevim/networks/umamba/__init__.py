"""U-Mamba Bot / Enc (Ma, Li, Wang 2024) and their NoMamba twins, built from nnU-Net 2.8 plans."""

from .blocks import MambaLayer, ResidualProjectionBlock, UpsampleConv
from .config import UMambaConfig, load_config
from .network import (
    UMamba,
    UMambaDecoder,
    UMambaEncoder,
    block_counts,
    channel_token_stages,
    count_parameters,
    mamba_stages,
    stage_sizes,
    umamba_from_plan,
)

__all__ = ["MambaLayer", "ResidualProjectionBlock", "UpsampleConv", "UMambaConfig", "load_config", "UMamba",
           "UMambaDecoder", "UMambaEncoder", "block_counts", "channel_token_stages", "count_parameters",
           "mamba_stages", "stage_sizes", "umamba_from_plan"]
