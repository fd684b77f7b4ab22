"""The family benchmark (``nnunetv2_mobilevim benchmark --networks all``) on the CPU at tiny plans: every
network is built from nnU-Net's plan for the patch as its own builder builds it, the JSON the issue's goals
are read from has its schema, a network that fails is recorded and the run goes on, the time budget skips
what it has no time for, and ``_best`` is the fastest mode. The GPU test runs the same at a small patch
with graph replay (the lead's smoke test before the real run)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunetv2_mobilevim.cli import benchmark as bench
from nnunetv2_mobilevim.cli.main import build_parser
from nnunetv2_mobilevim.networks.mobilevim import MobileViM
from nnunetv2_mobilevim.networks.taming import taming_from_plan
from nnunetv2_mobilevim.networks.umamba import umamba_from_plan
from nnunetv2_mobilevim.ssm.mamba import Mamba

REPO = Path(__file__).resolve().parents[2]
# the schema the issue names, written out here (not imported from the code under test)
TOP_KEYS = {"device", "torch", "patch", "rows"}
ROW_KEYS = {"network", "params", "fps_fp16_eager", "fps_fp16_best", "train_step_ms_eager", "train_step_ms_best",
            "train_peak_gb", "best_mode"}
TINY = dict(device="cpu", base_features=4, max_features=16, precisions=("fp16",), iterations=1, warmup=0,
            measure_seconds=None)


def _tiny_plan(stages: int, blocks_key: str, encoder, decoder) -> dict:
    """nnU-Net's plan by hand for a 16^3 (3 stages: 16 -> 8 -> 4) or 8^3 patch (2 stages: 8 -> 4) at
    isotropic spacing (stride 2 while the axis stays >= 4), 3^3 kernels, features 4 doubling to 16."""
    return {"n_stages": stages, "features_per_stage": [4, 8, 16][:stages], "conv_op": nn.Conv3d,
            "kernel_sizes": [[3, 3, 3]] * stages, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]][:stages],
            blocks_key: encoder, "n_conv_per_stage_decoder": decoder, "conv_bias": True, "norm_op": nn.InstanceNorm3d,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}


PLAIN = _tiny_plan(3, "n_conv_per_stage", [2, 2, 2], [2, 2])
RESENC_M = _tiny_plan(3, "n_blocks_per_stage", [1, 3, 4], [1, 1])
PLAIN_8 = _tiny_plan(2, "n_conv_per_stage", [2, 2], [2])
PATCH = (16, 16, 16)
MOBILEVIM_STRIDES = [[2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1]]  # the plan's two poolings, padded to four


def _umamba(variant, mamba):
    return lambda: umamba_from_plan(PLAIN, PATCH, 1, 4, False, variant=variant, mamba=mamba)


def _taming(variant, mamba):
    return lambda: taming_from_plan(PLAIN, PATCH, 1, 4, False, variant=variant, mamba=mamba)


# every family name -> the network its own builder makes from the hand-written plan above
EXPECTED = {
    "plainconvunet": lambda: PlainConvUNet(1, num_classes=4, deep_supervision=False, **PLAIN),
    "resenc_m": lambda: ResidualEncoderUNet(1, num_classes=4, deep_supervision=False, **RESENC_M),
    "mobilevim_s": lambda: MobileViM(input_channels=1, num_classes=4, variant="s", strides=MOBILEVIM_STRIDES),
    "mobilevim_xs": lambda: MobileViM(input_channels=1, num_classes=4, variant="xs", strides=MOBILEVIM_STRIDES),
    "umamba_bot": _umamba("bot", True), "umamba_bot_nomamba": _umamba("bot", False),
    "umamba_enc": _umamba("enc", True), "umamba_enc_nomamba": _umamba("enc", False),
    "taming_segmamba": _taming("segmamba", True), "taming_segmamba_nomamba": _taming("segmamba", False),
    "bisegmamba": _taming("bisegmamba", True), "bisegmamba_nomamba": _taming("bisegmamba", False),
    "multisegmamba": _taming("multisegmamba", True), "multisegmamba_nomamba": _taming("multisegmamba", False),
    "segmambaskip": _taming("segmambaskip", True), "segmambaskip_nomamba": _taming("segmambaskip", False),
}


def _shapes(net: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_every_family_network_is_built_from_the_plan_as_its_own_builder_builds_it():
    assert set(bench.NETWORKS) == set(EXPECTED)  # the whole family, nothing else
    for name, expected in EXPECTED.items():
        with torch.device("meta"):
            got = bench.build(name, 1, 4, PATCH, base_features=4, max_features=16)
            ref = expected()
        assert type(got) is type(ref), name
        assert _shapes(got) == _shapes(ref), name  # every parameter and buffer, by name and shape
        assert sum(p.numel() for p in got.parameters()) == sum(p.numel() for p in ref.parameters()), name
        mambas = sum(isinstance(m, Mamba) for m in got.modules())
        if name.endswith("_nomamba") or name in ("plainconvunet", "resenc_m"):
            assert mambas == 0, f"{name} has {mambas} Mamba blocks"
        elif not name.startswith("mobilevim"):  # MobileViM's scan is its own (DualDirectionMamba)
            assert mambas > 0, name


def test_plans_are_nnunets_for_the_issue_patches():
    cfg = bench.nnunet_configuration((128, 128, 128))
    arch = cfg["architecture"]["arch_kwargs"]
    assert cfg["architecture"]["network_class_name"].endswith(".PlainConvUNet")
    assert arch["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5  # 128 -> 4
    assert arch["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert arch["kernel_sizes"] == [[3, 3, 3]] * 6
    assert arch["n_conv_per_stage"] == [2] * 6 and arch["n_conv_per_stage_decoder"] == [2] * 5
    resenc = bench.nnunet_configuration((128, 128, 128), "resenc_m")["architecture"]
    assert resenc["network_class_name"].endswith(".ResidualEncoderUNet")
    assert resenc["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert resenc["arch_kwargs"]["n_conv_per_stage_decoder"] == [1] * 5
    arch = bench.nnunet_configuration((96, 96, 96))["architecture"]["arch_kwargs"]
    assert arch["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4  # 96 -> 6 (6 / 2 < 4)
    assert arch["features_per_stage"] == [32, 64, 128, 256, 320]
    arch = bench.nnunet_configuration((64, 80, 64))["architecture"]["arch_kwargs"]
    assert arch["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4  # 64 -> 4 and 80 -> 5
    with pytest.raises(ValueError, match="112 112 112"):  # nnU-Net would enlarge the patch
        bench.nnunet_configuration((100, 100, 100))


def test_nnunet_networks_and_mobilevim_keep_the_earlier_benchmarks_parameter_counts():
    # counts the earlier builder wrote on the H100 at 128^3 (docs/benchmarks/h100_128cube.json)
    earlier = json.loads((REPO / "docs" / "benchmarks" / "h100_128cube.json").read_text())
    assert len(earlier["rows"]) == 4
    for row in earlier["rows"]:
        with torch.device("meta"):
            net = bench.build(row["network"], 1, 4, (128, 128, 128))
        assert sum(p.numel() for p in net.parameters()) == row["params"], row["network"]


@pytest.fixture(scope="module")
def budgeted_run(tmp_path_factory):
    """Four networks at an 8^3 patch on the CPU, with a clock that jumps 400 s after every network and a
    500 s budget: two networks measured (they start at 0 s and 400 s), two skipped; the JSON written after
    every network."""
    path = tmp_path_factory.mktemp("family") / "cpu_family_8.json"
    clock = {"now": 0.0}
    written = []

    def on_row(result):
        bench.write_json(result, path)
        written.append(len(result["rows"]))
        clock["now"] += 400.0

    options = bench.BenchmarkOptions(patch=(8, 8, 8), cuda_graphs=True, time_budget=500.0, **TINY)
    result = bench.benchmark(["plainconvunet", "umamba_bot", "umamba_bot_nomamba", "taming_segmamba"], options,
                             command="test", on_row=on_row, clock=lambda: clock["now"])
    return result, path, written


def test_family_json_has_the_schema(budgeted_run):
    result, path, written = budgeted_run
    assert written == [1, 2, 3, 4]  # rewritten after every network
    data = json.loads(path.read_text())
    assert TOP_KEYS <= set(data) and data["patch"] == [8, 8, 8] and data["device"] == "cpu"
    assert [r["network"] for r in data["rows"]] == ["plainconvunet", "umamba_bot", "umamba_bot_nomamba",
                                                    "taming_segmamba"]
    for row in data["rows"]:
        assert ROW_KEYS <= set(row), row["network"]
    for row in data["rows"][:2]:
        assert "error" not in row and "skipped" not in row, row
        with torch.device("meta"):
            ref = (PlainConvUNet(1, num_classes=4, deep_supervision=False, **PLAIN_8)
                   if row["network"] == "plainconvunet" else umamba_from_plan(PLAIN_8, (8, 8, 8), 1, 4, False))
        assert row["params"] == sum(p.numel() for p in ref.parameters())
        assert row["fps_fp16_eager"] > 0 and row["train_step_ms_eager"] > 0
        # on a CPU only the eager mode runs: the best is eager, and the graph mode says why it did not run
        assert row["best_mode"] == {"forward": "eager", "train": "eager"}
        assert row["fps_fp16_best"] == row["fps_fp16_eager"] and row["train_step_ms_best"] == row["train_step_ms_eager"]
        assert "CUDA" in row["unavailable"]["fps_fp16_graph"] and "CUDA" in row["unavailable"]["train_step_ms_graph"]
        assert row["macs_per_sample"] > 0 and row["train_peak_gb"] is None  # no GPU memory on a CPU


def test_time_budget_skips_the_remaining_networks(budgeted_run):
    result, path, _ = budgeted_run
    skipped = [r for r in result["rows"] if "skipped" in r]
    assert [r["network"] for r in skipped] == ["umamba_bot_nomamba", "taming_segmamba"]
    for row in skipped:
        assert "time budget of 500 s" in row["skipped"] and row["params"] is None and row["fps_fp16_best"] is None
    table = bench.markdown(result)
    assert "| taming_segmamba | skipped: the time budget of 500 s was spent" in table


def test_training_table_has_a_column_for_each_mode_including_the_compiled_graph(budgeted_run):
    """Each training row has as many cells as the header, and the compiled-inside-the-graph step (the
    trainers' mode under ``nnUNet_compile``) lands in its own column, and is the best where fastest."""
    result = copy.deepcopy(budgeted_run[0])
    row = result["rows"][0]
    row.update(train_step_ms_graph=4.5, train_step_ms_compile=6.5, train_step_ms_graph_compile=2.5,
               train_peak_gb_graph_compile=0.75)
    assert bench.pick_best({m: row.get(f"train_step_ms_{m}") for m in bench.TRAIN_MODES},
                           higher_is_better=False) == ("graph_compile", 2.5)
    table = bench.markdown(result).split("Training step")[1].splitlines()
    head = next(line for line in table if line.startswith("| network |"))
    line = next(line for line in table if line.startswith(f"| {row['network']} |"))
    heads, cells = [c.strip() for c in head.split("|")], [c.strip() for c in line.split("|")]
    assert len(cells) == len(heads)
    assert cells[heads.index("graph + compile")] == "2.5" and cells[heads.index("graph")] == "4.5"
    assert cells[heads.index("peak graph + compile (GB)")] == "0.75"


def test_a_network_that_cannot_take_the_patch_is_recorded_and_the_run_goes_on():
    # a 4^3 patch plans a single stage: Taming Mambas' networks refuse it, MobileViM takes it
    options = bench.BenchmarkOptions(patch=(4, 4, 4), train=False, **TINY)
    result = bench.benchmark(["taming_segmamba", "mobilevim_xs"], options)
    failed, measured = result["rows"]
    assert "n_stages >= 2" in failed["error"] and failed["fps_fp16_best"] is None
    assert "error" not in measured and measured["fps_fp16_best"] > 0
    assert "| taming_segmamba | ValueError: need n_stages >= 2" in bench.markdown(result)


def test_best_is_the_fastest_mode_that_ran():
    assert bench.pick_best({"eager": 10.0, "graph": 30.0, "compile": 20.0}, higher_is_better=True) == ("graph", 30.0)
    assert bench.pick_best({"eager": 50.0, "graph": 40.0, "compile": 45.0}, higher_is_better=False) == ("graph", 40.0)
    assert bench.pick_best({"eager": 50.0, "graph": None, "compile": 60.0}, higher_is_better=False) == ("eager", 50.0)
    assert bench.pick_best({"eager": 5.0, "graph": None, "compile": 9.0}, higher_is_better=True) == ("compile", 9.0)
    assert bench.pick_best({"eager": None}, higher_is_better=True) == (None, None)


def test_compile_skip_graphed_keeps_compiling_the_reference_networks():
    options = bench.BenchmarkOptions(torch_compile=True, compile_skip_graphed=True)
    assert bench.compile_skipped(options, "umamba_bot", graph_ran=True)
    assert not bench.compile_skipped(options, "umamba_bot", graph_ran=False)  # no graph: compile is the fast mode
    assert not bench.compile_skipped(options, "plainconvunet", graph_ran=True)  # the goals compare with it
    assert not bench.compile_skipped(options, "resenc_m", graph_ran=True)
    assert not bench.compile_skipped(bench.BenchmarkOptions(torch_compile=True), "umamba_bot", graph_ran=True)


def test_measurement_is_capped_by_measure_seconds():
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)
    median, timed = bench._time_ms(slow, iterations=100, warmup=10, device="cpu", seconds=0.2)
    assert 3 <= timed <= 5  # stops after 0.2 s, but times at least three calls
    assert len(calls) - timed <= 5  # the warm-up stops after 0.2 s too
    assert median >= 50.0
    _, timed = bench._time_ms(lambda: None, iterations=7, warmup=0, device="cpu", seconds=None)
    assert timed == 7


