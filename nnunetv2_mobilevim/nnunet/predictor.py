"""nnU-Net's predictor for any trained nnU-Net model, with the whole per-case pipeline on the device.

    predictor = Predictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cuda"))
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    predictor.predict_folder(input_folder, output_folder, save_probabilities=False)   # this module's pipeline
    predictor.nnunet_predictor().predict_from_files(input_folder, output_folder, ...)  # nnU-Net's own, unchanged

``predict_folder``: images are read and outputs written in background threads while the device works;
preprocessing and export run on the device (``device_pipeline``); the sliding window is nnU-Net's
(its tiles, Gaussian weighting, float16 accumulation, test-time mirroring, fold ensemble), on the
preprocessed tensor on the device (all folds share one preprocessing). A step that runs out of GPU
memory is redone with nnU-Net's CPU code for that case, which is said once.

Deliberately not a subclass of nnU-Net's ``nnUNetPredictor``: its module imports torch._dynamo and nnU-Net's
preprocessing workers, and nnU-Net's predictor imports the checkpoint's trainer class, whose module imports
nnU-Net's trainer and plotting libraries: on a CPU, seconds of predicting one case (docs/nnunet.md,
"Prediction"). So this class re-writes nnU-Net's sliding window with the same arithmetic
(``tests/nnunet/test_predict_folder.py`` checks the logits against nnU-Net's, bit for bit where the network
is the same), builds the network with ``prediction_networks`` and imports nnU-Net's predictor only for
nnU-Net's own pipeline (``nnunet_predictor``).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn


class Predictor:
    """``nnUNetPredictor``'s constructor, ``initialize_from_trained_model_folder``, ``manual_initialization``
    and sliding window (``predict_sliding_window_return_logits``) with nnU-Net's arguments and attributes,
    plus ``predict_folder`` (this module's pipeline) and ``nnunet_predictor`` (nnU-Net's own)."""

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True):
        self.tile_step_size, self.use_gaussian, self.use_mirroring = tile_step_size, use_gaussian, use_mirroring
        self.verbose, self.verbose_preprocessing, self.allow_tqdm = verbose, verbose_preprocessing, allow_tqdm
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.device = device
        self.perform_everything_on_device = perform_everything_on_device and device.type == "cuda"
        self.plans_manager = self.configuration_manager = self.list_of_parameters = self.network = None
        self.dataset_json = self.trainer_name = self.allowed_mirroring_axes = self.label_manager = None
        self._mirror_one_by_one = False
        self._told: set = set()
        self._loaded_fold: Optional[int] = None  # which of list_of_parameters the network holds

    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: Optional[Sequence[Union[int, str]]],
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        """nnU-Net's method: the plans, dataset.json and every fold's weights of a model folder, the network
        its trainer builds (``prediction_networks.network_for_prediction``)."""
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from .prediction_networks import network_for_prediction

        folder = str(model_training_output_dir)
        if use_folds is None:
            use_folds = _available_folds(folder, checkpoint_name)
        if isinstance(use_folds, (str, int)):
            use_folds = [use_folds]
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
        network = network_for_prediction(trainer_name, plans_manager, configuration_manager, inputs, outputs)
        network.load_state_dict(parameters[0])  # as nnU-Net does before the first case (its issue 2520)
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   trainer_name, mirroring)
        self._loaded_fold = 0

    def manual_initialization(self, network: nn.Module, plans_manager, configuration_manager,
                              parameters: Optional[List[dict]], dataset_json: dict, trainer_name: str,
                              inference_allowed_mirroring_axes: Optional[Tuple[int, ...]]) -> None:
        """nnU-Net's method, the same attributes; torch.compile where ``nnUNet_compile`` asks for it."""
        self.plans_manager, self.configuration_manager = plans_manager, configuration_manager
        self.list_of_parameters, self.network, self.dataset_json = parameters, network, dataset_json
        self.trainer_name, self.allowed_mirroring_axes = trainer_name, inference_allowed_mirroring_axes
        self._loaded_fold = None
        self.label_manager = plans_manager.get_label_manager(dataset_json)
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and not hasattr(network, "_orig_mod"):
            print("Using torch.compile")
            self.network = torch.compile(network)

    def nnunet_predictor(self):
        """nnU-Net's own ``nnUNetPredictor`` with this one's settings, network and weights: its pipeline
        (worker processes, the cascade, ``--not_on_device``) for what ``device_pipeline`` does not do."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(self.tile_step_size, self.use_gaussian, self.use_mirroring,
                                    self.perform_everything_on_device, self.device, self.verbose,
                                    self.verbose_preprocessing, self.allow_tqdm)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager,
                                        self.list_of_parameters, self.dataset_json, self.trainer_name,
                                        self.allowed_mirroring_axes)
        return predictor

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
        inputs, outputs = self._case_lists(source_folder, output_folder, overwrite, part_id, num_parts,
                                           save_probabilities)
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

    def _case_lists(self, source_folder: str, output_folder: str, overwrite: bool, part_id: int, num_parts: int,
                    save_probabilities: bool) -> Tuple[List[List[str]], List[str]]:
        """nnU-Net's ``_manage_input_and_output_lists`` for a folder (the same cases, order, part and messages):
        each case's image files and its output path without the file ending; without ``overwrite`` only the
        cases whose outputs (.npz too with ``save_probabilities``) are not there yet."""
        from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

        ending = self.dataset_json["file_ending"]
        cases = create_lists_from_splitted_dataset_folder(source_folder, ending)
        print(f"There are {len(cases)} cases in the source folder")
        cases = cases[part_id::num_parts]
        print(f"I am process {part_id} out of {num_parts} (max process ID is {num_parts - 1}, we start counting "
              "with 0!)")
        print(f"There are {len(cases)} cases that I would like to predict")
        outputs = [os.path.join(output_folder, os.path.basename(c[0])[:-(len(ending) + 5)]) for c in cases]
        if not overwrite:
            todo = [i for i, out in enumerate(outputs) if not (os.path.isfile(out + ending) and (
                not save_probabilities or os.path.isfile(out + ".npz")))]
            cases, outputs = [cases[i] for i in todo], [outputs[i] for i in todo]
            print(f"overwrite was set to {overwrite}, so I am only working on cases that haven't been predicted yet. "
                  f"That's {len(todo)} cases.")
        return cases, outputs

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
        for i, params in enumerate(self.list_of_parameters):
            if self._loaded_fold != i:  # a single fold stays loaded from case to case (nnU-Net reloads it)
                getattr(self.network, "_orig_mod", self.network).load_state_dict(params)
                self._loaded_fold = i
            logits = self.predict_sliding_window_return_logits(data)
            if total is None:
                total = logits
            else:
                total += logits.to(total.device)
        if len(self.list_of_parameters) > 1:
            total /= len(self.list_of_parameters)
        return total

    # -- nnU-Net's sliding window ----------------------------------------------------------------------
    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """nnU-Net's method: image (C, *spatial) preprocessed -> logits (K, *spatial) float16, padded to the
        patch where smaller, tiled with nnU-Net's steps, each tile's (mirrored) prediction weighted by
        nnU-Net's Gaussian and accumulated in float16 on the device (in host memory if that does not fit,
        as nnU-Net says), divided by the summed weights."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        assert input_image.ndim == 4, "input_image must be a 4D np.ndarray or torch.Tensor (c, x, y, z)"
        self.network = self.network.to(self.device)
        self.network.eval()
        _empty_cache(self.device)
        # autocast only on CUDA, as nnU-Net (on CPUs it can be slow, on MPS unsupported)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else nullcontext():
            data, revert_padding = pad_nd_image(input_image, self.configuration_manager.patch_size, "constant",
                                                {"value": 0}, True, None)
            slicers = self._sliding_window_slicers(data.shape[1:])
            logits = None
            if self.perform_everything_on_device:
                try:
                    logits = self._accumulate(data, slicers, self.device)
                except RuntimeError:  # retried below, once the failed attempt's device tensors are released
                    print("Prediction on device was unsuccessful, probably due to a lack of memory. "
                          "Moving results arrays to CPU")
            if logits is None:
                _empty_cache(self.device)
                logits = self._accumulate(data, slicers, torch.device("cpu"))
            _empty_cache(self.device)
            return logits[(slice(None), *revert_padding[1:])]

    def _sliding_window_slicers(self, image_size: Sequence[int]) -> List[tuple]:
        """nnU-Net's tiles (``_internal_get_sliding_window_slicers``): index tuples into (C, *image_size),
        the last axis fastest; a 2D patch on a 3D image slides over every slice of the first axis."""
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

        patch = list(self.configuration_manager.patch_size)
        lead = len(image_size) - len(patch)
        assert lead in (0, 1), "the patch may have one axis fewer than the image, not more"
        steps = compute_steps_for_sliding_window(image_size[lead:], patch, self.tile_step_size)
        outer = [[d] for d in range(image_size[0])] if lead else [[]]
        return [(slice(None), *d, *[slice(s, s + p) for s, p in zip(starts, patch)])
                for d in outer for starts in itertools.product(*steps)]

    @torch.inference_mode()
    def _accumulate(self, data: torch.Tensor, slicers: List[tuple], results_device: torch.device) -> torch.Tensor:
        """nnU-Net's ``_internal_predict_sliding_window_return_logits``: the same operations in the same order
        (float32 tile prediction times the float16 Gaussian, added into float16 sums, divided in float16)."""
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian
        from tqdm import tqdm

        data = data.to(results_device)
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half,
                             device=results_device)
        weights = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                    value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
        for sl in tqdm(slicers, disable=not self.allow_tqdm):
            tile = torch.clone(data[sl][None], memory_format=torch.contiguous_format).to(self.device)
            prediction = self._internal_maybe_mirror_and_predict(tile)[0].to(results_device)
            if self.use_gaussian:
                prediction *= gaussian
            logits[sl] += prediction
            weights[sl[1:]] += gaussian
        torch.div(logits, weights, out=logits)
        if torch.any(torch.isinf(logits)):
            raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, reduce "
                               "value_scaling_factor in compute_gaussian or increase the dtype of predicted_logits "
                               "to fp32")
        return logits

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's test-time mirroring of one tile x (1, C, *patch), with the mirrored copies in one batch
        (one forward of up to 8 samples instead of 8 forwards of one), summed in nnU-Net's order: the same
        logits up to the network's float rounding per batch size. If the batch does not fit in memory,
        one forward per copy as nnU-Net does (said once)."""
        axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if not axes:
            return self.network(x)
        assert max(axes) <= x.ndim - 3, "mirror_axes does not match the dimension of the input!"
        combos = [c for i in range(len(axes)) for c in itertools.combinations([m + 2 for m in axes], i + 1)]
        if x.shape[0] == 1 and not self._mirror_one_by_one:
            try:
                out = self.network(torch.cat([x, *[torch.flip(x, c) for c in combos]]))
            except torch.OutOfMemoryError:
                self._mirror_one_by_one = True
                _empty_cache(self.device)
                print(f"the {len(combos) + 1} mirrored copies of a tile do not fit in {self.device} memory "
                      "together; predicting them one by one as nnU-Net does (the same result, slower)", flush=True)
            else:
                prediction = out[:1].clone()
                for i, c in enumerate(combos):
                    prediction += torch.flip(out[i + 1:i + 2], c)
                return prediction / (len(combos) + 1)
        prediction = self.network(x)
        for c in combos:
            prediction += torch.flip(self.network(torch.flip(x, c)), c)
        prediction /= (len(combos) + 1)
        return prediction

    def _cpu_step_once(self, step: str, name: str) -> None:
        if step not in self._told:
            self._told.add(step)
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


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _available_folds(folder: str, checkpoint_name: str) -> List[int]:
    """nnU-Net's ``auto_detect_available_folds``: the numbered folds with that checkpoint."""
    print("use_folds is None, attempting to auto detect available folds")
    folds = [int(d[len("fold_"):]) for d in sorted(os.listdir(folder))  # nnU-Net's order: by name
             if d.startswith("fold_") and d != "fold_all" and os.path.isfile(os.path.join(folder, d, checkpoint_name))]
    print(f"found the following folds: {folds}")
    return folds


def _load_json(path: str) -> dict:
    import json

    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: is this the folder of a model trained with nnU-Net?")
    with open(path) as f:
        return json.load(f)


__all__: Tuple[str, ...] = ("Predictor",)
