"""nnU-Net's predictor for any trained nnU-Net model, with the whole per-case pipeline on the device.

    predictor = Predictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cuda"))
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    predictor.predict_folder(input_folder, output_folder, save_probabilities=False)   # this module's pipeline
    predictor.predict_from_files(input_folder, output_folder, ...)                    # nnU-Net's own, unchanged

``predict_folder``: images are read and outputs written in background threads while the device works;
preprocessing and export run on the device (``device_pipeline``); the sliding window, its Gaussian
weighting, mirroring and the fold ensemble are nnU-Net's own methods, given the preprocessed tensor on
the device (all folds share one preprocessing). A step that runs out of GPU memory is redone with
nnU-Net's CPU code for that case, which is said once.

nnU-Net finds the trainer class named in a checkpoint by searching the modules under
``nnunetv2.training.nnUNetTrainer`` and the ``nnUNet_extTrainer`` folders, so a MobileViM model
predicts only where that variable is set. ``find_trainer_class`` imports this package's trainers and
nnU-Net's default trainer directly and searches like nnU-Net for any other name (no faster than
nnU-Net's search once its predictor module is imported: docs/benchmarks/devcpu_trainer_search.txt).
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple, Union

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


    # -- this module's pipeline -------------------------------------------------------------------------
    def predict_folder(self, source_folder: str, output_folder: str, save_probabilities: bool = False,
                       overwrite: bool = True, num_parts: int = 1, part_id: int = 0, read_ahead: int = 2,
                       on_case: Optional[Callable[[str, float], None]] = None) -> List[str]:
        """``predict_from_files(source_folder, output_folder, ...)`` with ``device_pipeline`` (which must
        support the configuration: ``device_pipeline.unsupported``) and I/O in threads: up to ``read_ahead``
        cases are read ahead and their outputs written behind. Returns the output files' truncated names;
        ``on_case(name, seconds)`` is called as each case's outputs are queued for writing."""
        from batchgenerators.utilities.file_and_folder_operations import save_json
        from nnunetv2.utilities.json_export import recursive_fix_for_json_export

        from .device_pipeline import DevicePipeline

        pipeline = DevicePipeline(self.plans_manager, self.configuration_manager, self.dataset_json, self.device)
        os.makedirs(output_folder, exist_ok=True)
        arguments = {"list_of_lists_or_source_folder": source_folder, "output_folder": output_folder,
                     "save_probabilities": save_probabilities, "overwrite": overwrite, "num_parts": num_parts,
                     "part_id": part_id, "pipeline": "nnunetv2_mobilevim device pipeline"}
        recursive_fix_for_json_export(arguments)
        save_json(arguments, os.path.join(output_folder, "predict_from_raw_data_args.json"))
        save_json(self.dataset_json, os.path.join(output_folder, "dataset.json"), sort_keys=False)
        save_json(self.plans_manager.plans, os.path.join(output_folder, "plans.json"), sort_keys=False)
        inputs, outputs, _ = self._manage_input_and_output_lists(source_folder, output_folder, None, overwrite,
                                                                 part_id, num_parts, save_probabilities)
        reader = self.plans_manager.image_reader_writer_class()
        ending = self.dataset_json["file_ending"]
        with ThreadPoolExecutor(1, thread_name_prefix="read") as reading, \
                ThreadPoolExecutor(2, thread_name_prefix="write") as writing:
            ahead: deque = deque(reading.submit(reader.read_images, files) for files in inputs[:read_ahead])
            behind: deque = deque()
            for i, out in enumerate(outputs):
                start = time.perf_counter()
                image, properties = ahead.popleft().result()
                if i + read_ahead < len(inputs):
                    ahead.append(reading.submit(reader.read_images, inputs[i + read_ahead]))
                seg, probabilities = self._predict_case(pipeline, image, properties, save_probabilities,
                                                        os.path.basename(out))
                while len(behind) >= 2:  # bound the outputs held in memory
                    behind.popleft().result()
                behind.append(writing.submit(_write_case, reader, seg, probabilities, properties, out, ending))
                if on_case is not None:
                    on_case(os.path.basename(out), time.perf_counter() - start)
            for future in behind:
                future.result()
        return outputs

    def _predict_case(self, pipeline, image, properties: dict, save_probabilities: bool,
                      name: str) -> Tuple:
        """One case: preprocessing, the fold ensemble's logits and the export, each on the device; a step
        that runs out of GPU memory is redone with nnU-Net's CPU code (said once per step)."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        try:
            data = pipeline.preprocess(image, properties)
        except torch.OutOfMemoryError:
            self._cpu_step_once("preprocessing", name)
            data = self._preprocess_on_cpu(image, properties)
        logits = self._ensemble_logits(data)
        del data
        try:
            return pipeline.export(logits, properties, save_probabilities)
        except torch.OutOfMemoryError:
            self._cpu_step_once("export", name)
            ret = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits.cpu(), self.plans_manager, self.configuration_manager, self.label_manager, properties,
                return_probabilities=save_probabilities)
            return ret if save_probabilities else (ret, None)

    def _preprocess_on_cpu(self, image, properties: dict) -> torch.Tensor:
        """nnU-Net's own preprocessing of a test case (numpy, CPU)."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        data, _, _ = preprocessor.run_case_npy(image, None, properties, self.plans_manager,
                                               self.configuration_manager, self.dataset_json)
        return torch.from_numpy(data)

    @torch.inference_mode()
    def _ensemble_logits(self, data: torch.Tensor) -> torch.Tensor:
        """``predict_logits_from_preprocessed_data`` keeping the sum on the device: the mean over folds of
        nnU-Net's sliding-window logits (float16, as nnU-Net accumulates them)."""
        total = None
        for params in self.list_of_parameters:
            getattr(self.network, "_orig_mod", self.network).load_state_dict(params)
            logits = self.predict_sliding_window_return_logits(data)
            if total is None:
                total = logits
            else:
                total += logits.to(total.device)
        if len(self.list_of_parameters) > 1:
            total /= len(self.list_of_parameters)
        return total

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's test-time mirroring of one tile x (1, C, *patch) with the mirrored copies in one batch
        (one forward of up to 8 samples instead of 8 forwards of one), summed in nnU-Net's order. The same
        logits up to the network's float rounding per batch size. Deliberately not nnU-Net's method, which
        runs one forward per mirroring; if the batch does not fit in memory, nnU-Net's method runs (said
        once)."""
        axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if not axes or x.shape[0] != 1 or self.__dict__.get("_mirror_one_by_one"):
            return super()._internal_maybe_mirror_and_predict(x)
        assert max(axes) <= x.ndim - 3, "mirror_axes does not match the dimension of the input!"
        combos = [c for i in range(len(axes)) for c in itertools.combinations([m + 2 for m in axes], i + 1)]
        try:
            out = self.network(torch.cat([x, *[torch.flip(x, c) for c in combos]]))
        except torch.OutOfMemoryError:
            self._mirror_one_by_one = True
            torch.cuda.empty_cache()
            print(f"the {len(combos) + 1} mirrored copies of a tile do not fit in {self.device} memory together; "
                  "predicting them one by one as nnU-Net does (the same result, slower)", flush=True)
            return super()._internal_maybe_mirror_and_predict(x)
        prediction = out[:1].clone()
        for i, c in enumerate(combos):
            prediction += torch.flip(out[i + 1:i + 2], c)
        return prediction / (len(combos) + 1)

    def _cpu_step_once(self, step: str, name: str) -> None:
        told = self.__dict__.setdefault("_told", set())
        if step not in told:
            told.add(step)
            print(f"{name}: the {step} does not fit in {self.device} memory; nnU-Net's CPU code does this step for "
                  "such cases (the same result, slower)", flush=True)
        torch.cuda.empty_cache()


def _write_case(reader, seg, probabilities, properties: dict, out: str, ending: str) -> None:
    """What nnU-Net's ``export_prediction_from_logits`` writes: the segmentation and, if given, the
    probabilities (.npz) with the properties (.pkl)."""
    if probabilities is not None:
        import numpy as np
        from batchgenerators.utilities.file_and_folder_operations import save_pickle

        np.savez_compressed(out + ".npz", probabilities=probabilities)
        save_pickle(properties, out + ".pkl")
    reader.write_seg(seg, out + ending, properties)


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
