"""Parameters, MACs and output shapes of a MobileViM, for the ``summary`` command and the benchmark.

MACs are counted with PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (convolutions,
transposed convolutions, linear layers, matmul/einsum; FLOPs / 2 = MACs). The selective scan is
element-wise arithmetic that FlopCounterMode does not see, so each DualDirectionMamba adds its scan
MACs by the paper's Eq. (7) (4 * L * 2E * M per direction) through a forward hook. Both parts are
reported. Normalisation, activations and interpolation are not counted (as in the paper).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from ..networks.mobilevim.network import MobileViM, count_parameters
from ..ssm.dual_direction_mamba import DualDirectionMamba


def count_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """MACs of one forward of ``model`` on ``x``: {"macs", "macs_counter", "macs_scan"} (totals for x's batch)."""
    scan_macs = [0]

    def hook(module: DualDirectionMamba, inputs, _output) -> None:
        batch, length = inputs[0].shape[:2]
        scan_macs[0] += module.scan_macs(batch, length)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DualDirectionMamba)]
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    counted = counter.get_total_flops() // 2
    return {"macs": counted + scan_macs[0], "macs_counter": counted, "macs_scan": scan_macs[0]}


class _TensorBytes(TorchDispatchMode):
    """Sums the bytes every non-view ATen op reads (tensor arguments) and writes (tensor results)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            self.total += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor))
        return out


def count_bytes(model: nn.Module, x: torch.Tensor, dtype=None) -> int:
    """Memory traffic of one eager forward if every op read its inputs and wrote its output once
    (no caching, no fusion): what a roofline of the unfused network charges. ``dtype``: autocast dtype."""
    mode = _TensorBytes()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        with mode:
            model(x)
    return mode.total


def summarize(variant: str, in_channels: int, classes: int, patch: Sequence[int],
              strides=None, deep_supervision: bool = True) -> dict:
    """Build the network on the CPU and describe it for one sample of ``patch``."""
    model = MobileViM(input_channels=in_channels, num_classes=classes, variant=variant, strides=strides,
                      deep_supervision=deep_supervision).eval()
    model.check_input_size(patch)
    x = torch.zeros(1, in_channels, *patch)
    with torch.no_grad():
        out = model(x)
    outputs: List[torch.Tensor] = out if isinstance(out, (list, tuple)) else [out]
    model.decoder.deep_supervision = False  # MACs of inference (what a user deploys)
    macs = count_macs(model, x)
    return {
        "network": model.config.name,
        "variant": variant,
        "in_channels": in_channels,
        "classes": classes,
        "patch": list(patch),
        "strides": [list(s) for s in model.strides],
        "params": count_parameters(model),
        "params_inference": count_parameters(model, deep_supervision_heads=False),
        "macs": macs["macs"],
        "macs_counter": macs["macs_counter"],
        "macs_scan": macs["macs_scan"],
        "mac_counter": "torch.utils.flop_counter.FlopCounterMode + selective scan by Eq. (7)",
        "output_shapes": [list(o.shape) for o in outputs],
        "deep_supervision_scales": model.deep_supervision_scales if deep_supervision else [[1.0, 1.0, 1.0]],
    }


def format_summary(info: dict) -> str:
    lines = [
        f"{info['network']}  (variant {info['variant']!r}, {info['in_channels']} input channel(s), "
        f"{info['classes']} classes, patch {'x'.join(map(str, info['patch']))}, strides {info['strides']})",
        f"  parameters              {info['params']:>14,}",
        f"  without deep-sup. heads {info['params_inference']:>14,}  ({info['params_inference'] / 1e6:.3f} M)",
        f"  MACs per sample         {info['macs']:>14,}  ({info['macs'] / 1e9:.2f} G; scan "
        f"{info['macs_scan'] / 1e6:.1f} M)",
        f"  MAC counter             {info['mac_counter']}",
        "  output shapes (deep supervision on, highest resolution first):",
    ]
    lines += [f"    {tuple(s)}" for s in info["output_shapes"]]
    return "\n".join(lines)
