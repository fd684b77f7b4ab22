"""`nnunetv2_mobilevim list` and `summary --network`, as a user runs them: every shipped trainer, its
paper and recipe, and parameter counts on the example plans that match the papers' (Taming Mambas
Table 5 for U-Mamba on its Synapse plan)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from nnunetv2_mobilevim.cli.listing import build_network, example_plans, find_trainer, initialisers_skipped
from nnunetv2_mobilevim.ext_trainers import nnunetv2_mobilevim_trainers as shim


def run(*args):
    return subprocess.run([sys.executable, "-m", "nnunetv2_mobilevim.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_list_names_every_shipped_trainer_with_counts_for_both_dimensions():
    res = run("list", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["trainer"]: r for r in json.loads(res.stdout)}
    shipped = {k for k in vars(shim) if k.startswith("nnUNetTrainer")}
    assert set(rows) == shipped and len(shipped) >= 22
    for name, paper in (("nnUNetTrainerUMambaBot", 41.95e6), ("nnUNetTrainerUMambaEnc", 42.85e6),
                        ("nnUNetTrainerBiSegMamba", 64.75e6)):
        assert abs(rows[name]["params"]["3d_fullres"] / paper - 1) <= 0.02, (name, rows[name]["params"])
    for row in rows.values():  # every network builds in 2D and 3D, and says whose it is and how it trains
        assert row["params"]["3d_fullres"] and row["params"]["2d"], row
        assert row["paper"] and row["recipe"]
    assert rows["nnUNetTrainerUMambaEnc_NoMamba"]["network"] == "UMambaEncNoMamba"
    assert rows["nnUNetTrainerMultiSegMamba_NoMamba"]["network"] == "TamingMultiSegMambaNoMamba"
    assert rows["nnUNetTrainerMultiSegMamba_Paper"]["recipe"].startswith("the paper's: RAdam")
    assert rows["nnUNetTrainerMultiSegMamba_NoMamba"]["params"]["3d_fullres"] < \
        rows["nnUNetTrainerMultiSegMamba"]["params"]["3d_fullres"]


def test_summary_of_a_network_by_its_trainer():
    res = run("summary", "--network", "nnUNetTrainerUMambaBot", "-c", "2d", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["network"] == "UMambaBot" and info["patch"] == [512, 512] and info["classes"] == 14
    assert info["output_shapes"][0] == [1, 14, 512, 512]
    res = run("summary", "--network", "nnUNetTrainerNoSuchNetwork")
    assert res.returncode == 2 and "nnunetv2_mobilevim list" in res.stderr


def test_networks_built_for_listing_leave_pytorchs_initialisers_as_they_were():
    """``list`` skips the initialisers on the meta device; afterwards (also after a builder that fails) a
    network built on the CPU is initialised as before: the same weights as one built without ``list``."""
    before = {n: getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")}
    with pytest.raises(RuntimeError, match="builder failed"):
        with initialisers_skipped():
            raise RuntimeError("builder failed")
    build_network(find_trainer("nnUNetTrainerUMambaBot"), example_plans()["2d"])
    assert {n: getattr(nn.init, n) for n in before} == before
    torch.manual_seed(0)
    weights = nn.Conv3d(2, 4, 3).weight.detach().clone()
    torch.manual_seed(0)
    with torch.device("meta"), initialisers_skipped():
        nn.Conv3d(2, 4, 3)
    torch.manual_seed(0)
    assert torch.equal(nn.Conv3d(2, 4, 3).weight, weights) and weights.abs().sum() > 0
