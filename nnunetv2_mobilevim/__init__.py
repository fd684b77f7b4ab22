"""MobileViM_s and MobileViM_xs (Dai, Wang, Liu 2025) as a plugin for stock nnU-Net v2.

The public names load on first use (PEP 562), so ``nnunetv2_mobilevim ext-path`` (often run from a
shell profile) answers without importing torch.
"""

import importlib

__version__ = "0.4.0"

_EXPORTS = {
    "MobileViM": "networks.mobilevim", "count_parameters": "networks.mobilevim",
    "MobileViMConfig": "networks.mobilevim", "load_config": "networks.mobilevim",
    "DiminMamba": "networks.mobilevim", "MobileMambaBlock": "networks.mobilevim", "ScaleBridger": "networks.mobilevim",
    "DualDirectionMamba": "ssm",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
