"""U-Mamba Bot and Enc (Ma, Li, Wang 2024) built from an nnU-Net 2.8 plan, 2D or 3D, with NoMamba twins.

    x (B, in, *P)                                          P: the plan's patch
    -> stem: residual blocks at full resolution            (B, F_0, *P)
    -> stage s: residual blocks, first one strided by r_s  (B, F_s, *P / (r_0 ... r_s))
       -> Mamba layer (LayerNorm -> Mamba), or identity    same shape
    -> decoder stage j (from the bottleneck up): nearest upsample + 1x1 conv, concatenate the skip,
       residual blocks; a 1x1 segmentation head per stage
    -> [logits at P, P / r_1, ...] with deep supervision, else the logits at P

Bot puts the only Mamba layer after the bottleneck stage; Enc puts one after every encoder stage (3D),
or after every other stage ending at the bottleneck (2D), as the released code does. The NoMamba twin
(``mamba=False``) is the same network with those layers replaced by ``nn.Identity``: every other
parameter keeps its name and shape.
"""

from __future__ import annotations

import math
import pydoc
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .blocks import MambaLayer, ResidualProjectionBlock, UpsampleConv
from .config import UMambaConfig, load_config

#: arch_kwargs keys of nnU-Net 2.8 plans (PlainConvUNet and ResidualEncoderUNet) that this builder reads
PLAN_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
             "n_blocks_per_stage", "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs",
             "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs")


def stage_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> List[Tuple[int, ...]]:
    """The spatial size of each encoder stage's output: patch / (r_0 * ... * r_s), per axis."""
    sizes, size = [], tuple(int(p) for p in patch_size)
    for stride in strides:
        size = tuple(i // r for i, r in zip(size, stride))
        sizes.append(size)
    return sizes


def channel_token_stages(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                         features_per_stage: Sequence[int]) -> List[bool]:
    """Per stage: True where the stage has no more pixels/voxels than channels, so U-Mamba Enc scans its
    channels as tokens. Decided from the plan's patch and strides, so it follows the plan."""
    return [math.prod(size) <= f for size, f in zip(stage_sizes(patch_size, strides), features_per_stage)]


def mamba_stages(n_stages: int, rule: str) -> List[bool]:
    """Per encoder stage: whether a Mamba layer follows it (``rule`` as ``UMambaConfig.mamba_stages_*``)."""
    if rule == "bottleneck":
        return [s == n_stages - 1 for s in range(n_stages)]
    if rule == "all":
        return [True] * n_stages
    if rule == "alternate":  # every other stage counted back from the bottleneck
        return [(n_stages - 1 - s) % 2 == 0 for s in range(n_stages)]
    raise ValueError(f"unknown Mamba stage rule {rule!r}")


def block_counts(n_stages: int, encoder: Sequence[int], decoder: Sequence[int],
                 rule: str) -> Tuple[List[int], List[int]]:
    """Residual blocks per encoder stage (n entries) and per decoder stage (n - 1, bottleneck side first).

    ``"released"``: U-Mamba's code keeps the plan's counts but sets one block in the encoder stages from
    ceil(n / 2) on and in the decoder entries from ceil(n / 2) on (which, in nnU-Net's bottleneck-first
    decoder order, are the highest-resolution decoder stages). ``"plan"``: the plan's counts unchanged.
    The plan's lists are copied, never changed."""
    encoder, decoder = [int(b) for b in encoder], [int(b) for b in decoder]
    if rule == "released":
        middle = math.ceil(n_stages / 2)
        encoder = [1 if s >= middle else b for s, b in enumerate(encoder)]
        decoder = [1 if j >= middle else b for j, b in enumerate(decoder)]
    elif rule != "plan":
        raise ValueError(f"unknown block count rule {rule!r}")
    return encoder, decoder


def _residual_stack(conv_op: Type[_ConvNd], input_channels: int, output_channels: int, kernel_size: Sequence[int],
                    stride: Sequence[int], n_blocks: int, conv_bias: bool, norm_op: Type[nn.Module],
                    norm_op_kwargs: dict, nonlin: Type[nn.Module], nonlin_kwargs: dict) -> nn.Sequential:
    """One projection block (carries the stride and the width change) then n_blocks - 1 of nnU-Net's
    BasicBlockD. (B, C_in, *S) -> (B, C_out, *S / stride)."""
    blocks: List[nn.Module] = [ResidualProjectionBlock(conv_op, input_channels, output_channels, kernel_size, stride,
                                                       conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)]
    blocks += [BasicBlockD(conv_op, output_channels, output_channels, kernel_size, 1, conv_bias, norm_op,
                           norm_op_kwargs, None, None, nonlin, nonlin_kwargs) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


def _stack_feature_map_size(stack: nn.Sequential, input_size: Sequence[int]) -> Tuple[np.int64, List[int]]:
    total, size = np.int64(0), list(input_size)
    for block in stack:
        total += block.compute_conv_feature_map_size(size)
        size = [i // s for i, s in zip(size, block.stride)]
    return total, size


class UMambaEncoder(nn.Module):
    """(B, in, *P) -> [f_0, ..., f_{n-1}], f_s: (B, F_s, *P / (r_0 ... r_s)), each after its Mamba layer.

    ``mamba_layers[s]`` follows stage s: a :class:`MambaLayer` or ``nn.Identity``. Exposes what nnU-Net's
    encoders expose to a decoder (output_channels, strides, conv_op, norm/nonlin ops, kernel_sizes).
    """

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], conv_op: Type[_ConvNd],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], conv_bias: bool, norm_op: Type[nn.Module], norm_op_kwargs: dict,
                 nonlin: Type[nn.Module], nonlin_kwargs: dict, mamba_layers: Sequence[nn.Module]) -> None:
        super().__init__()
        ops = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin,
                   nonlin_kwargs=nonlin_kwargs)
        # U-Mamba's stem: a full residual stack at full resolution before stage 0 (which repeats it)
        self.stem = _residual_stack(conv_op, input_channels, features_per_stage[0], kernel_sizes[0],
                                    [1] * len(strides[0]), n_blocks_per_stage[0], **ops)
        stages, previous = [], features_per_stage[0]
        for s, features in enumerate(features_per_stage):
            stages.append(_residual_stack(conv_op, previous, features, kernel_sizes[s], strides[s],
                                          n_blocks_per_stage[s], **ops))
            previous = features
        self.stages = nn.ModuleList(stages)
        self.mamba_layers = nn.ModuleList(mamba_layers)
        self.output_channels = list(features_per_stage)
        self.strides = [list(s) for s in strides]
        self.kernel_sizes = [list(k) for k in kernel_sizes]
        self.conv_op, self.conv_bias = conv_op, conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, norm_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.stem(x)
        skips = []
        for stage, mamba_layer in zip(self.stages, self.mamba_layers):
            x = mamba_layer(stage(x))
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        total, size = _stack_feature_map_size(self.stem, input_size)
        for stage in self.stages:
            part, size = _stack_feature_map_size(stage, size)
            total += part
        return total


