"""Checkpoints written by earlier versions load: the network's state_dict (names and shapes) must stay
what version 0.1.0 wrote before the package layout changed (recorded from that commit in
``mobilevim_state_dict_v0.1.0.json``). nnU-Net loads ``network_weights`` strictly, so any renamed
module or changed shape would make every existing checkpoint unloadable."""

import json
from pathlib import Path

import pytest
import torch

from nnunetv2_mobilevim import MobileViM

RECORDED = json.loads((Path(__file__).parent / "mobilevim_state_dict_v0.1.0.json").read_text())


@pytest.mark.parametrize("variant", ["s", "xs"])
def test_state_dict_matches_version_0_1_0(variant):
    net = MobileViM(input_channels=1, num_classes=3, variant=variant, deep_supervision=True,
                    strides=[[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
    now = {k: list(t.shape) for k, t in net.state_dict().items()}
    recorded = RECORDED["state_dict"][f"MobileViM_{variant}"]
    assert sorted(set(recorded) - set(now)) == [] and sorted(set(now) - set(recorded)) == []
    assert {k: v for k, v in now.items() if recorded[k] != v} == {}
    # and such a state_dict loads strictly, as nnU-Net's load_checkpoint does
    old = {k: torch.zeros(shape) for k, shape in recorded.items()}
    net.load_state_dict(old, strict=True)
