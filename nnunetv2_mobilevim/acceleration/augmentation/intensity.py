"""nnU-Net's intensity augmentations, batched: Gaussian noise, Gaussian blur, multiplicative brightness,
contrast, simulated low resolution and gamma, as ``nnUNetTrainer.get_training_transforms`` configures
batchgeneratorsv2's transforms, for a whole batch at once on its device.

Each class draws every per-sample parameter as a tensor (``draw``) and applies them with tensor ops
(``apply``), without a host round trip or a Python loop over samples. Samples that are not augmented (the
``RandomTransform(..., apply_probability)`` coin, drawn per sample) and channels not chosen
(``p_per_channel``) pass through unchanged via masks. ``apply`` never modifies its input.

Shapes: image ``(B, C, *S)`` with ``len(S) == D`` in {2, 3}; per-sample / per-channel parameters ``(B,)`` /
``(B, C)``; per-axis ones ``(B, C, D)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .sampling import Untranslatable, check_random_scalar, coin, random_scalar

__all__ = [
    "DeviceGaussianNoise", "DeviceGaussianBlur", "DeviceBrightness", "DeviceContrast", "DeviceLowResolution",
    "DeviceGamma", "NoiseParams", "BlurParams", "MultiplierParams", "LowResolutionParams", "GammaParams",
    "blur_kernel_size", "blur_kernels", "low_resolution_sizes", "low_resolution_axis",
]


# ---------------------------------------------------------------------------------------------------------
# helpers


def _largest_draw(spec) -> float:
    """The largest value ``random_scalar(spec)`` can return (number, range or BGContrast range)."""
    if isinstance(spec, (int, float)):
        return float(spec)
    if isinstance(spec, (list, tuple)):
        return float(max(spec))
    return float(max(spec.contrast_range))


def _unwrap(transform, expected: type, apply_probability: float):
    """(the bgv2 transform, probability of applying it per sample) from ``transform`` or a ``RandomTransform``
    around it (nested coins multiply). Only the exact class is read: a subclass may behave differently."""
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    p = float(apply_probability)
    while type(transform) is RandomTransform:
        p *= float(transform.apply_probability)
        transform = transform.transform
    if type(transform) is not expected:
        raise Untranslatable(f"expected batchgeneratorsv2's {expected.__name__}, got {type(transform).__name__}")
    return transform, p


def _per_channel(spec, batch: int, channels: int, synchronize_channels: bool, device, what: str) -> Tensor:
    """(B, C) draws of ``spec``: one per channel, or one per sample shared by its channels."""
    if synchronize_channels:
        return random_scalar(spec, (batch, 1), device, what).expand(batch, channels).contiguous()
    return random_scalar(spec, (batch, channels), device, what)


def _view(t: Tensor, ndim: int) -> Tensor:
    """(B, C) -> (B, C, 1, ..., 1) broadcastable against an image with ``ndim`` dimensions."""
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


def _selected(applied: Tensor, channels: Tensor, ndim: int) -> Tensor:
    """(B, C, 1, ...) bool: sample augmented and channel chosen."""
    return _view(applied[:, None] & channels, ndim)


def _check_image(image: Tensor) -> None:
    if image.ndim not in (4, 5):
        raise ValueError(f"expected an image (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(image.shape)}")


class _ChannelwiseParams(NamedTuple):
    applied: Tensor  # (B,) bool: RandomTransform's coin per sample
    channels: Tensor  # (B, C) bool: p_per_channel's coin per channel


def _draw_masks(image: Tensor, apply_probability: float, p_per_channel: float) -> _ChannelwiseParams:
    batch, channels = image.shape[:2]
    return _ChannelwiseParams(coin(apply_probability, (batch,), image.device),
                              coin(p_per_channel, (batch, channels), image.device))


# ---------------------------------------------------------------------------------------------------------
# Gaussian noise


class NoiseParams(NamedTuple):
    applied: Tensor  # (B,) bool
    channels: Tensor  # (B, C) bool
    sigma: Tensor  # (B, C) float32: the noise's standard deviation (nnU-Net's "noise_variance" draw)
    noise: Tensor  # (B, C, *S) standard normal, the image's dtype


class DeviceGaussianNoise:
    """batchgeneratorsv2's ``GaussianNoiseTransform``: adds N(0, sigma^2) noise to each chosen channel.
    Note that bgv2 uses the value drawn from ``noise_variance`` as the standard deviation, and so do we."""

    def __init__(self, noise_variance=(0, 0.1), p_per_channel: float = 1.0, synchronize_channels: bool = False,
                 apply_probability: float = 1.0):
        check_random_scalar(noise_variance, "GaussianNoiseTransform.noise_variance")
        self.noise_variance = noise_variance
        self.p_per_channel = float(p_per_channel)
        self.synchronize_channels = bool(synchronize_channels)
        self.apply_probability = float(apply_probability)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceGaussianNoise":
        from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform

        t, p = _unwrap(transform, GaussianNoiseTransform, apply_probability)
        return cls(t.noise_variance, t.p_per_channel, t.synchronize_channels, p)

    def draw(self, image: Tensor) -> NoiseParams:
        _check_image(image)
        batch, channels = image.shape[:2]
        masks = _draw_masks(image, self.apply_probability, self.p_per_channel)
        sigma = _per_channel(self.noise_variance, batch, channels, self.synchronize_channels, image.device,
                             "GaussianNoiseTransform.noise_variance")
        noise = torch.randn(image.shape, device=image.device, dtype=image.dtype)
        return NoiseParams(*masks, sigma, noise)

    def apply(self, image: Tensor, params: NoiseParams) -> Tensor:
        sigma = _view(params.sigma.to(image.dtype), image.ndim)
        return torch.where(_selected(params.applied, params.channels, image.ndim), image + params.noise * sigma, image)

    def __call__(self, image: Tensor) -> Tensor:
        return self.apply(image, self.draw(image))


# ---------------------------------------------------------------------------------------------------------
# Gaussian blur

_BLUR_TRUNCATE = 6  # bgv2's blur_dimension builds kernels with truncate=6 (not _build_kernel's default 4)


def blur_kernel_size(sigma: float) -> int:
    """bgv2's kernel width for ``sigma``: the odd number nearest to ``6 * sigma + 0.5`` (an even value goes
    up). Equal to ``2 * floor((6 * sigma + 0.5) / 2) + 1``."""
    return 2 * math.floor((sigma * _BLUR_TRUNCATE + 0.5) / 2) + 1


def blur_kernels(sigma: Tensor, width: int) -> Tensor:
    """Normalised 1-D Gaussian kernels, each bgv2's ``blur_kernel_size(sigma)`` taps wide, centred and
    zero-padded to ``width`` taps (odd, at least the widest kernel). sigma (...) -> (..., width) float32."""
    # The size test in float64: a float32 product could round across the even-integer thresholds.
    size = 2 * torch.floor((sigma.double() * _BLUR_TRUNCATE + 0.5) / 2) + 1
    half = ((size - 1) / 2).float()
    taps = torch.arange(width, device=sigma.device, dtype=torch.float32) - (width - 1) // 2
    inside = taps.abs() <= half[..., None]
    pdf = torch.exp(-0.5 * (taps / sigma[..., None].float()).pow(2))
    pdf = torch.where(inside, pdf, torch.zeros((), device=sigma.device))
    return pdf / pdf.sum(-1, keepdim=True)


def _reflect_indices(size: int, pad: int, device) -> Tensor:
    """Indices of ``torch.nn.functional.pad(mode='reflect')`` (edge not repeated) for any ``pad``: the
    reflection is periodic with period 2 * (size - 1), so pads wider than the axis also work."""
    idx = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * (size - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx < size, idx, period - idx)


class BlurParams(NamedTuple):
    applied: Tensor  # (B,) bool
    channels: Tensor  # (B, C) bool
    sigma: Tensor  # (B, C, D) float32: blur_sigma per sample, channel and spatial axis


class DeviceGaussianBlur:
    """batchgeneratorsv2's ``GaussianBlurTransform``: separable Gaussian blur of each chosen channel, axis
    after axis, with reflect padding (bgv2's kernel sizes and weights). All samples and channels are blurred
    in one grouped convolution per axis, with kernels zero-padded to ``kernel_width``, the width of the
    largest sigma ``blur_sigma`` can draw (so it does not depend on the draws).
    ``benchmark`` (bgv2's choice between direct and FFT convolution) changes only rounding and is ignored.
    On CUDA, cuDNN's TF32 setting (``torch.backends.cudnn.allow_tf32``) applies to the convolution."""

    def __init__(self, blur_sigma=(1, 5), synchronize_channels: bool = False, synchronize_axes: bool = False,
                 p_per_channel: float = 1.0, benchmark: bool = False, apply_probability: float = 1.0):
        check_random_scalar(blur_sigma, "GaussianBlurTransform.blur_sigma")
        self.blur_sigma = blur_sigma
        self.synchronize_channels = bool(synchronize_channels)
        self.synchronize_axes = bool(synchronize_axes)
        self.p_per_channel = float(p_per_channel)
        self.apply_probability = float(apply_probability)
        largest = _largest_draw(blur_sigma)
        # draws are float32: the largest one may round above the float64 bound
        self.kernel_width = max(blur_kernel_size(largest), blur_kernel_size(float(torch.tensor(largest))))

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceGaussianBlur":
        from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

        t, p = _unwrap(transform, GaussianBlurTransform, apply_probability)
        return cls(t.blur_sigma, t.synchronize_channels, t.synchronize_axes, t.p_per_channel, t.benchmark, p)

    def draw(self, image: Tensor) -> BlurParams:
        _check_image(image)
        (batch, channels), dims = image.shape[:2], image.ndim - 2
        masks = _draw_masks(image, self.apply_probability, self.p_per_channel)
        shape = (batch, 1 if self.synchronize_channels else channels, 1 if self.synchronize_axes else dims)
        sigma = random_scalar(self.blur_sigma, shape, image.device, "GaussianBlurTransform.blur_sigma")
        return BlurParams(*masks, sigma.expand(batch, channels, dims).contiguous())

    def apply(self, image: Tensor, params: BlurParams) -> Tensor:
        _check_image(image)
        spatial = image.shape[2:]
        width, pad = self.kernel_width, self.kernel_width // 2
        kernels = blur_kernels(params.sigma, width).to(image.dtype)  # (B, C, D, width)
        # Deliberately not a (grouped) convolution: on GPUs cuDNN may run it in TF32, ~1e-3 off nnU-Net's float32
        # blur; a weighted sum of shifted copies is float32 everywhere and costs the same in a replayed graph.
        x = image
        for d, size in enumerate(spatial):
            padded = x.index_select(d + 2, _reflect_indices(size, pad, image.device))
            taps = kernels[:, :, d].reshape(*kernels.shape[:2], *([1] * len(spatial)), width)
            x = padded.narrow(d + 2, 0, size) * taps[..., 0]
            for k in range(1, width):
                x = x.addcmul_(padded.narrow(d + 2, k, size), taps[..., k])
        return torch.where(_selected(params.applied, params.channels, image.ndim), x, image)

    def __call__(self, image: Tensor) -> Tensor:
        return self.apply(image, self.draw(image))


# ---------------------------------------------------------------------------------------------------------
# multiplicative brightness and contrast


class MultiplierParams(NamedTuple):
    applied: Tensor  # (B,) bool
    channels: Tensor  # (B, C) bool
    multiplier: Tensor  # (B, C) float32


class DeviceBrightness:
    """batchgeneratorsv2's ``MultiplicativeBrightnessTransform``: each chosen channel times a factor."""

    def __init__(self, multiplier_range, synchronize_channels: bool, p_per_channel: float = 1.0,
                 apply_probability: float = 1.0):
        check_random_scalar(multiplier_range, "MultiplicativeBrightnessTransform.multiplier_range")
        self.multiplier_range = multiplier_range
        self.synchronize_channels = bool(synchronize_channels)
        self.p_per_channel = float(p_per_channel)
        self.apply_probability = float(apply_probability)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceBrightness":
        from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform

        t, p = _unwrap(transform, MultiplicativeBrightnessTransform, apply_probability)
        return cls(t.multiplier_range, t.synchronize_channels, t.p_per_channel, p)

    def draw(self, image: Tensor) -> MultiplierParams:
        _check_image(image)
        masks = _draw_masks(image, self.apply_probability, self.p_per_channel)
        m = _per_channel(self.multiplier_range, *image.shape[:2], self.synchronize_channels, image.device,
                         "MultiplicativeBrightnessTransform.multiplier_range")
        return MultiplierParams(*masks, m)

    def apply(self, image: Tensor, params: MultiplierParams) -> Tensor:
        m = _view(params.multiplier.to(image.dtype), image.ndim)
        return torch.where(_selected(params.applied, params.channels, image.ndim), image * m, image)

    def __call__(self, image: Tensor) -> Tensor:
        return self.apply(image, self.draw(image))


class DeviceContrast:
    """batchgeneratorsv2's ``ContrastTransform``: each chosen channel scaled about its mean by a factor;
    with ``preserve_range`` the result is clipped to the channel's original [min, max]."""

    def __init__(self, contrast_range, preserve_range: bool, synchronize_channels: bool, p_per_channel: float = 1.0,
                 apply_probability: float = 1.0):
        check_random_scalar(contrast_range, "ContrastTransform.contrast_range")
        self.contrast_range = contrast_range
        self.preserve_range = bool(preserve_range)
        self.synchronize_channels = bool(synchronize_channels)
        self.p_per_channel = float(p_per_channel)
        self.apply_probability = float(apply_probability)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceContrast":
        from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform

        t, p = _unwrap(transform, ContrastTransform, apply_probability)
        return cls(t.contrast_range, t.preserve_range, t.synchronize_channels, t.p_per_channel, p)

    def draw(self, image: Tensor) -> MultiplierParams:
        _check_image(image)
        masks = _draw_masks(image, self.apply_probability, self.p_per_channel)
        m = _per_channel(self.contrast_range, *image.shape[:2], self.synchronize_channels, image.device,
                         "ContrastTransform.contrast_range")
        return MultiplierParams(*masks, m)

    def apply(self, image: Tensor, params: MultiplierParams) -> Tensor:
        flat = image.flatten(2)  # (B, C, N)
        mean = _view(flat.mean(-1), image.ndim)
        out = (image - mean) * _view(params.multiplier.to(image.dtype), image.ndim) + mean
        if self.preserve_range:
            low, high = flat.aminmax(dim=-1)
            out = torch.clamp(out, _view(low, image.ndim), _view(high, image.ndim))
        return torch.where(_selected(params.applied, params.channels, image.ndim), out, image)

    def __call__(self, image: Tensor) -> Tensor:
        return self.apply(image, self.draw(image))


# ---------------------------------------------------------------------------------------------------------
# simulated low resolution


def low_resolution_sizes(size: int, scale: Tensor) -> Tensor:
    """bgv2's downsampled size ``round(size * scale)`` (Python's round: halves to even; the product in
    float64 is exact for a float32 scale), at least 1 (bgv2 would fail on 0). (...) -> (...) int64."""
    return torch.round(scale.double() * size).clamp(min=1).long()


def low_resolution_axis(size: int, small: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-axis gather indices and weights of nnU-Net's low-resolution simulation along an axis of ``size``
    voxels: ``interpolate(mode='nearest-exact')`` down to ``small`` voxels, then linear interpolation
    (align_corners=False) back to ``size``, as one map from output voxel j to the original voxels

        out[j] = (1 - lam[j]) * x[first[j]] + lam[j] * x[second[j]]

    small (...) int64 -> first, second (..., size) int64 and lam (..., size) float32, with PyTorch's
    index arithmetic: the linear source ``(small / size) * (j + 0.5) - 0.5`` rounded once (CPU and CUDA
    kernels contract it into one fused multiply-add), clipped at 0; the nearest-exact source
    ``floor((i + 0.5) * (size / small))`` with the ratio in float32 and the product rounded to float32."""
    device = small.device
    small_f = small.float()[..., None]
    # Ratios by float32 tensor division (IEEE, as in PyTorch's kernels; ``int / tensor`` would multiply by a
    # reciprocal instead).
    size_f = torch.full_like(small_f, float(size))
    j = torch.arange(size, device=device, dtype=torch.float64)
    up_ratio = (small_f / size_f).double()
    src = (up_ratio * (j + 0.5) - 0.5).float().clamp(min=0)
    low = torch.minimum(torch.floor(src).long(), small[..., None] - 1)
    lam = (src - low).clamp(0, 1)
    high = low + (low < small[..., None] - 1).long()
    down_ratio = (size_f / small_f).double()

    def nearest(i: Tensor) -> Tensor:
        return torch.floor(((i.double() + 0.5) * down_ratio).float()).long().clamp(max=size - 1)

    return nearest(low), nearest(high), lam


class LowResolutionParams(NamedTuple):
    applied: Tensor  # (B,) bool
    channels: Tensor  # (B, C) bool: chosen (p_per_channel) and among allowed_channels
    scales: Tensor  # (B, C, D) float32: downsampling factor per axis, 1 on ignore_axes


class DeviceLowResolution:
    """batchgeneratorsv2's ``SimulateLowResolutionTransform``: each chosen channel is resampled with
    nearest-exact interpolation to ``round(size * scale)`` voxels per axis and back with (bi/tri)linear
    interpolation. The sizes differ per sample and channel, so instead of resizing, each axis is done by two
    gathers and a linear blend with indices computed on the device (``low_resolution_axis``): separable,
    the same result as resizing up to float rounding."""

    def __init__(self, scale, synchronize_channels: bool, synchronize_axes: bool,
                 ignore_axes: Optional[Sequence[int]] = None, allowed_channels: Optional[Sequence[int]] = None,
                 p_per_channel: float = 1.0, apply_probability: float = 1.0):
        check_random_scalar(scale, "SimulateLowResolutionTransform.scale")
        self.scale = scale
        self.synchronize_channels = bool(synchronize_channels)
        self.synchronize_axes = bool(synchronize_axes)
        self.ignore_axes = None if ignore_axes is None else tuple(int(a) for a in ignore_axes)
        self.allowed_channels = None if allowed_channels is None else tuple(int(c) for c in allowed_channels)
        self.p_per_channel = float(p_per_channel)
        self.apply_probability = float(apply_probability)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceLowResolution":
        from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform

        t, p = _unwrap(transform, SimulateLowResolutionTransform, apply_probability)
        if t.upmodes != {1: "linear", 2: "bilinear", 3: "trilinear"}:
            raise Untranslatable(f"SimulateLowResolutionTransform.upmodes {t.upmodes!r} is not (bi/tri)linear")
        return cls(t.scale, t.synchronize_channels, t.synchronize_axes, t.ignore_axes, t.allowed_channels,
                   t.p_per_channel, p)

    def draw(self, image: Tensor) -> LowResolutionParams:
        _check_image(image)
        (batch, channels), dims = image.shape[:2], image.ndim - 2
        applied, chosen = _draw_masks(image, self.apply_probability, self.p_per_channel)
        if self.allowed_channels is not None:
            allowed = torch.zeros(channels, dtype=torch.bool, device=image.device)
            for c in self.allowed_channels:  # int indexing: no index tensor to copy to the device
                allowed[c] = True
            chosen = chosen & allowed
        shape = (batch, 1 if self.synchronize_channels else channels, 1 if self.synchronize_axes else dims)
        scales = random_scalar(self.scale, shape, image.device, "SimulateLowResolutionTransform.scale")
        scales = scales.expand(batch, channels, dims).contiguous()
        for a in self.ignore_axes or ():
            scales[:, :, a] = 1
        return LowResolutionParams(applied, chosen, scales)

    def apply(self, image: Tensor, params: LowResolutionParams) -> Tensor:
        _check_image(image)
        x = image
        for d, size in enumerate(image.shape[2:]):
            first, second, lam = low_resolution_axis(size, low_resolution_sizes(size, params.scales[:, :, d]))
            view = [*image.shape[:2]] + [1] * (image.ndim - 2)
            view[d + 2] = size  # (B, C, 1.., size, ..1), expanded to the image for gather
            first, second = (i.reshape(view).expand(x.shape) for i in (first, second))
            lam = lam.reshape(view).to(image.dtype)
            x = (1 - lam) * x.gather(d + 2, first) + lam * x.gather(d + 2, second)
        return torch.where(_selected(params.applied, params.channels, image.ndim), x, image)

    def __call__(self, image: Tensor) -> Tensor:
        return self.apply(image, self.draw(image))


# ---------------------------------------------------------------------------------------------------------
# gamma


class GammaParams(NamedTuple):
    applied: Tensor  # (B,) bool
    channels: Tensor  # (B, C) bool
    gamma: Tensor  # (B, C) float32
    invert_image: Tensor  # (B, C) bool: p_invert_image's coin per channel (never synchronised)
    retain_stats: Tensor  # (B, C) bool: p_retain_stats's coin per channel (never synchronised)


class DeviceGamma:
    """batchgeneratorsv2's ``GammaTransform``: each chosen channel, optionally negated first (and back
    after), is mapped to [0, 1] by its min and max, raised to ``gamma`` and mapped back; with retain_stats
    the result gets the channel's mean and (unbiased) standard deviation from before the power."""

    _EPS = 1e-7  # bgv2's floor for the range and the standard deviation it divides by

    def __init__(self, gamma, p_invert_image: float, synchronize_channels: bool, p_per_channel: float,
                 p_retain_stats: float, apply_probability: float = 1.0):
        check_random_scalar(gamma, "GammaTransform.gamma")
        self.gamma = gamma
        self.p_invert_image = float(p_invert_image)
        self.synchronize_channels = bool(synchronize_channels)
        self.p_per_channel = float(p_per_channel)
        self.p_retain_stats = float(p_retain_stats)
        self.apply_probability = float(apply_probability)

    @classmethod
    def from_nnunet(cls, transform, apply_probability: float = 1.0) -> "DeviceGamma":
        from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform

        t, p = _unwrap(transform, GammaTransform, apply_probability)
        return cls(t.gamma, t.p_invert_image, t.synchronize_channels, t.p_per_channel, t.p_retain_stats, p)

    def draw(self, image: Tensor) -> GammaParams:
        _check_image(image)
        batch, channels = image.shape[:2]
        masks = _draw_masks(image, self.apply_probability, self.p_per_channel)
        gamma = _per_channel(self.gamma, batch, channels, self.synchronize_channels, image.device,
                             "GammaTransform.gamma")
        invert = coin(self.p_invert_image, (batch, channels), image.device)
        retain = coin(self.p_retain_stats, (batch, channels), image.device)
        return GammaParams(*masks, gamma, invert, retain)

    def apply(self, image: Tensor, params: GammaParams) -> Tensor:
        nd = image.ndim
        invert = _view(params.invert_image, nd)
        x = torch.where(invert, -image, image)
        flat = x.flatten(2)
        mean, std = _view(flat.mean(-1), nd), _view(flat.std(-1), nd)
        low, high = (_view(v, nd) for v in flat.aminmax(dim=-1))
        spread = high - low
        out = ((x - low) / spread.clamp(min=self._EPS)).pow(_view(params.gamma.to(image.dtype), nd)) * spread + low
        flat_out = out.flatten(2)
        mean_out, std_out = _view(flat_out.mean(-1), nd), _view(flat_out.std(-1), nd)
        retained = (out - mean_out) * (std / std_out.clamp(min=self._EPS)) + mean
        out = torch.where(_view(params.retain_stats, nd), retained, out)
        out = torch.where(invert, -out, out)
        return torch.where(_selected(params.applied, params.channels, nd), out, image)

    def __call__(self, image: Tensor) -> Tensor:
        return self.apply(image, self.draw(image))