class UMambaDecoder(nn.Module):
    """[f_0, ..., f_{n-1}] -> logits. Stage j (j = 0 next to the bottleneck) upsamples to the size of
    f_{n-2-j}, concatenates it (except, with ``full_resolution_skip=False``, at the last stage) and runs
    residual blocks. ``deep_supervision`` (nnU-Net sets it): a list of n - 1 logits, highest resolution
    first, else the full-resolution logits (B, num_classes, *P).
    """

    def __init__(self, encoder: UMambaEncoder, num_classes: int, n_blocks_per_stage: Sequence[int],
                 deep_supervision: bool, full_resolution_skip: bool = True) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.encoder = encoder  # as nnU-Net's decoders hold it (feature map sizes; checkpoint keys)
        self.num_classes = num_classes
        self.full_resolution_skip = full_resolution_skip
        n_stages = len(encoder.output_channels)
        if len(n_blocks_per_stage) != n_stages - 1:
            raise ValueError(f"the decoder needs {n_stages - 1} block counts, got {list(n_blocks_per_stage)}")
        ops = dict(conv_bias=encoder.conv_bias, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
                   nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs)
        upsample_layers, stages, seg_layers = [], [], []
        for j in range(n_stages - 1):
            below, skip = encoder.output_channels[-(j + 1)], encoder.output_channels[-(j + 2)]
            upsample_layers.append(UpsampleConv(encoder.conv_op, below, skip, encoder.strides[-(j + 1)],
                                                encoder.conv_bias))
            joined = 2 * skip if self._concatenates(j, n_stages) else skip
            stages.append(_residual_stack(encoder.conv_op, joined, skip, encoder.kernel_sizes[-(j + 2)],
                                          [1] * len(encoder.strides[0]), n_blocks_per_stage[j], **ops))
            seg_layers.append(encoder.conv_op(skip, num_classes, 1, 1, 0, bias=True))
        self.upsample_layers = nn.ModuleList(upsample_layers)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def _concatenates(self, j: int, n_stages: int) -> bool:
        return self.full_resolution_skip or j < n_stages - 2

    def forward(self, skips: Sequence[Tensor]) -> Union[Tensor, List[Tensor]]:
        n_stages = len(skips)
        x = skips[-1]
        outputs = []
        for j, (upsample, stage) in enumerate(zip(self.upsample_layers, self.stages)):
            x = upsample(x)
            if self._concatenates(j, n_stages):
                x = _concatenate(x, skips[-(j + 2)])
            x = stage(x)
            if self.deep_supervision:
                outputs.append(self.seg_layers[j](x))
            elif j == len(self.stages) - 1:
                return self.seg_layers[j](x)
        return outputs[::-1]  # highest resolution first, as nnU-Net's loss expects

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        sizes, size = [], list(input_size)  # sizes[s]: encoder stage s, the skip decoder stage n-2-s meets
        for stride in self.encoder.strides[:-1]:
            size = [i // s for i, s in zip(size, stride)]
            sizes.append(size)
        total = np.int64(0)
        for j, stage in enumerate(self.stages):
            size = sizes[-(j + 1)]
            part, _ = _stack_feature_map_size(stage, size)
            total += part + np.prod([self.encoder.output_channels[-(j + 2)], *size], dtype=np.int64)
            if self.deep_supervision or j == len(self.stages) - 1:
                total += np.prod([self.num_classes, *size], dtype=np.int64)
        return total


def _concatenate(upsampled: Tensor, skip: Tensor) -> Tensor:
    """[upsampled, skip] along channels. A skip that leaves a Mamba layer is float32 while the upsampled
    features are half precision under autocast: both meet in the wider type."""
    if upsampled.dtype != skip.dtype:
        dtype = upsampled.dtype if upsampled.element_size() > skip.element_size() else skip.dtype
        upsampled, skip = upsampled.to(dtype), skip.to(dtype)
    return torch.cat((upsampled, skip), 1)


class UMamba(nn.Module):
    """U-Mamba Bot / Enc (or its NoMamba twin) for one nnU-Net plan, 2D or 3D.

    Args: the plan's architecture (as resolved by :func:`umamba_from_plan`), ``patch_size`` (the plan's;
    fixes the channels-as-tokens stages), ``config`` (a :class:`UMambaConfig`). Weights are initialised
    as the released code does (nnU-Net's He init on the convolutions; Mamba keeps its own init).

    Forward: (B, input_channels, *patch) -> (B, num_classes, *patch), or with ``decoder.deep_supervision``
    a list of n_stages - 1 logits, highest resolution first.
    """

    def __init__(self, *, input_channels: int, num_classes: int, features_per_stage: Sequence[int],
                 conv_op: Type[_ConvNd], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int], conv_bias: bool,
                 norm_op: Type[nn.Module], norm_op_kwargs: Optional[dict], nonlin: Type[nn.Module],
                 nonlin_kwargs: Optional[dict], patch_size: Sequence[int], config: UMambaConfig,
                 deep_supervision: bool = False) -> None:
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        n_stages = len(features_per_stage)
        kernel_sizes = [maybe_convert_scalar_to_list(conv_op, k) for k in kernel_sizes]
        strides = [maybe_convert_scalar_to_list(conv_op, s) for s in strides]
        for name, value in (("kernel_sizes", kernel_sizes), ("strides", strides), ("n_blocks_per_stage",
                                                                                   n_blocks_per_stage)):
            if len(value) != n_stages:
                raise ValueError(f"{name} needs {n_stages} entries (one per stage), got {value}")
        if len(patch_size) != dim:
            raise ValueError(f"patch_size {tuple(patch_size)} does not fit a {dim}D plan")
        total = [math.prod(s[a] for s in strides) for a in range(dim)]
        if any(p % t for p, t in zip(patch_size, total)):
            raise ValueError(f"patch_size {tuple(patch_size)} is not divisible by the plan's total stride {total}")
        self.config = config
        self.patch_size = tuple(int(p) for p in patch_size)
        encoder_blocks, decoder_blocks = block_counts(n_stages, n_blocks_per_stage, n_conv_per_stage_decoder,
                                                      config.block_counts)
        sizes = stage_sizes(patch_size, strides)
        channel_tokens = (channel_token_stages(patch_size, strides, features_per_stage) if config.channel_tokens
                          else [False] * n_stages)
        self.mamba_stages = mamba_stages(n_stages, config.mamba_stages(dim)) if config.mamba else [False] * n_stages
        self.channel_tokens = [c and m for c, m in zip(channel_tokens, self.mamba_stages)]
        mamba_layers = [MambaLayer(f, size, tokens, config.d_state, config.d_conv, config.expand) if on
                        else nn.Identity()
                        for f, size, tokens, on in zip(features_per_stage, sizes, self.channel_tokens,
                                                       self.mamba_stages)]
        self.encoder = UMambaEncoder(input_channels, features_per_stage, conv_op, kernel_sizes, strides, encoder_blocks,
                                     conv_bias, norm_op, norm_op_kwargs or {}, nonlin, nonlin_kwargs or {},
                                     mamba_layers)
        full_resolution_skip = dim != 2 or config.full_resolution_skip_2d
        self.decoder = UMambaDecoder(self.encoder, num_classes, decoder_blocks, deep_supervision, full_resolution_skip)
        self.apply(InitWeights_He(1e-2))

    def forward(self, x: Tensor) -> Union[Tensor, List[Tensor]]:
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Conv output elements for one sample (nnU-Net's memory estimate); the Mamba layers' are not counted."""
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)


def _locate(arch_kwargs: dict, key: str):
    value = arch_kwargs.get(key)
    if value is None or not isinstance(value, str):
        return value
    located = pydoc.locate(value)
    if located is None:
        raise ValueError(f"arch_kwargs[{key!r}] = {value!r} names nothing importable")
    return located


def umamba_from_plan(arch_kwargs: dict, patch_size: Sequence[int], num_input_channels: int,
                     num_output_channels: int, deep_supervision: bool,
                     variant: Union[str, Path, UMambaConfig] = "bot", mamba: bool = True) -> UMamba:
    """U-Mamba for an nnU-Net 2.8 configuration.

    ``arch_kwargs``: ``configuration_manager.network_arch_init_kwargs`` (PlainConvUNet or ResidualEncoderUNet
    plans; op names as dotted strings or already imported). ``patch_size``: ``configuration_manager.patch_size``.
    ``variant``: ``"bot"``, ``"enc"``, a JSON path or a :class:`UMambaConfig`. ``mamba=False`` builds the
    NoMamba twin (so does ``"mamba": false`` in the config). Block counts are the plan's
    ``n_conv_per_stage`` (default plans) or ``n_blocks_per_stage`` (ResEnc plans), read as residual blocks.
    """
    unknown = sorted(set(arch_kwargs) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"arch_kwargs has keys U-Mamba does not know: {unknown}; known: {list(PLAN_KEYS)}")
    missing = [k for k in ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                           "n_conv_per_stage_decoder", "norm_op", "nonlin") if k not in arch_kwargs]
    if missing:
        raise ValueError(f"arch_kwargs lacks {missing}")
    per_stage = [k for k in ("n_conv_per_stage", "n_blocks_per_stage") if k in arch_kwargs]
    if len(per_stage) != 1:
        raise ValueError("arch_kwargs needs exactly one of n_conv_per_stage (default plans) and "
                         f"n_blocks_per_stage (ResEnc plans), got {per_stage}")
    if arch_kwargs.get("dropout_op") is not None:
        raise ValueError("U-Mamba has no dropout; the plan sets dropout_op = "
                         f"{arch_kwargs['dropout_op']!r}")
    config = load_config(variant)
    if not mamba and config.mamba:
        config = UMambaConfig.from_dict({**config.to_dict(), "mamba": False, "name": config.name + "NoMamba"},
                                        source=f"{config.name} + mamba=False")
    n_stages = int(arch_kwargs["n_stages"])
    if n_stages < 2:  # one stage has no decoder: the network would return its deep-supervision list only
        raise ValueError(f"U-Mamba needs a plan with n_stages >= 2, got {n_stages} (the patch is too small to "
                         "downsample; plan a larger patch)")

    def per_stage_list(key: str, count: int) -> List:
        value = arch_kwargs[key]
        return [value] * count if isinstance(value, (int, float)) else list(value)

    features = [int(f) for f in per_stage_list("features_per_stage", n_stages)]
    if len(features) != n_stages:
        raise ValueError(f"features_per_stage needs {n_stages} entries, got {features}")
    return UMamba(input_channels=num_input_channels, num_classes=num_output_channels, features_per_stage=features,
                  conv_op=_locate(arch_kwargs, "conv_op"), kernel_sizes=per_stage_list("kernel_sizes", n_stages),
                  strides=per_stage_list("strides", n_stages),
                  n_blocks_per_stage=per_stage_list(per_stage[0], n_stages),
                  n_conv_per_stage_decoder=per_stage_list("n_conv_per_stage_decoder", n_stages - 1),
                  conv_bias=bool(arch_kwargs.get("conv_bias", False)), norm_op=_locate(arch_kwargs, "norm_op"),
                  norm_op_kwargs=arch_kwargs.get("norm_op_kwargs"), nonlin=_locate(arch_kwargs, "nonlin"),
                  nonlin_kwargs=arch_kwargs.get("nonlin_kwargs"), patch_size=patch_size, config=config,
                  deep_supervision=deep_supervision)


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (the decoder's reference to the encoder is not counted twice)."""
    return sum(p.numel() for p in module.parameters())
