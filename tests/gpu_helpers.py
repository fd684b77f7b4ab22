"""Helpers of the GPU tests: error measures and the line each comparison prints (`pytest -s`)."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: for whole parameter updates, where single elements may legitimately differ."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def report(name: str, value: float) -> None:
    print(f"\n[agreement] {name}: {value:.2e}")


def use_torch_scan(net: torch.nn.Module) -> torch.nn.Module:
    """Every Mamba layer on the PyTorch scan: deterministic, and no kernels needed."""
    for m in net.modules():
        if hasattr(m, "scan_backend"):
            m.scan_backend = "torch"
    return net
