"""The demo's and the benchmark's building blocks, the shared nnU-Net helpers (folder variables, Dice)
and the research modules' command lines, on the CPU (nothing here trains or needs a GPU)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_mobilevim.cli import demo
from nnunetv2_mobilevim.cli.benchmark import build
from nnunetv2_mobilevim.cli.main import build_parser
from nnunetv2_mobilevim.nnunet import run as nnunet_run
from nnunetv2_mobilevim.nnunet.registration import ext_trainer_dir

REPO = Path(__file__).resolve().parents[2]
RESEARCH = ["compare", "synthetic", "epoch_anatomy", "loader_throughput", "step_profile", "first_call",
            "predict_e2e", "prediction_agreement", "scan_memory"]


def test_demo_writes_embedded_dataset_as_nnunet_raw(tmp_path):
    out = demo.write_raw_dataset(tmp_path)
    assert out == tmp_path / "Dataset990_MobileViMDemo"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "colin27_0000.nii.gz", "mni2009a_0000.nii.gz", "mni6asym_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        "colin27.nii.gz", "mni2009a.nii.gz", "mni6asym.nii.gz"]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["itkperson_0000.nii.gz"]
    assert [p.name for p in (out / "labelsTs").iterdir()] == ["itkperson.nii.gz"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["labels"] == {"background": 0, "brain": 1}


def test_folder_variables_one_layout(tmp_path):
    assert nnunet_run.folder_variables(tmp_path) == {
        "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
        "nnUNet_results": str(tmp_path / "res"), "nnUNet_extTrainer": str(ext_trainer_dir())}
    demo_layout = nnunet_run.folder_variables(tmp_path, preprocessed="preprocessed", results="results")
    assert demo_layout["nnUNet_preprocessed"] == str(tmp_path / "preprocessed")
    assert demo_layout["nnUNet_results"] == str(tmp_path / "results")


def test_dice_one_function_for_demo_and_compare(tmp_path):
    pred = np.array([True, True, False, False])
    ref = np.array([True, False, True, False])
    assert nnunet_run.dice(pred, ref) == 0.5
    assert nnunet_run.dice(pred, np.zeros(4, bool)) == 0.0
    assert math.isnan(nnunet_run.dice(np.zeros(4, bool), np.zeros(4, bool)))  # nnU-Net's convention

    import nibabel as nib

    from nnunetv2_mobilevim.research.compare import dice_per_class

    cases = {  # (reference, prediction); per-class Dice by hand
        "a": ([0, 1, 1, 2, 0, 0, 0, 0], [0, 1, 0, 2, 2, 0, 0, 0]),  # class 1: 2/3, class 2: 2/3
        "b": ([1, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]),  # class 1: 1, class 2: absent in both
    }
    for folder, index in (("ref", 0), ("pred", 1)):
        (tmp_path / folder).mkdir()
        for name, pair in cases.items():
            volume = np.array(pair[index], dtype=np.uint8).reshape(2, 2, 2)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / folder / f"{name}.nii.gz"))
    scores = dice_per_class(tmp_path / "pred", tmp_path / "ref", {"background": 0, "one": 1, "two": 2})
    assert scores.keys() == {"one", "two"}
    assert scores["one"] == pytest.approx(5 / 6, abs=1e-12)
    assert scores["two"] == pytest.approx(2 / 3, abs=1e-12)  # the case without class 2 does not count


def test_benchmark_flags_become_typed_options():
    from nnunetv2_mobilevim.cli.benchmark import BenchmarkOptions

    parser = build_parser()
    assert BenchmarkOptions.from_args(parser.parse_args(["benchmark"])) == BenchmarkOptions(
        patch=(128, 128, 128), in_channels=1, classes=4, batch=1, train_batch=2, iterations=30, warmup=5,
        train=True, cuda_graphs=False, torch_compile=False, channels_last=False, profile=False)
    args = parser.parse_args(["benchmark", "--patch", "64", "80", "96", "--in-channels", "2", "--classes", "3",
                              "--batch", "4", "--train-batch", "5", "--iterations", "7", "--warmup", "1", "--no-train",
                              "--cuda-graphs", "--compile", "--channels-last", "--profile",
                              "--networks", "resenc_m", "mobilevim_xs"])
    assert BenchmarkOptions.from_args(args) == BenchmarkOptions(
        patch=(64, 80, 96), in_channels=2, classes=3, batch=4, train_batch=5, iterations=7, warmup=1, train=False,
        cuda_graphs=True, torch_compile=True, channels_last=True, profile=True)
    assert args.networks == ["resenc_m", "mobilevim_xs"]


def test_benchmark_networks_by_explicit_name():
    from nnunetv2_mobilevim.cli.benchmark import BenchmarkOptions, benchmark

    net = build("mobilevim_xs", 1, 4, (32, 32, 32))
    assert type(net).__name__ == "MobileViM" and net.config.name == "MobileViM_xs"
    unet = build("plainconvunet", 1, 3, (32, 32, 32))
    assert type(unet).__name__ == "PlainConvUNet" and len(unet.encoder.stages) == 4  # 32 -> 16 -> 8 -> 4
    for name in ("mobilevim", "mobilevim_m", "unet"):
        with pytest.raises(ValueError, match="unknown network"):
            build(name, 1, 4, (32, 32, 32))
    with pytest.raises(ValueError, match="unknown network"):
        benchmark(["plainconvunet", "mobilevim"], BenchmarkOptions())  # refused before anything runs


@pytest.mark.parametrize("name", RESEARCH)
def test_research_module_help(name):
    res = subprocess.run([sys.executable, "-m", f"nnunetv2_mobilevim.research.{name}", "--help"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: python -m nnunetv2_mobilevim.research.{name}")
    assert f"    python -m nnunetv2_mobilevim.research.{name} " in res.stdout  # the usage line of the docstring
    assert "docs/benchmarks/tools" not in res.stdout


def test_recorded_epoch_anatomy_commands_map_to_the_module():
    from nnunetv2_mobilevim.research.epoch_anatomy import build_parser as anatomy_parser

    old = "python docs/benchmarks/tools/nnunet_epoch_anatomy.py "
    files = sorted((REPO / "docs" / "benchmarks").glob("*epoch_anatomy*.json"))
    commands = [json.loads(p.read_text()).get("command", "") for p in files]
    recorded = [c[len(old):].split() for c in commands if c.startswith(old)]
    assert len(recorded) >= 6
    for words in recorded:
        args = anatomy_parser().parse_args(words)
        assert (args.dataset, args.epochs, args.iterations, args.trainers) == (
            words[0], int(words[1]), int(words[2]), words[3:])


def test_epoch_anatomy_keeps_measuring_after_a_trainer_fails(tmp_path):
    """One trainer's failure (the H200 run of 142fb8b lost every later row to one failed capture) is
    recorded with its error; the next trainer still runs, and the JSON on disk holds each finished row."""
    from nnunetv2_mobilevim.research.epoch_anatomy import measure_all

    out, seen = tmp_path / "anatomy.json", []

    def run(entry):
        seen.append(json.loads(out.read_text())["trainers"] if out.exists() else {})
        if entry == "B":
            raise RuntimeError("capture failed")
        return {"epoch_s_median": len(seen)}

    result = {"trainers": {}}
    assert measure_all(["A", "B", "C"], run, out, result) == 1
    assert seen == [{}, {"A": {"epoch_s_median": 1}},
                    {"A": {"epoch_s_median": 1}, "B": {"error": "RuntimeError: capture failed"}}]
    assert json.loads(out.read_text())["trainers"] == {
        "A": {"epoch_s_median": 1}, "B": {"error": "RuntimeError: capture failed"}, "C": {"epoch_s_median": 3}}


def test_predict_runs_a_single_case_without_worker_processes(tmp_path, monkeypatch):
    """``predict``'s -npp/-nps: as given; unset, nnU-Net's defaults (3, or nnUNet_npp / nnUNet_nps), except
    for a folder with a single case, which is predicted in the process (no workers to start)."""
    from argparse import Namespace

    from nnunetv2_mobilevim.cli.predict import _processes

    monkeypatch.delenv("nnUNet_npp", raising=False)
    monkeypatch.delenv("nnUNet_nps", raising=False)
    (tmp_path / "a_0000.nii.gz").touch()
    (tmp_path / "a_0001.nii.gz").touch()  # a second channel of the same case
    args = Namespace(i=str(tmp_path), npp=None, nps=None, prev_stage_predictions=None)
    assert _processes(args, ".nii.gz") == (0, 0)
    assert _processes(Namespace(**{**vars(args), "npp": 2}), ".nii.gz") == (2, 3)
    (tmp_path / "b_0000.nii.gz").touch()
    assert _processes(args, ".nii.gz") == (3, 3)
    monkeypatch.setenv("nnUNet_npp", "5")
    assert _processes(args, ".nii.gz") == (5, 3)


@pytest.mark.slow
@pytest.mark.exhaustive
def test_predict_e2e_times_all_four_commands_and_their_first_call(tmp_path):
    """``research.predict_e2e.measure`` (what ``benchmark --predict-e2e`` runs) on one tiny CT-like volume on
    the CPU: a row per run (stock and ours, each model) with the whole command's time and the first call's
    (an empty folder) apart, and ours compared with stock for each model."""
    from nnunetv2_mobilevim.research import predict_e2e

    out = tmp_path / "predict_e2e.json"
    result = predict_e2e.measure(tmp_path / "root", out, cases=1, shape=(24, 96, 96), cube=0, device="cpu",
                                 command="test")
    rows = result["rows"]
    assert [f"{r['command']}:{r['model']}" for r in rows] == list(predict_e2e.RUNS)
    assert json.loads(out.read_text())["rows"] == rows
    for row in rows:
        assert row["cases"] == 1 and 0 < row["first_call_s"] < row["wall_s"]
        assert row["per_case_s"] == pytest.approx(row["wall_s"] - row["first_call_s"], abs=0.02)
    assert all(r["dice_agreement_min"] >= 0.99 for r in rows if r["command"] == "ours")


def test_step_profile_timeline_summary_counts_overlap_once(tmp_path):
    """A hand-made trace of 2 steps (times in microseconds): stream 7 kernels [0, 100) and [150, 250), a
    memset [250, 260); stream 13 kernels [50, 170) overlapping both and [300, 480), a copy [400, 450)
    inside it; a host call [-20, 500). Busy: [0, 260) and [300, 480) = 440 us, 220 us per step; per
    stream 210 and 350 us; first GPU event to last 480 us (the last to start is not the last to end);
    the trace 520 us."""
    import gzip

    from nnunetv2_mobilevim.research.step_profile import timeline_summary

    def event(cat, tid, ts, dur):
        return {"ph": "X", "cat": cat, "tid": tid, "ts": ts, "dur": dur, "name": cat}

    events = [event("kernel", 7, 0, 100), event("kernel", 7, 150, 100), event("gpu_memset", 7, 250, 10),
              event("kernel", 13, 50, 120), event("kernel", 13, 300, 180), event("gpu_memcpy", 13, 400, 50),
              event("cuda_runtime", 1, -20, 520),
              {"ph": "i", "cat": "kernel", "tid": 7, "ts": 900, "name": "an instant, not an interval"}]
    path = tmp_path / "t.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    summary = timeline_summary(path, steps=2)
    assert summary["gpu_busy_ms"] == pytest.approx(0.22)
    assert summary["gpu_first_to_last_ms"] == pytest.approx(0.24)
    assert summary["trace_span_ms"] == pytest.approx(0.26)
    assert summary["streams"] == {"7": {"events": 1.5, "busy_ms": pytest.approx(0.105)},
                                  "13": {"events": 1.5, "busy_ms": pytest.approx(0.175)}}


def test_step_profile_trace_is_the_profiled_timeline_gzipped(tmp_path):
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile

    from nnunetv2_mobilevim.research.step_profile import write_trace

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            torch.mm(a, a)
    path = write_trace(prof, tmp_path / "t.json.gz")
    assert path == tmp_path / "t.json.gz"
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    mm = [e for e in events if e.get("name") == "aten::mm" and e.get("ph") == "X"]
    assert len(mm) == 3 and all(e["dur"] > 0 for e in mm)  # each profiled call, with its duration
