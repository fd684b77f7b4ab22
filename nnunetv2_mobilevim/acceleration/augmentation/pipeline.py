"""nnU-Net's training augmentation as one batched pipeline on the batch's device.

    pipeline = DeviceAugmentation.from_nnunet(trainer.get_training_transforms(...))   # nnU-Net's own objects
    image, target = pipeline(image, seg)   # (B, C, *initial_patch), (B, 1, *initial_patch) -> patch-sized

``from_nnunet`` reads the transforms nnU-Net built (their classes, probabilities and ranges) and
maps each to its batched twin, in the same order; a transform it does not know, or a setting it does
not reproduce, raises ``Untranslatable`` naming all of them, so that nothing is dropped silently.
Classes are matched exactly: a subclass may behave differently and is refused.
"""

from __future__ import annotations

import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ..cuda_graphs import FastPathWarning, graph_key
from .labels import DeviceDeepSupervisionTargets, DeviceMaskImage, DeviceMirror, DeviceRegions, DeviceRemoveLabel
from .sampling import Untranslatable

StepFn = Callable[[Tensor, Optional[Tensor]], Tuple[Tensor, Optional[Union[Tensor, List[Tensor]]]]]


class Step(NamedTuple):
    """One step of the pipeline: ``run(image, seg) -> (image, seg)``, the nnU-Net transform objects it
    reproduces as nnU-Net holds them (``RandomTransform`` wrappers included; three for dummy 2D: to 2D,
    spatial, back to 3D) and the probability of application."""

    name: str
    run: StepFn
    sources: Tuple[object, ...]
    probability: float


class DeviceAugmentation:
    """Steps applied in order; the last may turn ``seg`` into nnU-Net's list of deep-supervision targets.

    Input: image ``(B, C, *S_in)`` float32 and segmentation ``(B, Cs, *S_in)`` as nnU-Net's loader crops
    them (the enlarged initial patch, -1 outside the image), on any device. Output: what nnU-Net's
    transforms give, batched: image ``(B, C, *patch)``, target ``(B, Cs or regions, *patch)`` or its list.
    """

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)

    @classmethod
    def from_nnunet(cls, transforms, labels: Optional[Sequence[int]] = None) -> "DeviceAugmentation":
        """The twin of a batchgeneratorsv2 ``ComposeTransforms`` (nnU-Net's ``get_training_transforms``).
        ``labels``: every value the segmentation may hold, which lets the spatial step run without a host
        sync and inside a CUDA graph (``DeviceSpatial``); None finds them per batch."""
        steps, problems = [], []
        for name, sources, probability in group_nnunet_transforms(transforms):
            try:
                steps.append(Step(name, translate(sources, probability, labels), sources, probability))
            except Untranslatable as err:
                problems.append(f"{name}: {err}")
        if problems:
            raise Untranslatable("these training transforms cannot run on the device:\n  - " + "\n  - ".join(problems))
        return cls(steps)

    def __call__(self, image: Tensor, seg: Tensor):
        for step in self.steps:
            image, seg = step.run(image, seg)
        return image, seg

    def describe(self) -> str:
        return ", ".join(step.name for step in self.steps)


def group_nnunet_transforms(transforms) -> List[Tuple[str, Tuple[object, ...], float]]:
    """nnU-Net's transforms as ``(name, transforms, probability)`` (the name and probability of the
    transform inside a ``RandomTransform``), nnU-Net's dummy 2D (``Convert3DTo2DTransform``,
    ``SpatialTransform``, ``Convert2DTo3DTransform``) as one group."""
    items = list(getattr(transforms, "transforms", [transforms]))
    groups, i = [], 0
    while i < len(items):
        inner = [unwrap_random(t) for t in items[i:i + 3]]
        if [type(t).__name__ for t, _ in inner] == ["Convert3DTo2DTransform", "SpatialTransform",
                                                     "Convert2DTo3DTransform"]:
            groups.append(("SpatialTransform (dummy 2D)", tuple(items[i:i + 3]), min(p for _, p in inner)))
            i += 3
        else:
            groups.append((type(inner[0][0]).__name__, (items[i],), inner[0][1]))
            i += 1
    return groups


def translate(sources: Tuple[object, ...], probability: float, labels: Optional[Sequence[int]] = None) -> StepFn:
    """The batched twin of one group of ``group_nnunet_transforms``, applied with ``probability``;
    ``Untranslatable`` if there is none."""
    inner = [unwrap_random(t) for t in sources]
    if len(sources) == 3:
        if any(p != 1 for _, p in inner):
            raise Untranslatable("dummy 2D inside RandomTransform; nnU-Net applies it always")
        return _spatial(inner[1][0], probability, dummy_2d=True, labels=labels)
    if type(inner[0][0]).__name__ == "SpatialTransform" and _is_nnunets(inner[0][0]):
        return _spatial(inner[0][0], probability, labels=labels)
    return _translate(inner[0][0], probability)


