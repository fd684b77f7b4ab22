"""``nnunetv2_mobilevim check``: is this machine ready to train and predict with MobileViM?

Each check yields a status (ok / warn / fail), what was found, and, when not ok, what to do.
The command exits non-zero when any check fails.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import List

from ..nnunet.registration import ENV_VAR as EXT_VAR
from ..nnunet.registration import ext_trainer_dir, is_registered
from ..ssm import ENV_VAR as SCAN_VAR
from ..ssm import ScanBackendError, conv_backend, requested_backend, resolve_backend
from ..ssm.mamba_ssm_kernels import _installed_version, load_causal_conv1d, load_scan_kernel

PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _item(name: str, status: str, found: str, advice: str = "") -> dict:
    return {"name": name, "status": status, "found": found, "advice": advice}


def _unreadable_checkpoints(results: Path) -> List[str]:
    """Checkpoints of our trainers under nnUNet_results that torch cannot load."""
    import torch

    bad = []
    for ckpt in sorted(results.glob("*/nnUNetTrainerMobileViM*/fold_*/checkpoint_*.pth")):
        try:
            torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated zip, pickle error, ...
            bad.append(f"{ckpt} ({type(err).__name__})")
    return bad


def run_checks() -> dict:
    items = []
    try:
        import torch
    except Exception as err:  # pragma: no cover - the package needs torch to import at all
        return {"ok": False, "items": [_item("torch", "fail", f"not importable: {err}", "pip install torch")]}
    cuda = torch.cuda.is_available()
    items.append(_item("python", "ok", platform.python_version()))
    items.append(_item("torch", "ok", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"))
    items.append(_item("cuda device", "ok" if cuda else "warn",
                       torch.cuda.get_device_name(0) if cuda else "none: training and inference run on the CPU (slow)",
                       "" if cuda else "use a machine with an NVIDIA GPU for real training"))

    nnunet = _installed_version("nnunetv2")
    good_nnunet = nnunet is not None and tuple(int(p) for p in nnunet.split(".")[:2]) >= (2, 8)
    items.append(_item("nnunetv2", "ok" if good_nnunet else "fail", nnunet or "not installed",
                       "" if good_nnunet else "pip install 'nnunetv2>=2.8,<2.9' (2.8 added nnUNet_extTrainer)"))

    scan, conv = load_scan_kernel(), load_causal_conv1d()
    gpu_only = "" if cuda else " (only used on CUDA)"
    # found: the version when importable, else why not (not installed, or the import error itself)
    items.append(_item("mamba-ssm", "ok" if scan.fn or not cuda else "warn",
                       ((scan.version or "importable (version unknown)") if scan.fn else scan.problem) + gpu_only,
                       "" if scan.fn or not cuda else f"the scan runs in PyTorch (exact, slower); {scan.fix}"))
    items.append(_item("causal-conv1d", "ok" if conv.fn or not cuda else "warn",
                       ((conv.version or "importable (version unknown)") if conv.fn else conv.problem) + gpu_only,
                       "" if conv.fn or not cuda else f"the causal conv1d runs in PyTorch (exact, slower); {conv.fix}"))
    try:
        backend = resolve_backend(is_cuda=cuda, warn=False)
        if backend == "mamba_ssm":
            conv_backend(is_cuda=cuda, width=4, warn=False)  # the shipped configurations' d_conv
        where = "CUDA tensors" if cuda else "CPU tensors"
        items.append(_item("scan backend", "ok", f"{backend} for {where} ({SCAN_VAR}={requested_backend()})"))
    except ScanBackendError as err:
        items.append(_item("scan backend", "fail", str(err), f"unset {SCAN_VAR} or install the kernels"))

    folder = ext_trainer_dir()
    items.append(_item(EXT_VAR, "ok" if is_registered() else "fail",
                       os.environ.get(EXT_VAR) or "not set",
                       "" if is_registered() else f'export {EXT_VAR}="$(nnunetv2_mobilevim ext-path)"   # {folder}'))
    for var in PATH_VARS:
        value = os.environ.get(var)
        if not value:
            items.append(_item(var, "fail", "not set", f"export {var}=/path/to/{var}  (see nnU-Net's "
                                                       "documentation/set_environment_variables.md)"))
        elif not Path(value).is_dir():
            items.append(_item(var, "warn", f"{value} (does not exist yet)", f"mkdir -p {value}"))
        else:
            items.append(_item(var, "ok", value))
    results = os.environ.get("nnUNet_results")
    if results and Path(results).is_dir():
        bad = _unreadable_checkpoints(Path(results))
        items.append(_item("checkpoints", "fail" if bad else "ok",
                           ("cannot be read: " + "; ".join(bad)) if bad else "all MobileViM checkpoints load",
                           "copy them again from their source, or predict with another one "
                           "(-chk checkpoint_best.pth); resume training with --c after moving a broken one away"
                           if bad else ""))
    return {"ok": all(i["status"] != "fail" for i in items), "items": items}


def format_report(report: dict) -> str:
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    lines = []
    for i in report["items"]:
        lines.append(f"[{marks[i['status']]}] {i['name']:<20} {i['found']}")
        if i["advice"]:
            lines.append(f"       -> {i['advice']}")
    lines.append("ready" if report["ok"] else "not ready: fix the FAIL lines above")
    return "\n".join(lines)
