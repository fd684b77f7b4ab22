"""MobileViM assembled: stem, four stages of MobileMamba blocks, decoder, output at the input's size.

    x (B, in, *S), S = (D, H, W) in 3D or (H, W) in 2D
    -> stem: 3^d conv, stride s_0                          (B, C_stem, S/s_0)
    -> stage i: [MBConv downsample, stride s_i] + MobileMambaBlock   (B, C_i, S/(s_0..s_i))
    -> decoder -> logits at stage-1 resolution -> (bi/tri)linear upsample to S

Any 2D or 3D patch works: strides are per axis (an nnU-Net plan's first four pooling steps), and an
input that is not a multiple of the total stride is replicate-padded and the logits cropped back.
One code path serves both dimensions: the blocks take ``conv_op`` / ``norm_op`` types (as in
dynamic_network_architectures), and the Dimin Mamba scans one profile per spatial axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Type, Union

from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .config import MobileViMConfig, load_config
from .conv_blocks import (
    ConvNormAct,
    MBConvDownsample,
    Stride,
    as_stride,
    infer_dim,
    matching_norm,
    pad_to_multiple,
    prod_strides,
)
from .decoder import MobileViMDecoder
from .mobile_mamba_block import MobileMambaBlock
from .upsample import linear_resize

NUM_DOWNSAMPLINGS = 4


class MobileViMEncoder(nn.Module):
    """(B, in, *S) -> [f_0, f_1, f_2, f_3], f_i: (B, C_i, S / prod(strides[:i+1])), S with the axes of ``conv_op``."""

    def __init__(self, input_channels: int, config: MobileViMConfig, strides: Sequence[Stride],
                 conv_op: Type[_ConvNd] = nn.Conv3d) -> None:
        super().__init__()
        cfg = config
        norm_op, norm_op_kwargs = matching_norm(cfg.norm, conv_op)
        ops = dict(conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs)
        self.stem = ConvNormAct(input_channels, cfg.stem_channels, 3, strides[0], **ops)
        self.stages = nn.ModuleList()
        previous = cfg.stem_channels
        for i, (channels, layers) in enumerate(zip(cfg.stage_channels, cfg.mamba_layers)):
            blocks: List[nn.Module] = []
            if i > 0 or channels != previous:
                blocks.append(MBConvDownsample(previous, channels, strides[i] if i > 0 else 1,
                                               cfg.downsample_expand, **ops))
            blocks.append(MobileMambaBlock(channels, layers, cfg.dimin_token_size, cfg.d_state, cfg.d_conv,
                                           cfg.expand, **ops, mamba=cfg.mamba, dual_direction=cfg.dual_direction,
                                           dimension_independent=cfg.dimension_independent))
            self.stages.append(nn.Sequential(*blocks))
            previous = channels

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class MobileViM(nn.Module):
    """MobileViM_s / MobileViM_xs (Dai, Wang, Liu 2025) as an nnU-Net-compatible 2D or 3D segmentation network.

    Args (keyword-only, so an nnU-Net plans file can name this class by dotted path):
        input_channels: image channels (1-4 typical).
        num_classes: output channels (segmentation heads).
        variant: ``"s"``, ``"xs"``, a path to a JSON config, or a :class:`MobileViMConfig`.
        strides: four per-axis strides (stem and three downsamplings); default 2 on every axis. Their
            length sets the dimension: ``[[1, 2, 2], ...]`` builds a 3D network, ``[[2, 2], ...]`` a 2D one.
        deep_supervision: return [full-res logits, then lower-resolution logits] for nnU-Net's loss.
        dim: 2 or 3 spatial axes; only needed when ``strides`` is None or all ints (then the default 3).
        **overrides: any :class:`MobileViMConfig` field, e.g. ``dual_direction=False`` (ablation).

    Forward: (B, input_channels, *S) -> (B, num_classes, *S), S = (D, H, W) or (H, W), or a list of
    logits with deep supervision, highest resolution first, at the per-axis scales in
    ``deep_supervision_scales``. A 2D network has the same state_dict keys as a 3D one (kernels of one
    axis fewer) and, in its Mamba layers, the same shapes: the Dimin token width does not depend on S.
    Speed-ups wrap it from outside (``acceleration.inference.FastInference``, ``acceleration.training``).
    """

    def __init__(self, *, input_channels: int, num_classes: int,
                 variant: Union[str, Path, MobileViMConfig] = "s",
                 strides: Optional[Sequence[Union[int, Sequence[int]]]] = None,
                 deep_supervision: bool = False, dim: Optional[int] = None, **overrides) -> None:
        super().__init__()
        config = load_config(variant)
        if overrides:
            config = MobileViMConfig.from_dict({**config.to_dict(), **overrides}, source=f"{config.name} + overrides")
        if int(input_channels) < 1 or int(num_classes) < 1:
            raise ValueError(f"input_channels and num_classes must be >= 1, got {input_channels}, {num_classes}")
        strides = [2] * NUM_DOWNSAMPLINGS if strides is None else list(strides)
        if len(strides) != NUM_DOWNSAMPLINGS:
            raise ValueError(f"MobileViM downsamples {NUM_DOWNSAMPLINGS} times; strides needs "
                             f"{NUM_DOWNSAMPLINGS} entries, got {len(strides)}: {strides}")
        self.dim = infer_dim(strides, dim)
        self.strides: Tuple[Stride, ...] = tuple(as_stride(s, self.dim) for s in strides)
        if any(s < 1 for st in self.strides for s in st):
            raise ValueError(f"strides must be >= 1, got {self.strides}")
        self.config = config
        self.input_channels, self.num_classes = int(input_channels), int(num_classes)
        conv_op = convert_dim_to_conv_op(self.dim)
        norm_op, norm_op_kwargs = matching_norm(config.norm, conv_op)
        self.encoder = MobileViMEncoder(self.input_channels, config, self.strides, conv_op)
        self.decoder = MobileViMDecoder(config.stage_channels, self.strides[1:], self.num_classes,
                                        config.bottleneck_expand, config.uplink_expand, conv_op, norm_op,
                                        norm_op_kwargs, scale_bridger=config.scale_bridger,
                                        deep_supervision=deep_supervision)

    @property
    def total_stride(self) -> Stride:
        """Per-axis downsampling factor at the deepest stage: inputs are padded to multiples of it."""
        return prod_strides(self.strides)

    @property
    def deep_supervision_scales(self) -> List[List[float]]:
        """Per-axis scale of each deep-supervision output relative to the input, highest first;
        the format of nnU-Net's ``_get_deep_supervision_scales``."""
        return deep_supervision_scales(self.strides)

    def check_input_size(self, spatial: Sequence[int]) -> None:
        """ValueError when a patch is too small for the strides (deepest stage under one voxel)."""
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != self.dim:
            axes = "(D, H, W)" if self.dim == 3 else "(H, W)"
            raise ValueError(f"this MobileViM is a {self.dim}D network: expected {axes}, got a patch of {spatial}")
        need = self.total_stride
        if any(s < n for s, n in zip(spatial, need)):
            raise ValueError(
                f"patch size {list(spatial)} is too small for the strides {[list(s) for s in self.strides]}: "
                f"each axis must be at least the total stride {list(need)} (ideally a multiple of it)")

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != self.dim + 2:
            axes = "D, H, W" if self.dim == 3 else "H, W"
            raise ValueError(f"this {self.dim}D MobileViM expects a (B, C, {axes}) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"this MobileViM was built for {self.input_channels} input channel(s), "
                             f"got {x.shape[1]} (input shape {tuple(x.shape)})")
        self.check_input_size(x.shape[2:])

    def forward(self, x: Tensor):
        self._check_input(x)
        size = x.shape[2:]
        xp = pad_to_multiple(x, self.total_stride)
        out = self.decoder(self.encoder(xp))
        logits, extra = (out if self.decoder.deep_supervision else (out, []))
        logits = linear_resize(logits, xp.shape[2:])
        logits = logits[(..., *[slice(0, n) for n in size])]
        if not self.decoder.deep_supervision:
            return logits
        crops = []
        for t, scale in zip(extra, self.deep_supervision_scales[1:]):
            crops.append(t[(..., *[slice(0, _ceil(n, s)) for n, s in zip(size, scale)])])
        return [logits] + crops


