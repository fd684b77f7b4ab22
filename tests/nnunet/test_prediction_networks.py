"""``nnunet.prediction_networks``: the network a checkpoint's trainer builds for prediction, without
importing the trainer. Every trainer of this package (and nnU-Net's default) is listed, and each entry
builds exactly what the trainer's own ``build_network_architecture(..., enable_deep_supervision=False)``
builds: the same module types, parameter names and shapes, and with the same weights the same logits,
in 3D and 2D; the prediction command stays free of nnU-Net's trainer module."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from test_device_pipeline import PLANS

from nnunetv2_mobilevim.ext_trainers import nnunetv2_mobilevim_trainers as shim
from nnunetv2_mobilevim.nnunet.prediction_networks import (
    BUILDERS,
    build_with_trainer,
    find_trainer_class,
    network_for_prediction,
)

TRAINERS = sorted(["nnUNetTrainer", *(n for n in dir(shim) if n.startswith("nnUNetTrainer"))])
EXAMPLE = json.loads((Path(__file__).parents[2] / "nnunetv2_mobilevim" / "nnunet" / "example_plans.json").read_text())
PATCHES = {"3d_fullres": [16, 64, 64], "2d": [256, 256]}


def small_plans(configuration: str):
    """The example (Synapse) plan's architecture with an eighth of its features and a small patch."""
    plans = copy.deepcopy(PLANS)
    config = copy.deepcopy(plans["configurations"]["3d_fullres"])
    arch = copy.deepcopy(EXAMPLE["configurations"][configuration]["configuration"]["architecture"])
    arch["arch_kwargs"]["features_per_stage"] = [max(4, f // 8) for f in arch["arch_kwargs"]["features_per_stage"]]
    config.update(architecture=arch, patch_size=PATCHES[configuration])
    if configuration == "2d":
        config["spacing"] = config["spacing"][1:]
    plans["configurations"] = {configuration: config}
    pm = PlansManager(plans)
    return pm, pm.get_configuration(configuration)


def test_every_trainer_of_the_package_is_listed():
    assert set(BUILDERS) == set(TRAINERS)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
@pytest.mark.parametrize("name", TRAINERS)
def test_listed_network_is_what_the_trainer_builds(name, configuration):
    pm, cm = small_plans(configuration)
    torch.manual_seed(0)
    theirs = build_with_trainer(find_trainer_class(name), pm, cm, 2, 3).eval()
    ours = network_for_prediction(name, pm, cm, 2, 3).eval()
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 2, *cm.patch_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_another_trainer_is_built_by_its_own_method(monkeypatch):
    """A name not in the table (a user's subclass, here one of nnU-Net's variants) goes to its trainer."""
    pm, cm = small_plans("3d_fullres")
    name = "nnUNetTrainer_250epochs"
    assert name not in BUILDERS
    called = []
    cls = find_trainer_class(name)
    original = cls.build_network_architecture

    def spy(plans_manager, configuration_manager, num_input_channels, num_output_channels,
            enable_deep_supervision=True):
        called.append(enable_deep_supervision)
        return original(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                        enable_deep_supervision)

    monkeypatch.setattr(cls, "build_network_architecture", staticmethod(spy))
    network = network_for_prediction(name, pm, cm, 2, 3)
    assert called == [False] and type(network).__name__ == "PlainConvUNet"


def test_predict_command_does_not_import_nnunets_trainer_or_predictor_module():
    """What makes a CPU prediction's start fast: the command's module, the predictor, the table, every network
    family and a MobileViM forward import neither nnU-Net's trainer module (torch._dynamo, plotting) nor its
    predictor module, nor torch._dynamo itself."""
    code = """
import sys, torch
from nnunetv2_mobilevim.cli import predict
from nnunetv2_mobilevim.nnunet import predictor, prediction_networks, device_pipeline, resampling
from nnunetv2_mobilevim.networks import mobilevim, umamba, taming
from nnunetv2_mobilevim.acceleration import inference
net = mobilevim.mobilevim_from_plan([[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [32, 32, 32], 1, 2, False)
with torch.no_grad():
    net.eval()(torch.randn(1, 1, 32, 32, 32))
print([m for m in ('torch._dynamo', 'seaborn', 'nnunetv2.training.nnUNetTrainer.nnUNetTrainer',
                   'nnunetv2.inference.predict_from_raw_data') if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
