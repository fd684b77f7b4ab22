"""``nnunetv2_mobilevim predict``: ``nnUNetv2_predict`` with the same flags and outputs, for any model
trained with nnU-Net (this package's trainers, also without ``nnUNet_extTrainer``, and nnU-Net's own;
``nnunet.predictor``). Preprocessing and export run on the device with I/O in background threads
(``Predictor.predict_folder``) wherever ``nnunet.device_pipeline`` reproduces the configuration, otherwise
nnU-Net's own pipeline runs, which the command says; ``NNUNETV2_MOBILEVIM_DEVICE_PIPELINE=0`` asks for
nnU-Net's pipeline, ``=1`` requires the device pipeline. Prints one summary line: cases, seconds per
case, device, pipeline."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``nnUNetv2_predict``'s flags, with its names, defaults and meaning."""
    p.add_argument("-i", required=True, help="input folder (files named CASE_XXXX.ext, as in imagesTr)")
    p.add_argument("-o", required=True, help="output folder (created if missing)")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer the model was trained with (default nnUNetTrainer)")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds to ensemble (default 0 1 2 3 4)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (faster, usually worse)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--save_probabilities", action="store_true", help="also write .npz probabilities and .pkl")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose output exists")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("-npp", type=int, default=None,
                   help="preprocessing processes (default 3, nnUNet_npp; none for a single case)")
    p.add_argument("-nps", type=int, default=None,
                   help="export processes (default 3, nnUNet_nps; none for a single case)")
    p.add_argument("-prev_stage_predictions", default=None, help="the previous stage's predictions (cascade)")
    p.add_argument("-num_parts", type=int, default=1, help="split the cases into this many parts ...")
    p.add_argument("-part_id", type=int, default=0, help="... and predict this one (0-based)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--not_on_device", action="store_true", help="keep the sliding window's logits in host memory")


def _processes(args: argparse.Namespace, file_ending: str) -> tuple:
    """-npp and -nps as given; unset: nnU-Net's defaults (3, or ``nnUNet_npp`` / ``nnUNet_nps``), except for
    a single case without a previous stage, which runs in this process: worker processes start by importing
    torch and nnU-Net again and have nothing to overlap for one case (docs/nnunet.md has the measurement)."""
    npp, nps = args.npp, args.nps
    if npp is None and nps is None and args.prev_stage_predictions is None and os.path.isdir(args.i):
        from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

        if len(create_lists_from_splitted_dataset_folder(args.i, file_ending, num_processes=1)) == 1:
            return 0, 0
    return (_env_int("nnUNet_npp", 3) if npp is None else npp), (_env_int("nnUNet_nps", 3) if nps is None else nps)


def _choose_pipeline(predictor, args: argparse.Namespace) -> str:
    """"device" (``Predictor.predict_folder``) or "nnU-Net" (nnU-Net's own pipeline), from the switch and
    what ``device_pipeline.unsupported`` says about the configuration; a fallback is said."""
    from ..nnunet.device_pipeline import unsupported
    from ..nnunet.switches import device_pipeline_switch

    wanted = device_pipeline_switch()
    if wanted is False:
        return "nnU-Net"
    reason = unsupported(predictor.plans_manager, predictor.configuration_manager)
    if reason is None and args.prev_stage_predictions is not None:
        reason = "-prev_stage_predictions was given"
    if reason is None and args.not_on_device:
        reason = "--not_on_device keeps the sliding window's logits in host memory"
    if reason is None:
        return "device"
    if wanted:
        raise ValueError(f"NNUNETV2_MOBILEVIM_DEVICE_PIPELINE=1, but the device pipeline cannot run here: {reason}. "
                         "Unset it to let nnU-Net's pipeline run.")
    print(f"nnunetv2_mobilevim predict: nnU-Net's own preprocessing and export run ({reason})", flush=True)
    return "nnU-Net"


def _predict_with_nnunet(predictor, args: argparse.Namespace, ending: str) -> None:
    npp, nps = _processes(args, ending)
    predictor = predictor.nnunet_predictor()
    if npp == 0 and nps == 0:
        predictor.predict_from_files_sequential(args.i, args.o, save_probabilities=args.save_probabilities,
                                                overwrite=not args.continue_prediction,
                                                folder_with_segs_from_prev_stage=args.prev_stage_predictions)
    else:
        predictor.predict_from_files(args.i, args.o, save_probabilities=args.save_probabilities,
                                     overwrite=not args.continue_prediction, num_processes_preprocessing=npp,
                                     num_processes_segmentation_export=nps,
                                     folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                                     num_parts=args.num_parts, part_id=args.part_id)


def run_predict(args: argparse.Namespace) -> int:
    import torch
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from ..nnunet.predictor import Predictor

    if not 0 <= args.part_id < args.num_parts:
        raise ValueError(f"-part_id must be in [0, -num_parts), got {args.part_id} of {args.num_parts}")
    folds = [f if f == "all" else int(f) for f in args.f]
    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    if not os.path.isdir(model_folder):
        raise ValueError(f"no trained model in {model_folder}: check -d, -tr, -p, -c (and nnUNet_results)")
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # as nnUNetv2_predict: all cores for the CPU
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("-device cuda, but PyTorch sees no CUDA device: use -device cpu")
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    device = torch.device(args.device)
    Path(args.o).mkdir(parents=True, exist_ok=True)
    predictor = Predictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                          perform_everything_on_device=not args.not_on_device, device=device, verbose=args.verbose,
                          verbose_preprocessing=args.verbose, allow_tqdm=not args.disable_progress_bar)
    start = time.perf_counter()
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    ending = predictor.dataset_json["file_ending"]
    before = {p.name: p.stat().st_mtime for p in Path(args.o).glob(f"*{ending}")}
    pipeline = _choose_pipeline(predictor, args)
    if pipeline == "device":
        predictor.predict_folder(args.i, args.o, save_probabilities=args.save_probabilities,
                                 overwrite=not args.continue_prediction, num_parts=args.num_parts,
                                 part_id=args.part_id)
    else:
        _predict_with_nnunet(predictor, args, ending)
    seconds = time.perf_counter() - start
    written = [p for p in Path(args.o).glob(f"*{ending}") if before.get(p.name) != p.stat().st_mtime]
    per_case = f", {seconds / len(written):.2f} s per case" if written else ""
    print(f"nnunetv2_mobilevim predict: {len(written)} case(s) in {seconds:.1f} s{per_case}, device {device}, "
          f"{pipeline} pipeline, model {Path(model_folder).name}, folds {' '.join(map(str, folds))}")
    return 0