def test_family_flags_become_options():
    args = build_parser().parse_args(
        ["benchmark", "--networks", "all", "--precisions", "fp16", "bf16", "--time-budget", "400", "--cuda-graphs",
         "--compile", "--compile-skip-graphed", "--compile-always", "plainconvunet", "--measure-seconds", "0",
         "--family-json", "x.json"])
    options = bench.BenchmarkOptions.from_args(args)
    assert options.precisions == ("fp16", "bf16") and options.time_budget == 400.0
    assert options.compile_skip_graphed and options.compile_always == ("plainconvunet",)
    assert options.measure_seconds is None and args.family_json == Path("x.json")
    names = bench.network_names(args.networks)  # every network once, nnU-Net's and MobileViM first (the goals')
    assert sorted(names) == sorted(EXPECTED) and len(names) == 16
    assert set(names[:4]) == {"plainconvunet", "resenc_m", "mobilevim_s", "mobilevim_xs"}
    with pytest.raises(ValueError, match="unknown network"):
        bench.network_names(["all", "segmamba"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_family_benchmark_on_gpu_replays_graphs(tmp_path):
    """A 32^3 patch, small features: graph replay of the forward and of the whole training step runs for
    nnU-Net's network and for MobileViM (and is recorded, run or not, for the Mamba networks)."""
    options = bench.BenchmarkOptions(patch=(32, 32, 32), device="cuda", base_features=8, max_features=64,
                                     iterations=5, warmup=2, precisions=("fp16", "fp32"), cuda_graphs=True)
    result = bench.benchmark(["plainconvunet", "mobilevim_xs", "umamba_bot", "taming_segmamba"], options,
                             on_row=lambda r: bench.write_json(r, tmp_path / "family.json"))
    print("\n" + bench.markdown(result))
    rows = {r["network"]: r for r in result["rows"]}
    for row in rows.values():
        assert "error" not in row, row
        for key in ("fps_fp16_graph", "train_step_ms_graph"):
            assert row[key] is not None or key in row["unavailable"], (row["network"], key)
        assert row["train_peak_gb"] > 0
    for name in ("plainconvunet", "mobilevim_xs"):
        assert rows[name]["fps_fp16_graph"] > 0 and rows[name]["train_step_ms_graph"] > 0, rows[name]["unavailable"]
        assert rows[name]["graph_max_abs_diff_fp32"] <= 5e-3 * rows[name]["logit_max_abs_fp32"]
    assert json.loads((tmp_path / "family.json").read_text())["rows"][-1]["network"] == "taming_segmamba"


@pytest.mark.gpu
@pytest.mark.exhaustive
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_family_benchmark_on_gpu_times_the_compiled_network_inside_the_graph(tmp_path):
    """The fourth training mode runs for nnU-Net's network and for MobileViM: a time, a peak, and a row
    without errors. fp32 forwards only, so that the forward is not compiled too. Exhaustive: it compiles
    each network twice and takes longer than a GPU call; that MobileViM's resize stays capturable under
    torch.compile is shown by the compiled whole-step test of tests/acceleration/test_gpu_graphs.py."""
    options = bench.BenchmarkOptions(patch=(32, 32, 32), device="cuda", base_features=8, max_features=64,
                                     iterations=5, warmup=2, precisions=("fp32",), cuda_graphs=True,
                                     torch_compile=True)
    result = bench.benchmark(["plainconvunet", "mobilevim_xs"], options)
    print("\n" + bench.markdown(result))
    for row in result["rows"]:
        assert "error" not in row, row
        assert "train_step_ms_graph_compile" not in row["unavailable"], row["unavailable"]
        assert row["train_step_ms_graph_compile"] > 0 and row["train_peak_gb_graph_compile"] > 0


def test_kernel_table_is_per_step_and_ranked_by_time():
    """Hand-made profiler events (key, self GPU time in us, calls) over 2 steps: times and calls are halved,
    the kernels ranked by time, shares of the per-step total."""
    class Event:
        def __init__(self, key, us, count):
            self.key, self.self_device_time_total, self.count = key, us, count

    events = [Event("small", 400.0, 10), Event("big", 3000.0, 2), Event("mid", 600.0, 4)]
    table = bench.kernel_table(events, steps=2, top=2)
    assert table["gpu_ms"] == pytest.approx(2.0)  # (400 + 3000 + 600) us / 2 steps
    assert table["kernels"] == pytest.approx(8.0)  # (10 + 2 + 4) / 2
    assert [t["kernel"] for t in table["top"]] == ["big", "mid"]
    assert table["top"][0]["ms"] == pytest.approx(1.5)
    assert table["top"][0]["share"] == pytest.approx(0.75)
    assert table["top"][1]["calls"] == pytest.approx(2.0)
