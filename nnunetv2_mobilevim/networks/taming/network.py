"""The Taming Mambas networks (Lumetti et al., Sec. 3.2, Fig. 2) on nnU-Net 2.8 plans.

The U-Net is nnU-Net's own residual U-Net, reused by import: ``ResidualEncoder`` (stem, then
``StackedResidualBlocks`` per stage, strided first convolution) and ``UNetResDecoder`` (transposed
convolution, concatenated skip, residual blocks, a 1x1 segmentation head per stage). That is the
released code's base (its encoder and decoder are copies of these two). Mamba Layers go either

    placement "encoder": after every encoder stage, the bottleneck included; the next stage and the
                         skip both read the layer's output (SegMamba, BiSegMamba, MultiSegMamba)
    placement "skips":   on every skip connection before the decoder concatenates it; the encoder
                         path and the bottleneck stay convolutional (SegMambaSkip)

Only the encoder's forward is re-run here (stage by stage, to put layers between the stages); its
modules are nnU-Net's.
"""

from __future__ import annotations

import math
import pydoc
from pathlib import Path
from typing import List, Optional, Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_residual_decoder import UNetResDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import Tensor, nn

from .blocks import TamingMambaLayer
from .config import TamingConfig, load_taming_config

# nnU-Net 2.8 writes these plan entries as dotted names (its _kw_requires_import)
_DOTTED_KEYS = ("conv_op", "norm_op", "dropout_op", "nonlin")


class TamingMambaUNet(nn.Module):
    """A Taming Mambas network: (B, input_channels, *patch) -> logits (B, num_classes, *patch), or with
    deep supervision the list of logits of every decoder stage, highest resolution first.

    The convolutional arguments are ``ResidualUNet``'s (nnU-Net's plan entries, op types resolved);
    ``n_blocks_per_stage`` residual blocks per encoder stage and ``n_conv_per_stage_decoder`` residual
    blocks per decoder stage. ``config`` fixes the Mamba Layers.
    """

    def __init__(self, *, input_channels: int, num_classes: int, n_stages: int, features_per_stage: Sequence[int],
                 conv_op: Type[nn.Module], kernel_sizes: Sequence, strides: Sequence,
                 n_blocks_per_stage: Union[int, Sequence[int]], n_conv_per_stage_decoder: Union[int, Sequence[int]],
                 conv_bias: bool = False, norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: dict = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: dict = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: dict = None,
                 deep_supervision: bool = False, config: Union[str, Path, TamingConfig] = "segmamba") -> None:
        super().__init__()
        self.config = load_taming_config(config)
        features = [int(f) for f in features_per_stage]
        if len(features) != n_stages or n_stages < 2:
            raise ValueError(f"need n_stages >= 2 and one feature count per stage, got {n_stages} and {features}")
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
        self.encoder = ResidualEncoder(
            input_channels, n_stages, features, conv_op, kernel_sizes, strides, n_blocks_per_stage, conv_bias,
            norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True)
        self.decoder = UNetResDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)
        self.spatial_dims = convert_conv_op_to_dim(conv_op)
        orders = self.config.scan_orders(self.spatial_dims)
        # "encoder": one layer per stage; "skips": one per skip connection (all stages but the bottleneck)
        places = features if self.config.placement == "encoder" else features[:-1]
        self.mamba_layers = nn.ModuleList(
            TamingMambaLayer(c, orders, self.config.bidirectional, self.config.d_state(c), self.config.d_conv,
                             self.config.expand, mamba=self.config.mamba)
            for c in places)
        self.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation of the convolutions
        self.apply(init_last_bn_before_add_to_0)
        if self.config.rescale_residual_init:
            self._rescale_residual_projections()

    @property
    def n_residual_layers(self) -> int:
        """N of the paper's 1/sqrt(N) initialisation: every residual sub-layer of every Mamba Layer."""
        return sum(layer.n_residual_layers for layer in self.mamba_layers)

    @torch.no_grad()
    def _rescale_residual_projections(self) -> None:
        # Sec. 3.3 (GPT-2, mamba_ssm's rescale_prenorm_residual): the projections that write into a
        # residual stream start at their default initialisation divided by sqrt(N)
        scale = 1.0 / math.sqrt(self.n_residual_layers)
        for layer in self.mamba_layers:
            for projection in layer.residual_projections():
                projection.weight.mul_(scale)

    def forward(self, x: Tensor) -> Union[Tensor, List[Tensor]]:
        encoder = self.encoder
        if encoder.stem is not None:
            x = encoder.stem(x)
        skips = []
        for s, stage in enumerate(encoder.stages):
            x = stage(x)
            if self.config.placement == "encoder":
                x = self.mamba_layers[s](x)
                skips.append(x)
            else:
                skips.append(self.mamba_layers[s](x) if s < len(self.mamba_layers) else x)
        return self.decoder(skips)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """nnU-Net's memory estimate of the convolutional part (the planner's measure; Mamba excluded)."""
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    def deep_supervision_scales(self) -> List[List[float]]:
        """The scale of every deep-supervision output against the patch, highest resolution first, as
        nnU-Net derives it from the plan's strides."""
        cumulative = np.cumprod(np.vstack(self.encoder.strides), axis=0)
        return [list(map(float, 1 / c)) for c in cumulative[:-1]]