class _ImageOnly:
    """An intensity transform (``image -> image``) as a pipeline step."""

    def __init__(self, transform: Callable[[Tensor], Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Tensor, seg):
        return self.transform(image), seg


def unwrap_random(transform) -> Tuple[object, float]:
    """``RandomTransform(t, p)`` -> (t, p); anything else -> (it, 1)."""
    if type(transform).__name__ == "RandomTransform":
        return transform.transform, float(transform.apply_probability)
    return transform, 1.0


def _spatial(transform, probability: float, dummy_2d: bool = False, labels: Optional[Sequence[int]] = None) -> StepFn:
    from .spatial import DeviceSpatial

    if probability != 1:
        raise Untranslatable(f"RandomTransform(apply_probability={probability}) around it; nnU-Net applies it always")
    return DeviceSpatial.from_nnunet(transform, dummy_2d=dummy_2d, labels=labels)


def _translate(transform, probability: float) -> StepFn:
    from . import intensity

    image_only = {
        "GaussianNoiseTransform": intensity.DeviceGaussianNoise,
        "GaussianBlurTransform": intensity.DeviceGaussianBlur,
        "MultiplicativeBrightnessTransform": intensity.DeviceBrightness,
        "ContrastTransform": intensity.DeviceContrast,
        "SimulateLowResolutionTransform": intensity.DeviceLowResolution,
        "GammaTransform": intensity.DeviceGamma,
    }
    labels = {
        "MirrorTransform": DeviceMirror,
        "MaskImageTransform": DeviceMaskImage,
        "RemoveLabelTransform": DeviceRemoveLabel,
        "ConvertSegmentationToRegionsTransform": DeviceRegions,
        "DownsampleSegForDSTransform": DeviceDeepSupervisionTargets,
    }
    name = type(transform).__name__
    if name in image_only and _is_nnunets(transform):
        return _ImageOnly(image_only[name].from_nnunet(transform, apply_probability=probability))
    if name in labels and _is_nnunets(transform):
        return labels[name].from_nnunet(transform, apply_probability=probability)
    raise Untranslatable(f"no device version of {type(transform).__module__}.{name}; run nnU-Net's CPU pipeline "
                         "(NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION=0) or leave it out of your trainer's transforms")


def _is_nnunets(transform) -> bool:
    """The class is batchgeneratorsv2's own, not a look-alike or a subclass with another behaviour."""
    return type(transform).__module__.startswith("batchgeneratorsv2.")


class ReplayedAugmentation:
    """``pipeline(image, seg)`` on CUDA replayed from one captured CUDA graph per input signature.

        augment = ReplayedAugmentation(DeviceAugmentation.from_nnunet(transforms, labels=...))
        image, target = augment(image, seg)     # new tensors; fresh random draws at every replay

    The pipeline is a few hundred small kernels per batch, so the host, not the GPU, would set its pace;
    a replay launches them at once. PyTorch's CUDA generator hands every replay new random numbers
    (its offset advances), as eager calls get them. The pipeline must not synchronise with the host
    (``DeviceSpatial`` needs its ``labels``). At most ``max_graphs`` signatures are captured; others, CPU
    tensors, and a signature whose capture failed run eagerly (same distribution), the latter two said
    once with a ``FastPathWarning``.
    """

    def __init__(self, pipeline: DeviceAugmentation, warmup: int = 2, max_graphs: int = 2) -> None:
        self.pipeline, self.warmup, self.max_graphs = pipeline, warmup, max_graphs
        self._graphs: dict = {}
        self._eager: dict = {}  # signature -> why it runs eagerly
        self._told: set = set()

    @torch.no_grad()
    def __call__(self, image: Tensor, seg: Tensor):
        if not image.is_cuda:
            return self.pipeline(image, seg)
        key = (graph_key(image), graph_key(seg))
        if key not in self._graphs and key not in self._eager:
            if len(self._graphs) >= self.max_graphs:
                self._eager[key] = f"more than {self.max_graphs} batch shapes: the others are augmented eagerly"
            else:
                try:
                    self._graphs[key] = self._capture(image, seg)
                except RuntimeError as err:
                    self._eager[key] = f"capturing it as a CUDA graph failed ({err}); it runs eagerly"
        if key in self._eager:
            if self._eager[key] not in self._told:
                self._told.add(self._eager[key])
                warnings.warn(f"device augmentation: {self._eager[key]} (same augmentation, slower).",
                              FastPathWarning, stacklevel=2)
            return self.pipeline(image, seg)
        graph, static_image, static_seg, outputs = self._graphs[key]
        static_image.copy_(image)
        static_seg.copy_(seg)
        graph.replay()
        return tree_map(lambda t: t.clone(), outputs)

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, image: Tensor, seg: Tensor):
        static_image, static_seg = image.clone(), seg.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # eager passes first: cached constants, cuDNN's choice, lazy kernels
            for _ in range(self.warmup):
                self.pipeline(static_image.clone(), static_seg.clone())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # nnU-Net's pin-memory thread uses CUDA meanwhile: only this thread's calls may not disturb the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.pipeline(static_image, static_seg)
        return graph, static_image, static_seg, outputs
