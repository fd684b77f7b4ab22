"""research.family_accuracy: the trainer list for the family's accuracy runs, and the merge of compare's
results (made in parts, one device call each) into the family-accuracy JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunetv2_mobilevim.research.family_accuracy import FAMILY, main, merge, part_commits


def _row(spec, dice, dice_mean, epoch, peak, compiled=False):
    return {"trainer": spec.partition(":")[0], "spec": spec, "dice": dice, "dice_mean": dice_mean,
            "epoch_seconds_median": epoch, "peak_gpu_gb": peak, "torch_compile": compiled, "params": 10,
            "dice_best_mean": dice_mean / 2, "dice_best_no_tta_mean": dice_mean / 4, "any_nan_loss": False}


def _part(dataset, rows, epochs=20, iterations=250):
    return {"dataset": dataset, "epochs": epochs, "iterations_per_epoch": iterations, "rows": rows,
            "command": f"python -m nnunetv2_mobilevim.research.compare --dataset {dataset} ..."}


def test_every_family_spec_is_a_shipped_trainer_and_every_mamba_network_has_its_twin():
    pytest.importorskip("nnunetv2")
    from nnunetv2_mobilevim.cli.listing import find_trainer

    names = [spec.partition(":")[0] for spec in FAMILY]
    for name in set(names) - {"nnUNetTrainer"}:  # nnU-Net's own is nnU-Net's, not shipped here
        find_trainer(name)
    twins = [n for n in names if n.endswith("_NoMamba")]
    assert len(twins) == 6 and all(t[: -len("_NoMamba")] in names for t in twins)
    assert len(FAMILY) == len(set(FAMILY))


def test_merge_maps_compare_rows_and_numbers_repeated_runs():
    part1 = _part("shapes", [_row("nnUNetTrainer", {"a": 0.5, "b": 0.25}, 0.375, 9.5, 2.0, compiled=True),
                             _row("nnUNetTrainerMobileViM", {"a": 0.75, "b": 0.5}, 0.625, 5.0, 1.0)])
    part2 = _part("shapes", [_row("nnUNetTrainerMobileViM:da=0", {"a": 0.7, "b": 0.4}, 0.55, 8.0, 0.9),
                             _row("nnUNetTrainerMobileViM", {"a": 0.8, "b": 0.5}, 0.65, 5.1, 1.0)])
    part2["gpu_shared"] = True
    result = merge({"p1.json": part1, "p2.json": part2}, "NVIDIA H200")
    assert result["device"] == "NVIDIA H200" and result["schedule"] == {"epochs": 20, "iterations": 250}
    rows = result["rows"]
    assert [(r["trainer"], r["run"]) for r in rows] == [
        ("nnUNetTrainer", 1), ("nnUNetTrainerMobileViM", 1), ("nnUNetTrainerMobileViM:da=0", 1),
        ("nnUNetTrainerMobileViM", 2)]
    first = rows[1]
    assert (first["dataset"], first["dice_per_class"], first["dice_mean"], first["epoch_s_median"],
            first["peak_gb"], first["source"]) == ("shapes", {"a": 0.75, "b": 0.5}, 0.625, 5.0, 1.0, "p1.json")
    assert [r["gpu_shared"] for r in rows] == [False, False, True, True]
    assert ["nnUNetTrainerMobileViM_xs", "shapes"] in result["missing"]
    assert len(result["missing"]) == len(FAMILY) - 3


def test_merge_refuses_mixed_schedules_an_uncompiled_baseline_and_foreign_files():
    good = _part("demo", [_row("nnUNetTrainerMobileViM", {"brain": 0.9}, 0.9, 4.0, 0.5)])
    short = _part("demo", [_row("nnUNetTrainerMobileViM_xs", {"brain": 0.9}, 0.9, 4.0, 0.5)], epochs=10)
    with pytest.raises(ValueError, match=r"different schedules.*a.json: 20 x 250.*b.json: 10 x 250"):
        merge({"a.json": good, "b.json": short}, "x")
    eager = _part("demo", [_row("nnUNetTrainer", {"brain": 0.9}, 0.9, 4.0, 0.5, compiled=False)])
    with pytest.raises(ValueError, match="without torch.compile"):
        merge({"a.json": eager}, "x")
    with pytest.raises(ValueError, match="c.json is not a result of research.compare"):
        merge({"c.json": {"rows": []}}, "x")


def test_command_line_writes_the_file_and_fails_clearly(tmp_path, capsys):
    part = tmp_path / "part.json"
    part.write_text(json.dumps(_part("demo", [_row("nnUNetTrainerMobileViM_xs", {"brain": 0.5}, 0.5, 3.0, 0.4)])))
    out = tmp_path / "docs" / "acc.json"
    assert main(["merge", str(part), "--device", "NVIDIA H200", "--out", str(out), "--commit", "abc1234",
                 "--date", "2026-12-03"]) == 0
    written = json.loads(out.read_text())
    assert (written["device"], written["commit"], written["date"]) == ("NVIDIA H200", "abc1234", "2026-12-03")
    assert written["rows"][0]["trainer"] == "nnUNetTrainerMobileViM_xs" and written["rows"][0]["dice_mean"] == 0.5
    assert main(["merge", str(tmp_path / "absent.json"), "--device", "x", "--out", str(out)]) == 2
    assert "absent.json" in capsys.readouterr().err
    assert main(["trainers"]) == 0
    assert capsys.readouterr().out.split() == list(FAMILY)


def test_parts_run_at_different_commits_keep_their_commit_per_row(tmp_path):
    names = ["r/demo/call1/a.json", "r/demo/call3/b.json", "r/shapes/call1/c.json"]
    assert part_commits(["e4371a2", "r/demo/call3/=25f2b6e", "r/shapes/=25f2b6e"], names) == {
        names[0]: "e4371a2", names[1]: "25f2b6e", names[2]: "25f2b6e"}
    assert part_commits(["r/=aaa", "r/demo/=bbb"], names)[names[1]] == "bbb"  # the longest prefix wins
    with pytest.raises(ValueError, match="no part's file name starts with r/brain/"):
        part_commits(["e4371a2", "r/brain/=25f2b6e"], names)
    with pytest.raises(ValueError, match="no --commit names the commit of r/shapes/call1/c.json"):
        part_commits(["r/demo/=25f2b6e"], names)
    with pytest.raises(ValueError, match="without a prefix was given 2 times"):
        part_commits(["aaa", "bbb"], names)

    parts = {}
    for name, spec in zip(names, ["nnUNetTrainerMobileViM", "nnUNetTrainerMultiSegMamba", "nnUNetTrainerMobileViM"]):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_part("shapes" if "shapes" in name else "demo",
                                         [_row(spec, {"x": 0.5}, 0.5, 1.0, 0.1)], epochs=10, iterations=50)))
        parts[name] = str(path)
    out = tmp_path / "acc.json"
    assert main(["merge", *parts.values(), "--device", "NVIDIA H200", "--out", str(out), "--date", "2026-12-03",
                 "--commit", "e4371a2", "--commit", f"{tmp_path}/r/demo/call3/=25f2b6e",
                 "--commit", f"{tmp_path}/r/shapes/=25f2b6e"]) == 0
    written = json.loads(out.read_text())
    assert [r["commit"] for r in written["rows"]] == ["e4371a2", "25f2b6e", "25f2b6e"]
    assert (written["commit"], written["date"]) == ("e4371a2, 25f2b6e", "2026-12-03")


def test_merge_skips_rows_of_trainers_stopped_by_the_time_limit():
    stopped = _part("shapes", [_row("nnUNetTrainerMobileViM_xs", {"a": 0.5}, 0.5, 1.0, 0.1),
                               {"trainer": "nnUNetTrainerMultiSegMamba", "spec": "nnUNetTrainerMultiSegMamba",
                                "incomplete": True, "epochs_done": 4}])
    result = merge({"call1.json": stopped}, "x")
    assert [r["trainer"] for r in result["rows"]] == ["nnUNetTrainerMobileViM_xs"]
    assert ["nnUNetTrainerMultiSegMamba", "shapes"] in result["missing"]
    continued = _part("shapes", [_row("nnUNetTrainerMultiSegMamba", {"a": 0.25}, 0.25, 9.0, 20.0)])
    result = merge({"call1.json": stopped, "call2.json": continued}, "x")
    assert [(r["trainer"], r["run"], r["source"]) for r in result["rows"]] == [
        ("nnUNetTrainerMobileViM_xs", 1, "call1.json"), ("nnUNetTrainerMultiSegMamba", 1, "call2.json")]
    assert ["nnUNetTrainerMultiSegMamba", "shapes"] not in result["missing"]


def test_compare_prepares_only_and_predicts_the_final_checkpoint_only(tmp_path, monkeypatch):
    """The flags of the parts: --prepare-only trains nothing; --final-only runs one prediction
    (checkpoint_final with mirroring) instead of three; --shared-gpu is recorded. Training and nnU-Net's
    prediction are replaced (no GPU here): the prediction copies the reference, so Dice is 1."""
    import shutil

    import nibabel as nib
    import numpy as np

    from nnunetv2_mobilevim.nnunet import run as nnunet_run
    from nnunetv2_mobilevim.research import compare

    def prepare(name, root):
        raw = root / "raw" / "Dataset1_X"
        (raw / "labelsTs").mkdir(parents=True, exist_ok=True)
        (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
        nib.save(nib.Nifti1Image(np.array([[[0, 1], [1, 0]]], np.uint8), np.eye(4)), raw / "labelsTs" / "c.nii.gz")
        plans = root / "pre" / "Dataset1_X" / "nnUNetPlans.json"
        plans.parent.mkdir(parents=True, exist_ok=True)
        plans.write_text(json.dumps({"configurations": {"3d_fullres": {"patch_size": [2, 2, 2], "batch_size": 2}}}))
        return "Dataset1_X", 1, raw

    trained, predicted = [], []

    def predict(args):
        predicted.append([str(a) for a in args])
        out = Path(args[args.index("-o") + 1])
        shutil.copytree(Path(args[args.index("-i") + 1]).parent / "labelsTs", out, dirs_exist_ok=True)

    monkeypatch.setattr(compare, "prepare_dataset", prepare)
    calls = []

    def train(name, *args):
        trained.append(name)
        calls.append(args)
        if name == "nnUNetTrainerMultiSegMamba" and not args[-1]:  # args[-1]: resume
            return {"trainer": name, "incomplete": True, "epochs_done": 1, "resumed_at_epoch": None}
        return {"trainer": name, "epoch_seconds_median": 1.0, "peak_gpu_gb": 0.5}

    monkeypatch.setattr(compare, "train_in_fresh_process", train)
    monkeypatch.setattr(nnunet_run, "predict", predict)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_compile"):
        monkeypatch.setenv(key, "unset")  # main sets them for its run; monkeypatch restores them after
    base = ["--dataset", "shapes", "--workdir", str(tmp_path), "--epochs", "2", "--iterations", "3"]
    compare.main([*base, "--prepare-only"])
    assert trained == [] and predicted == []
    out = tmp_path / "part.json"
    compare.main([*base, "--trainers", "nnUNetTrainerMobileViM", "--final-only", "--shared-gpu", "--out", str(out)])
    part = json.loads(out.read_text())
    assert trained == ["nnUNetTrainerMobileViM"] and part["gpu_shared"] is True
    assert [p[p.index("-chk") + 1] for p in predicted] == ["checkpoint_final.pth"]
    assert "--disable_tta" not in predicted[0]
    assert part["rows"][0]["dice"] == {"a": 1.0} and "dice_best" not in part["rows"][0]
    predicted.clear()
    compare.main([*base, "--trainers", "nnUNetTrainerMobileViM_xs", "--out", str(out)])
    assert [p[p.index("-chk") + 1] for p in predicted] == ["checkpoint_final.pth", "checkpoint_best.pth",
                                                           "checkpoint_best.pth"]
    assert json.loads(out.read_text())["gpu_shared"] is False

    # --time-limit: the unfinished trainer is recorded without a prediction, the next one not started, exit 3
    predicted.clear(), trained.clear(), calls.clear()
    limited = [*base, "--final-only", "--time-limit", "600", "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        compare.main([*limited, "--trainers", "nnUNetTrainerMobileViM_xs", "nnUNetTrainerMultiSegMamba"])
    assert stop.value.code == 3
    rows = json.loads(out.read_text())["rows"]
    assert [(r["spec"], r.get("incomplete")) for r in rows] == [("nnUNetTrainerMobileViM_xs", None),
                                                                 ("nnUNetTrainerMultiSegMamba", True)]
    assert len(predicted) == 1 and "nnUNetTrainerMobileViM_xs" in predicted[0]
    assert all(0 < a[-2] <= 600 for a in calls) and not any(a[-1] for a in calls)  # seconds_left, resume
    # the same command with --continue passes resume on and finishes
    predicted.clear(), calls.clear()
    compare.main([*limited, "--continue", "--trainers", "nnUNetTrainerMultiSegMamba"])
    assert calls[0][-1] is True and json.loads(out.read_text())["rows"][0]["dice"] == {"a": 1.0}
    # out of time before a trainer starts: recorded as not started, nothing trained
    trained.clear()
    with pytest.raises(SystemExit):
        compare.main([*base, "--time-limit", "0", "--out", str(out), "--trainers", "nnUNetTrainerMobileViM_xs"])
    assert trained == [] and json.loads(out.read_text())["rows"][0]["epochs_done"] is None
