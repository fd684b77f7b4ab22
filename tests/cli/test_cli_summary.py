"""`nnunetv2_mobilevim summary` and `ext-path`, run as a user would: real subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "nnunetv2_mobilevim.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("variant,paper", [("s", 6.29e6), ("xs", 2.89e6)])
def test_summary_reproduces_parameter_counts(variant, paper):
    res = run("summary", "--variant", variant, "--in-channels", "1", "--classes", "4", "--patch", "64", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert {"params", "params_inference", "macs", "output_shapes"} <= set(info)
    assert abs(info["params_inference"] / paper - 1) <= 0.02
    assert info["params"] > info["params_inference"]
    assert info["macs"] > info["macs_scan"] > 0
    assert info["output_shapes"][0] == [1, 4, 64, 64, 64]


def test_summary_text_output():
    res = run("summary", "--variant", "xs", "--patch", "32", "48", "64")
    assert res.returncode == 0, res.stderr
    assert "MobileViM_xs" in res.stdout and "MACs per sample" in res.stdout and "(1, 4, 32, 48, 64)" in res.stdout


@pytest.mark.parametrize("args,expected", [
    (["summary", "--patch", "8"], "too small"),
    (["summary", "--variant", "m"], "unknown MobileViM variant"),
    (["summary", "--classes", "0"], "must be >= 1"),
    (["summary", "--patch", "64", "64"], "1 or 3 sizes"),
])
def test_bad_arguments_give_a_message_not_a_traceback(args, expected):
    res = run(*args)
    assert res.returncode == 2
    assert expected in res.stderr
    assert "Traceback" not in res.stderr


def test_ext_path_is_the_shim_folder_and_needs_no_torch():
    """`export nnUNet_extTrainer=$(nnunetv2_mobilevim ext-path)` sits in shell profiles: it must be instant."""
    res = run("ext-path")
    assert res.returncode == 0
    folder = res.stdout.strip()
    assert folder.endswith("ext_trainers") and (Path(folder) / "nnunetv2_mobilevim_trainers.py").is_file()
    code = "import sys, nnunetv2_mobilevim.cli.main; print('torch' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def test_count_bytes_charges_each_op_its_reads_and_writes_and_views_nothing():
    """The roofline's byte count (docs/benchmarks.md): an op reads its tensor inputs and writes its output."""
    import torch

    from nnunetv2_mobilevim.cli.summary import count_bytes

    conv = torch.nn.Conv3d(1, 2, 1, bias=False)
    x = torch.zeros(1, 1, 4, 4, 4)
    conv_bytes = 4 * (64 + 2 + 128)  # float32: input, weight, output
    assert count_bytes(conv, x) == conv_bytes
    assert count_bytes(torch.nn.Sequential(conv, torch.nn.ReLU()), x) == conv_bytes + 4 * 2 * 128  # + ReLU r/w
    assert count_bytes(torch.nn.Flatten(), x) == 0  # a view moves nothing