def strides_from_pooling(pool_op_kernel_sizes: Sequence[Sequence[int]]) -> List[List[int]]:
    """An nnU-Net plan's first four pooling strides after the stride-1 first stage, padded with 1s:
    MobileViM's four per-axis downsamplings."""
    pools = [list(map(int, p)) for p in pool_op_kernel_sizes]
    strides = pools[1:NUM_DOWNSAMPLINGS + 1]
    return strides + [[1] * len(pools[0])] * (NUM_DOWNSAMPLINGS - len(strides))


def mobilevim_from_plan(pool_op_kernel_sizes: Sequence[Sequence[int]], patch_size: Sequence[int],
                        num_input_channels: int, num_output_channels: int, deep_supervision: bool,
                        variant: Union[str, Path, MobileViMConfig] = "s") -> MobileViM:
    """MobileViM for an nnU-Net 2.8 configuration (``configuration_manager.pool_op_kernel_sizes`` and
    ``.patch_size``); ValueError where the patch is too small for the plan's strides."""
    network = MobileViM(input_channels=num_input_channels, num_classes=num_output_channels, variant=variant,
                        strides=strides_from_pooling(pool_op_kernel_sizes), deep_supervision=deep_supervision)
    network.check_input_size(patch_size)
    return network


def deep_supervision_scales(strides: Sequence[Union[int, Sequence[int]]], dim: Optional[int] = None
                            ) -> List[List[float]]:
    """Scales of the outputs with deep supervision for the four per-axis ``strides``: the full
    resolution, then the decoder outputs of stages 1-3 (``1/s0``, ``1/(s0*s1)``, ``1/(s0*s1*s2)``).
    One entry per axis: 2 for 2D strides, 3 for 3D ones (``dim`` as in :class:`MobileViM`)."""
    dim = infer_dim(strides, dim)
    strides = [as_stride(s, dim) for s in strides]
    return [[1.0] * dim] + [[1.0 / s for s in prod_strides(strides[:i + 1])] for i in range(NUM_DOWNSAMPLINGS - 1)]


def _ceil(size: int, scale: float) -> int:
    return -(-size // round(1 / scale))


def count_parameters(module: nn.Module, deep_supervision_heads: bool = True) -> int:
    """Parameters of a MobileViM, optionally without the deep-supervision heads."""
    total = sum(p.numel() for p in module.parameters())
    if not deep_supervision_heads and isinstance(module, MobileViM):
        total -= sum(p.numel() for p in module.decoder.ds_heads.parameters())
    return total

