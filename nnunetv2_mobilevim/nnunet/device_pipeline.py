"""nnU-Net's per-case preprocessing and export, as tensor operations on the prediction's device.

    nnU-Net (CPU, numpy)                                   here (any torch device)
    DefaultPreprocessor.run_case_npy: transpose -> crop    ``DevicePipeline.preprocess``
      to the non-zero box -> normalise -> resample
    export_prediction_from_logits: resample the logits     ``DevicePipeline.export``
      back -> softmax / argmax -> un-crop -> transpose back

The steps and their order are nnU-Net's; resampling is ``nnunet.resampling`` (nnU-Net's
spline resampling as per-axis matrices), normalisation the same arithmetic in float32 for nnU-Net's
CT, z-score, rescale and no-op schemes (any other scheme runs nnU-Net's own class on the CPU for that
channel). ``unsupported`` names what this pipeline cannot reproduce (another preprocessor or
resampling function, the cascade), for which the predictor keeps nnU-Net's CPU path.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .resampling import resample_like_nnunet

_RESAMPLING = "resample_data_or_seg_to_shape"  # nnU-Net's default, the one ``resample_like_nnunet`` reproduces
_EPS = 1e-8  # nnU-Net's normalisation epsilon for float32


def unsupported(plans_manager, configuration_manager) -> Optional[str]:
    """Why this pipeline cannot reproduce nnU-Net's preprocessing / export for this configuration, or None."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    config = configuration_manager.configuration
    if configuration_manager.preprocessor_class is not DefaultPreprocessor:
        return f"the preprocessor is {configuration_manager.preprocessor_class.__name__}, not DefaultPreprocessor"
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key) != _RESAMPLING or config.get(f"{key}_kwargs", {}).get("is_seg", False):
            return f"{key} is {config.get(key)} with {config.get(f'{key}_kwargs')}, not nnU-Net's default"
    if configuration_manager.previous_stage_name is not None:
        return "a cascade stage (the previous stage's segmentation is an input)"
    return None