def _resolve(value):
    if isinstance(value, str):
        located = pydoc.locate(value)
        if located is None:
            raise ValueError(f"cannot import {value!r} named in the plan")
        return located
    return value


def taming_from_plan(arch_kwargs: dict, patch_size: Sequence[int], num_input_channels: int,
                     num_output_channels: int, deep_supervision: bool, variant: Union[str, Path, TamingConfig],
                     mamba: bool = True) -> TamingMambaUNet:
    """A Taming Mambas network from nnU-Net 2.8's ``configuration_manager.network_arch_init_kwargs``.

    ``variant``: "segmamba" | "bisegmamba" | "multisegmamba" | "segmambaskip" (or a config path /
    object); ``mamba=False`` builds its NoMamba twin. Default plans give ``n_conv_per_stage`` and ResEnc
    plans ``n_blocks_per_stage``: either is the number of residual blocks per encoder stage (the released
    code reads the convolutions per stage as blocks per stage). ``patch_size`` is checked against the
    plan's strides (every decoder stage must meet its skip at the same size).
    """
    config = load_taming_config(variant)
    if not mamba:
        config = TamingConfig.from_dict({**config.to_dict(), "mamba": False}, source=config.name)
    kwargs = {k: _resolve(v) if k in _DOTTED_KEYS else v for k, v in arch_kwargs.items()}
    blocks = kwargs.get("n_blocks_per_stage", kwargs.get("n_conv_per_stage"))
    if blocks is None:
        raise ValueError("the plan names neither n_blocks_per_stage nor n_conv_per_stage")
    strides = kwargs["strides"]
    spatial_dims = convert_conv_op_to_dim(kwargs["conv_op"])
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch {tuple(patch_size)} does not fit the plan's {spatial_dims}D convolutions")
    total = np.prod(np.vstack([np.broadcast_to(np.asarray(s), (spatial_dims,)) for s in strides]), axis=0)
    if any(p % t for p, t in zip(patch_size, total)):
        raise ValueError(f"patch {tuple(patch_size)} is not divisible by the plan's total stride {tuple(total)}")
    return TamingMambaUNet(
        input_channels=num_input_channels, num_classes=num_output_channels, n_stages=kwargs["n_stages"],
        features_per_stage=kwargs["features_per_stage"], conv_op=kwargs["conv_op"],
        kernel_sizes=kwargs["kernel_sizes"], strides=strides, n_blocks_per_stage=blocks,
        n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"], conv_bias=kwargs.get("conv_bias", False),
        norm_op=kwargs.get("norm_op"), norm_op_kwargs=kwargs.get("norm_op_kwargs"),
        dropout_op=kwargs.get("dropout_op"), dropout_op_kwargs=kwargs.get("dropout_op_kwargs"),
        nonlin=kwargs.get("nonlin"), nonlin_kwargs=kwargs.get("nonlin_kwargs"),
        deep_supervision=deep_supervision, config=config)


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (the decoder holds the encoder a second time)."""
    return sum(p.numel() for p in module.parameters())
