"""nnU-Net's predictor for any trained nnU-Net model, finding this package's trainers by import.

    predictor = Predictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cuda"))
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    predictor.predict_from_files(input_folder, output_folder, ...)        # nnU-Net's own, unchanged

nnU-Net finds the trainer class named in a checkpoint by searching the modules under
``nnunetv2.training.nnUNetTrainer`` and the ``nnUNet_extTrainer`` folders, so a MobileViM model
predicts only where that variable is set. ``find_trainer_class`` imports this package's trainers and
nnU-Net's default trainer directly and searches like nnU-Net for any other name (no faster than
nnU-Net's search once its predictor module is imported: docs/benchmarks/devcpu_trainer_search.txt).
Everything else is nnU-Net's ``nnUNetPredictor``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def find_trainer_class(name: str) -> type:
    """The trainer class ``name`` (as a checkpoint stores it): this package's trainers and nnU-Net's
    ``nnUNetTrainer`` by import; any other name by nnU-Net's own search."""
    if name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    from . import device_augmentation, trainers

    for module in (trainers, device_augmentation):
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)


class Predictor(nnUNetPredictor):
    """``nnUNetPredictor`` whose ``initialize_from_trained_model_folder`` finds the trainer with
    ``find_trainer_class``. Deliberately a re-written method, not a call to nnU-Net's: its trainer
    search is a module-level call inside it. What it sets up is nnU-Net's (``manual_initialization``)."""

    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: Optional[Sequence[Union[int, str]]],
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        if isinstance(use_folds, (str, int)):
            use_folds = [use_folds]
        folder = str(model_training_output_dir)
        dataset_json = _load_json(os.path.join(folder, "dataset.json"))
        plans_manager = PlansManager(_load_json(os.path.join(folder, "plans.json")))
        parameters, trainer_name, configuration, mirroring = [], None, None, None
        for i, fold in enumerate(use_folds):
            fold = fold if fold == "all" else int(fold)
            path = os.path.join(folder, f"fold_{fold}", checkpoint_name)
            if not os.path.isfile(path):
                raise ValueError(f"{path} does not exist: train fold {fold} first, or choose folds with -f and "
                                 "the checkpoint with -chk")
            checkpoint = torch.load(path, map_location=torch.device("cpu"), weights_only=False)
            if i == 0:
                trainer_name = checkpoint["trainer_name"]
                configuration = checkpoint["init_args"]["configuration"]
                mirroring = checkpoint.get("inference_allowed_mirroring_axes")
            parameters.append(checkpoint["network_weights"])
        configuration_manager = plans_manager.get_configuration(configuration)
        inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        trainer_class = find_trainer_class(trainer_name)
        network = _build_network(trainer_class, plans_manager, configuration_manager, inputs, outputs)
        network.load_state_dict(parameters[0])  # as nnU-Net does before the first case (its issue 2520)
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   trainer_name, mirroring)


def _build_network(trainer_class: type, plans_manager, configuration_manager, inputs: int, outputs: int):
    """``trainer_class.build_network_architecture`` for prediction, in either of nnU-Net's signatures."""
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(plans_manager, configuration_manager, inputs, outputs,
                                                        enable_deep_supervision=False)
    warnings.warn(f"{trainer_class.__name__} uses nnU-Net's old build_network_architecture signature",
                  DeprecationWarning, stacklevel=2)
    return trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, inputs, outputs, enable_deep_supervision=False)


def _load_json(path: str) -> dict:
    import json

    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: is this the folder of a model trained with nnU-Net?")
    with open(path) as f:
        return json.load(f)


__all__: Tuple[str, ...] = ("Predictor", "find_trainer_class")