class DevicePipeline:
    """nnU-Net's preprocessing and export of one case on ``device`` for one configuration.

        pipeline = DevicePipeline(plans_manager, configuration_manager, dataset_json, device)
        data = pipeline.preprocess(image, properties)       # image (C, *spatial) as the reader returns it
        seg, probabilities = pipeline.export(logits, properties, save_probabilities)

    ``preprocess`` adds nnU-Net's keys to ``properties`` (shape_before_cropping, bbox_used_for_cropping,
    shape_after_cropping_and_before_resampling), which ``export`` reads back.
    """

    def __init__(self, plans_manager, configuration_manager, dataset_json: dict, device: torch.device) -> None:
        import nnunetv2
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

        reason = unsupported(plans_manager, configuration_manager)
        if reason is not None:
            raise ValueError(f"the device pipeline cannot reproduce this configuration: {reason}")
        self.plans_manager, self.configuration_manager = plans_manager, configuration_manager
        self.label_manager = plans_manager.get_label_manager(dataset_json)
        self.device = device
        folder = f"{nnunetv2.__path__[0]}/preprocessing/normalization"
        self.normalizers = []
        for c, scheme in enumerate(configuration_manager.normalization_schemes):
            cls = recursive_find_python_class(folder, scheme, "nnunetv2.preprocessing.normalization")
            if cls is None:
                raise RuntimeError(f"Unable to locate class '{scheme}' for normalization")
            props = plans_manager.foreground_intensity_properties_per_channel[str(c)]
            self.normalizers.append(cls(use_mask_for_norm=configuration_manager.use_mask_for_norm[c],
                                        intensityproperties=props))
        data_kwargs = dict(configuration_manager.configuration["resampling_fn_data_kwargs"])
        prob_kwargs = dict(configuration_manager.configuration["resampling_fn_probabilities_kwargs"])
        self.data_kwargs = {k: v for k, v in data_kwargs.items() if k != "is_seg"}
        self.prob_kwargs = {k: v for k, v in prob_kwargs.items() if k != "is_seg"}

    # -- preprocessing ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def preprocess(self, image: np.ndarray, properties: dict) -> Tensor:
        """image (C, *spatial) numpy -> (C, *resampled) float32 on the device (``run_case_npy`` for a test case)."""
        pm, cm = self.plans_manager, self.configuration_manager
        x = torch.from_numpy(np.ascontiguousarray(image))
        x = x.pin_memory() if self.device.type == "cuda" else x
        x = x.to(self.device, non_blocking=True).float()
        x = x.permute(0, *[i + 1 for i in pm.transpose_forward])
        original_spacing = [properties["spacing"][i] for i in pm.transpose_forward]
        properties["shape_before_cropping"] = tuple(x.shape[1:])
        bbox = _nonzero_bbox(x)
        x = x[(slice(None), *[slice(lo, hi) for lo, hi in bbox])].contiguous()
        properties["bbox_used_for_cropping"] = bbox
        properties["shape_after_cropping_and_before_resampling"] = tuple(x.shape[1:])
        target_spacing = cm.spacing
        if len(target_spacing) < x.dim() - 1:  # 2d: the spacing between slices does not change
            target_spacing = [original_spacing[0]] + list(target_spacing)
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        new_shape = compute_new_shape(x.shape[1:], original_spacing, target_spacing)
        self._normalize(x)
        return resample_like_nnunet(x, new_shape, original_spacing, target_spacing, **self.data_kwargs)

    def _normalize(self, x: Tensor) -> None:
        """nnU-Net's per-channel normalisation of the cropped image x (C, *spatial), in place."""
        from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
            CTNormalization,
            NoNormalization,
            RescaleTo01Normalization,
            ZScoreNormalization,
        )

        device_kinds = (CTNormalization, NoNormalization, RescaleTo01Normalization, ZScoreNormalization)
        needs_mask = any(n.use_mask_for_norm or type(n) not in device_kinds for n in self.normalizers)
        mask = _nonzero_mask(x) if needs_mask else None  # before any channel changes
        for c, norm in enumerate(self.normalizers):
            kind = type(norm)
            if kind is CTNormalization:
                p = norm.intensityproperties
                x[c].clamp_(p["percentile_00_5"], p["percentile_99_5"]).sub_(p["mean"]).div_(max(p["std"], _EPS))
            elif kind is ZScoreNormalization and not norm.use_mask_for_norm:
                mean, std = x[c].mean(), x[c].std(correction=0)
                x[c].sub_(mean).div_(std.clamp(min=_EPS))
            elif kind is ZScoreNormalization:
                values = x[c][mask]
                x[c][mask] = (values - values.mean()) / values.std(correction=0).clamp(min=_EPS)
            elif kind is RescaleTo01Normalization:
                x[c].sub_(x[c].min())
                x[c].div_(x[c].max().clamp(min=_EPS))
            elif kind is not NoNormalization:  # another scheme: nnU-Net's class, on the CPU, for this channel
                seg = np.where(mask.cpu().numpy(), np.int8(0), np.int8(-1))
                x[c] = torch.from_numpy(norm.run(x[c].cpu().numpy(), seg)).to(x.device)

    # -- export ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def export(self, logits: Tensor, properties: dict,
               save_probabilities: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """logits (K, *resampled) on the device, as nnU-Net's sliding window returns them -> the segmentation
        in the original image's shape and axis order (uint8, or uint16 with 255+ labels) and, if asked,
        the probabilities (K, *original) float32 (``convert_predicted_logits_to_segmentation_with_correct_shape``)."""
        pm, cm, lm = self.plans_manager, self.configuration_manager, self.label_manager
        spacing = [properties["spacing"][i] for i in pm.transpose_forward]
        shape = properties["shape_after_cropping_and_before_resampling"]
        current = cm.spacing if len(cm.spacing) == len(shape) else [spacing[0], *cm.spacing]
        # nnU-Net's resampling returns the input's dtype (float16 logits stay float16)
        logits = resample_like_nnunet(logits, shape, current, spacing, **self.prob_kwargs).to(logits.dtype)
        probabilities = lm.apply_inference_nonlin(logits) if (save_probabilities or lm.has_regions) else None
        if lm.has_regions:
            seg = lm.convert_probabilities_to_segmentation(probabilities)
        else:
            seg = (probabilities if probabilities is not None else logits).argmax(0)
        labels_fit_uint8 = len(lm.foreground_labels) < 255
        full = torch.zeros(properties["shape_before_cropping"], device=logits.device,
                           dtype=torch.uint8 if labels_fit_uint8 else torch.int32)
        box = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
        full[box] = seg.to(full.dtype)
        back = pm.transpose_backward
        seg_np = full.permute(*back).cpu().numpy()
        seg_np = seg_np if labels_fit_uint8 else seg_np.astype(np.uint16)
        if not save_probabilities:
            return seg_np, None
        probs_full = torch.zeros((probabilities.shape[0], *properties["shape_before_cropping"]),
                                 dtype=probabilities.dtype, device=probabilities.device)
        if not lm.has_regions:
            probs_full[0] = 1  # outside the crop: background, as nnU-Net's revert_cropping_on_probabilities
        probs_full[(slice(None), *box)] = probabilities
        return seg_np, probs_full.permute(0, *[i + 1 for i in back]).cpu().numpy()


def _nonzero_bbox(x: Tensor) -> List[List[int]]:
    """nnU-Net's crop box (``crop_to_nonzero``): [[lo, hi), ...] per spatial axis of x (C, *spatial) around
    the voxels non-zero in any channel; the whole image if there are none. Filling holes, as nnU-Net does
    before taking the box, cannot change the box (a hole lies inside it)."""
    nonzero = (x != 0).any(0)
    box = []
    for axis in range(nonzero.dim()):
        hits = nonzero.any(dim=tuple(a for a in range(nonzero.dim()) if a != axis)).nonzero().flatten()
        box.append([int(hits[0]), int(hits[-1]) + 1] if hits.numel() else [0, nonzero.shape[axis]])
    return box


def _nonzero_mask(x: Tensor) -> Tensor:
    """nnU-Net's non-zero mask of the cropped image (``create_nonzero_mask``: any channel non-zero, holes
    filled), as a bool tensor on x's device. Computed with nnU-Net's own function on the CPU: only
    configurations that normalise inside the mask need it. Filling holes in the crop equals cropping the
    filled full image (a background voxel on the crop's border touches the outside)."""
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    return torch.from_numpy(create_nonzero_mask(x.cpu().numpy())).to(x.device)
