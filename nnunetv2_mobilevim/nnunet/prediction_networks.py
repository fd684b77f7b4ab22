"""The network a trained model's checkpoint names, built for prediction without importing its trainer.

nnU-Net's predictor imports the trainer class that a checkpoint names and calls its
``build_network_architecture``. Importing any trainer imports nnU-Net's trainer module and with it
torch._dynamo, nnU-Net's predictor and its logger's plotting libraries: seconds of a CPU prediction
(docs/nnunet.md, "Prediction", on the CPU). The trainers whose network is a
function of the plan alone are therefore listed here with that function; deliberately a table, since a
checkpoint stores only the trainer's name and a lookup by name is what nnU-Net's design leaves. Any
other name (a user's subclass, nnU-Net's variants) is built by its trainer, found as nnU-Net finds it.
``tests/nnunet/test_prediction_networks.py`` checks that every trainer of this package is listed and that
each entry builds what its trainer builds.
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

# (configuration_manager, input channels, segmentation heads) -> the network without deep supervision
Builder = Callable[[object, int, int], nn.Module]


def for_prediction(network: nn.Module) -> nn.Module:
    """How this package's trainers hand their network to a predictor: BatchNorm folded and replayed from a
    CUDA graph (``acceleration.inference.FastInference``: the same logits and state_dict; active only in eval
    mode on CUDA) unless ``NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0``."""
    from ..acceleration.inference import FastInference
    from .switches import cuda_graphs_enabled

    return FastInference(network) if cuda_graphs_enabled() else network


def _nnunet(cm, inputs: int, outputs: int) -> nn.Module:
    """``nnUNetTrainer.build_network_architecture``: the plan's architecture class and arguments."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, inputs, outputs, allow_init=True,
                                  deep_supervision=False)


def _nnunet_accelerated(cm, inputs: int, outputs: int) -> nn.Module:
    """``nnUNetTrainer_Accelerated``: nnU-Net's network, handed over as this package's trainers hand theirs."""
    return for_prediction(_nnunet(cm, inputs, outputs))


def _mobilevim(variant: str) -> Builder:
    def build(cm, inputs: int, outputs: int) -> nn.Module:
        from ..networks.mobilevim.network import mobilevim_from_plan

        return for_prediction(mobilevim_from_plan(cm.pool_op_kernel_sizes, cm.patch_size, inputs, outputs, False,
                                                  variant=variant))
    return build


def _umamba(variant: str, mamba: bool) -> Builder:
    def build(cm, inputs: int, outputs: int) -> nn.Module:
        from ..networks.umamba import umamba_from_plan

        return for_prediction(umamba_from_plan(cm.network_arch_init_kwargs, cm.patch_size, inputs, outputs, False,
                                               variant=variant, mamba=mamba))
    return build


def _taming(variant: str, mamba: bool) -> Builder:
    def build(cm, inputs: int, outputs: int) -> nn.Module:
        from ..networks.taming import taming_from_plan

        return for_prediction(taming_from_plan(cm.network_arch_init_kwargs, cm.patch_size, inputs, outputs, False,
                                               variant=variant, mamba=mamba))
    return build


BUILDERS: Dict[str, Builder] = {
    "nnUNetTrainer": _nnunet,
    "nnUNetTrainer_DeviceAug": _nnunet,
    "nnUNetTrainer_Accelerated": _nnunet_accelerated,
    **{name: _mobilevim("s") for name in
       ("nnUNetTrainerMobileViM", "nnUNetTrainerMobileViM_SGD", "nnUNetTrainerMobileViM_smoke")},
    **{name: _mobilevim("xs") for name in ("nnUNetTrainerMobileViM_xs", "nnUNetTrainerMobileViM_xs_SGD")},
    **{f"nnUNetTrainerUMamba{stem}{twin}": _umamba(stem.lower(), not twin)
       for stem in ("Bot", "Enc") for twin in ("", "_NoMamba")},
    **{f"nnUNetTrainer{stem}{suffix}": _taming(variant, suffix != "_NoMamba")
       for stem, variant in (("TamingSegMamba", "segmamba"), ("BiSegMamba", "bisegmamba"),
                             ("MultiSegMamba", "multisegmamba"), ("SegMambaSkip", "segmambaskip"))
       for suffix in ("", "_NoMamba", "_Paper")},
}


def network_for_prediction(trainer_name: str, plans_manager, configuration_manager, num_input_channels: int,
                           num_output_channels: int) -> nn.Module:
    """What ``trainer_name``'s ``build_network_architecture(..., enable_deep_supervision=False)`` returns, for
    the trainers in ``BUILDERS`` without importing them; for any other name, by that method."""
    build = BUILDERS.get(trainer_name)
    if build is not None:
        return build(configuration_manager, num_input_channels, num_output_channels)
    return build_with_trainer(find_trainer_class(trainer_name), plans_manager, configuration_manager,
                              num_input_channels, num_output_channels)


def find_trainer_class(name: str) -> type:
    """The trainer class ``name`` (as a checkpoint stores it): this package's trainers and nnU-Net's
    ``nnUNetTrainer`` by import; any other name by nnU-Net's own search (the modules under
    ``nnunetv2.training.nnUNetTrainer`` and the ``nnUNet_extTrainer`` folders)."""
    if name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    from . import device_augmentation, nnunet_network_trainers, taming_trainers, trainers, umamba_trainers

    for module in (trainers, umamba_trainers, taming_trainers, device_augmentation, nnunet_network_trainers):
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)


def build_with_trainer(trainer_class: type, plans_manager, configuration_manager, inputs: int,
                       outputs: int) -> nn.Module:
    """``trainer_class.build_network_architecture`` for prediction, in either of nnU-Net's signatures."""
    import inspect
    import warnings

    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(plans_manager, configuration_manager, inputs, outputs,
                                                        enable_deep_supervision=False)
    warnings.warn(f"{trainer_class.__name__} uses nnU-Net's old build_network_architecture signature",
                  DeprecationWarning, stacklevel=2)
    return trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, inputs, outputs, enable_deep_supervision=False)


__all__ = ["BUILDERS", "build_with_trainer", "find_trainer_class", "for_prediction", "network_for_prediction"]
