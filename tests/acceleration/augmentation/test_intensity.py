"""The batched intensity augmentations reproduce nnU-Net's (batchgeneratorsv2's) transforms: the same output
for the same parameters, parameters drawn from the same distributions, the same application probabilities,
and the same output statistics over many draws. CPU.

Tolerances: exactness ``assert_close(rtol=1e-5, atol=1e-5)`` on unit-scale inputs (only reduction order and
float32 rounding differ; unchosen samples / channels must be bit-identical); distributions:
``scipy.stats.ks_2samp`` p > 1e-3 with seeded draws; rates: within 5 binomial standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from scipy.stats import ks_2samp

from nnunetv2_mobilevim.acceleration.augmentation.intensity import (
    DeviceBrightness,
    DeviceContrast,
    DeviceGamma,
    DeviceGaussianBlur,
    DeviceGaussianNoise,
    DeviceLowResolution,
    blur_kernel_size,
    low_resolution_axis,
)
from nnunetv2_mobilevim.acceleration.augmentation.sampling import Untranslatable

EXACT = dict(rtol=1e-5, atol=1e-5)
KS_P = 1e-3
N_DRAWS = 2000

DEVICE_CLASS = {
    GaussianNoiseTransform: DeviceGaussianNoise, GaussianBlurTransform: DeviceGaussianBlur,
    MultiplicativeBrightnessTransform: DeviceBrightness, ContrastTransform: DeviceContrast,
    SimulateLowResolutionTransform: DeviceLowResolution, GammaTransform: DeviceGamma,
}
SHAPES = {2: (23, 17), 3: (13, 11, 9)}


def _seed(seed: int = 0) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def _nnunet_intensity(dims: int, dummy_2d: bool = False) -> list:
    """nnU-Net's own intensity RandomTransforms (get_training_transforms), in pipeline order."""
    patch = (16,) * dims
    rotation = (-math.pi / 6, math.pi / 6) if dims == 3 else (-math.pi, math.pi)
    pipeline = nnUNetTrainer.get_training_transforms(patch, rotation, None, tuple(range(dims)), dummy_2d)
    return [t for t in pipeline.transforms if type(t) is RandomTransform and type(t.transform) in DEVICE_CLASS]


def _name(rt) -> str:
    t = rt.transform
    suffix = "_inverted" if isinstance(t, GammaTransform) and t.p_invert_image == 1 else ""
    return type(t).__name__.replace("Transform", "") + suffix


def _ours(bg, apply_probability: float = 1.0):
    inner = bg.transform if type(bg) is RandomTransform else bg
    return DEVICE_CLASS[type(inner)].from_nnunet(bg, apply_probability)


def _ks(ours, theirs, what: str) -> None:
    ours, theirs = np.asarray(ours, dtype=np.float64).ravel(), np.asarray(theirs, dtype=np.float64).ravel()
    assert len(ours) > 50 and len(theirs) > 50, what
    p = ks_2samp(ours, theirs).pvalue
    assert p > KS_P, f"{what}: KS p = {p:.2e} (ours mean {ours.mean():.4f}, bgv2 mean {theirs.mean():.4f})"


def _rate(hits, n: int, p: float, what: str) -> None:
    hits = float(hits)
    se = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= 5 * se + 1e-9, f"{what}: {hits / n:.4f} vs p = {p}"


def _image(shape, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _check_exact(ours, bg, image: torch.Tensor, params, bg_params) -> int:
    """ours.apply vs bgv2's _apply_to_image sample by sample; ``bg_params(b)`` gives bgv2's params for a
    sample with chosen channels (None: bgv2 must not be called, the sample must be unchanged). Returns how many
    samples were compared with bgv2."""
    before = image.clone()
    out = ours.apply(image, params)
    assert torch.equal(image, before), "apply modified its input"
    compared = 0
    for b in range(image.shape[0]):
        chosen = params.channels[b] & params.applied[b]
        if not chosen.any():
            assert torch.equal(out[b], image[b]), f"sample {b} is not augmented but changed"
            continue
        ref = bg._apply_to_image(image[b].clone(), **bg_params(b))
        assert torch.equal(out[b][~chosen], image[b][~chosen]), f"sample {b}: an unchosen channel changed"
        torch.testing.assert_close(out[b], ref, **EXACT, msg=lambda m: f"sample {b}: {m}")
        compared += 1
    assert compared >= 3, "too few augmented samples to compare"
    return compared


def _chosen_idx(params, b: int) -> torch.Tensor:
    return torch.where(params.channels[b])[0]


def _bg_draws(bg, image: torch.Tensor, n: int = N_DRAWS) -> list:
    return [bg.get_parameters(image=image.clone()) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------
# translation of nnU-Net's pipeline


@pytest.mark.parametrize("dims,dummy_2d", [(3, False), (2, False), (3, True)], ids=["3d", "2d", "3d_dummy2d"])
def test_from_nnunet_reads_the_training_pipeline(dims, dummy_2d):
    transforms = _nnunet_intensity(dims, dummy_2d)
    names = [_name(t) for t in transforms]
    assert names == ["GaussianNoise", "GaussianBlur", "MultiplicativeBrightness", "Contrast",
                     "SimulateLowResolution", "Gamma_inverted", "Gamma"]
    ours = [_ours(t) for t in transforms]
    assert [o.apply_probability for o in ours] == [0.1, 0.2, 0.15, 0.15, 0.25, 0.1, 0.3]
    noise, blur, bright, contrast, lowres, gamma_inv, gamma = ours
    assert noise.noise_variance == (0, 0.1) and noise.synchronize_channels and noise.p_per_channel == 1
    assert blur.blur_sigma == (0.5, 1.0) and blur.p_per_channel == 0.5 and blur.kernel_width == 7
    assert not blur.synchronize_channels and not blur.synchronize_axes
    assert bright.multiplier_range.contrast_range == (0.75, 1.25) and not bright.synchronize_channels
    assert contrast.preserve_range and contrast.contrast_range.contrast_range == (0.75, 1.25)
    assert lowres.scale == (0.5, 1) and lowres.synchronize_axes and not lowres.synchronize_channels
    assert lowres.p_per_channel == 0.5 and lowres.ignore_axes == ((0,) if dummy_2d else None)
    assert (gamma_inv.p_invert_image, gamma.p_invert_image) == (1, 0)
    assert gamma.p_retain_stats == 1 and gamma.gamma.contrast_range == (0.7, 1.5)
    # nested probabilities multiply; the inner transform alone is applied always
    assert DeviceGaussianNoise.from_nnunet(transforms[0], 0.5).apply_probability == pytest.approx(0.05)
    assert DeviceGaussianNoise.from_nnunet(transforms[0].transform).apply_probability == 1


def test_untranslatable_settings_are_refused():
    with pytest.raises(Untranslatable, match="noise_variance"):
        DeviceGaussianNoise.from_nnunet(GaussianNoiseTransform(noise_variance=lambda *a, **k: 0.1))
    with pytest.raises(Untranslatable, match="gamma"):
        DeviceGamma(gamma=BGContrast(lambda: 1.0), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
                    p_retain_stats=1)
    with pytest.raises(Untranslatable, match="blur_sigma"):
        DeviceGaussianBlur(blur_sigma=(1.0, 0.5))
    with pytest.raises(Untranslatable, match="GaussianBlurTransform"):
        DeviceGaussianBlur.from_nnunet(GaussianNoiseTransform())

    class Custom(ContrastTransform):
        pass

    with pytest.raises(Untranslatable, match="Custom"):  # a subclass may do something else
        DeviceContrast.from_nnunet(Custom((0.5, 2), True, False))


@pytest.mark.parametrize("dims", [2, 3])
def test_no_host_synchronisation(dims):
    """Every draw and apply runs on the meta device, where any data-dependent step (.item(), nonzero, bool of
    a tensor, a size read from a tensor) would raise."""
    image = torch.empty((2, 3, *SHAPES[dims]), device="meta")
    transforms = [_ours(t) for t in _nnunet_intensity(3, dummy_2d=True)]
    transforms.append(DeviceLowResolution((0.3, 1), True, False, ignore_axes=(1,), allowed_channels=(0, 2)))
    for t in transforms:
        out = t(image)
        assert out.shape == image.shape and out.device.type == "meta", type(t).__name__


# ------------------------------------------------------------------------------------------------------
# Gaussian noise


@pytest.mark.parametrize("sync", [False, True], ids=["per_channel", "sync_channels"])
@pytest.mark.parametrize("dims", [2, 3])
def test_noise_matches_bgv2(dims, sync):
    bg = GaussianNoiseTransform(noise_variance=(0, 0.3), p_per_channel=0.6, synchronize_channels=sync)
    ours = DeviceGaussianNoise.from_nnunet(bg, apply_probability=0.7)
    image = _image((8, 3, *SHAPES[dims]))
    params = ours.draw(image)
    noise = params.noise.clone()
    for b in range(image.shape[0]):  # bgv2 draws its noise inside _apply_to_image: give ours the same numbers
        idx = _chosen_idx(params, b)
        torch.manual_seed(100 + b)
        noise[b, idx] = torch.empty((len(idx), *SHAPES[dims])).normal_()
    params = params._replace(noise=noise)

    def bg_params(b):
        idx = _chosen_idx(params, b)
        sigmas = float(params.sigma[b, 0]) if sync else [float(s) for s in params.sigma[b, idx]]
        torch.manual_seed(100 + b)
        return {"apply_mask": params.channels[b], "apply_idx": idx, "num_apply": len(idx), "sigmas": sigmas}

    _check_exact(ours, bg, image, params, bg_params)


@pytest.mark.parametrize("sync", [False, True], ids=["per_channel", "sync_channels"])
def test_noise_parameters_follow_bgv2(sync):
    _seed()
    bg = GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=0.7, synchronize_channels=sync)
    ours = DeviceGaussianNoise.from_nnunet(bg).draw(torch.zeros(N_DRAWS, 3, 2, 2))
    theirs = _bg_draws(bg, torch.zeros(3, 2, 2))
    _rate(ours.channels.sum(), ours.channels.numel(), 0.7, "ours: chosen channels")
    _rate(sum(int(d["num_apply"]) for d in theirs), 3 * N_DRAWS, 0.7, "bgv2: chosen channels")
    if sync:
        assert (ours.sigma == ours.sigma[:, :1]).all()
        theirs_sigma = [d["sigmas"] for d in theirs if d["num_apply"]]
        ours_sigma = ours.sigma[ours.channels.any(1), 0]
    else:
        theirs_sigma = [s for d in theirs if d["num_apply"] for s in d["sigmas"]]
        ours_sigma = ours.sigma[ours.channels]
    _ks(ours_sigma, theirs_sigma, "noise sigma")
    assert 0 <= ours.sigma.min() and ours.sigma.max() < 0.1
    assert abs(ours.noise.mean()) < 0.02 and abs(ours.noise.std() - 1) < 0.02


# ------------------------------------------------------------------------------------------------------
# Gaussian blur


def test_blur_kernel_size_is_bgv2s():
    from batchgeneratorsv2.transforms.noise.gaussian_blur import _compute_kernel_size

    for sigma in np.concatenate([np.linspace(0.01, 6, 4001), (np.arange(1, 40) - 0.5) / 6, np.arange(1, 40) / 12]):
        assert blur_kernel_size(float(sigma)) == _compute_kernel_size(float(sigma), truncate=6), sigma


@pytest.mark.parametrize("sync_axes", [False, True], ids=["per_axis", "sync_axes"])
@pytest.mark.parametrize("sync_channels", [False, True], ids=["per_channel", "sync_channels"])
@pytest.mark.parametrize("sigma", [(0.5, 1.0), (0.3, 2.5)], ids=["nnunet_sigma", "wide_sigma"])
@pytest.mark.parametrize("dims", [2, 3])
def test_blur_matches_bgv2(dims, sigma, sync_channels, sync_axes):
    bg = GaussianBlurTransform(sigma, sync_channels, sync_axes, p_per_channel=0.6)
    ours = DeviceGaussianBlur.from_nnunet(bg, apply_probability=0.7)
    assert ours.kernel_width == blur_kernel_size(sigma[1])
    image = _image((8, 3, *SHAPES[dims]))
    params = ours.draw(image)

    def bg_params(b):
        idx = _chosen_idx(params, b)
        if sync_channels:
            sigmas = [float(s) for s in params.sigma[b, 0]]
        else:
            sigmas = [[float(s) for s in params.sigma[b, c]] for c in idx]
        return {"apply_to_channel": params.channels[b], "sigmas": sigmas}

    _check_exact(ours, bg, image, params, bg_params)


@pytest.mark.parametrize("sync_axes", [False, True], ids=["per_axis", "sync_axes"])
@pytest.mark.parametrize("sync_channels", [False, True], ids=["per_channel", "sync_channels"])
def test_blur_parameters_follow_bgv2(sync_channels, sync_axes):
    _seed()
    bg = GaussianBlurTransform((0.5, 1.0), sync_channels, sync_axes, p_per_channel=0.5)
    ours = DeviceGaussianBlur.from_nnunet(bg).draw(torch.zeros(N_DRAWS, 2, 2, 2, 2))
    theirs = _bg_draws(bg, torch.zeros(2, 2, 2, 2))
    _rate(ours.channels.sum(), ours.channels.numel(), 0.5, "ours: chosen channels")
    _rate(sum(int(d["apply_to_channel"].sum()) for d in theirs), 2 * N_DRAWS, 0.5, "bgv2: chosen channels")
    if sync_channels:
        theirs_sigma = np.array([d["sigmas"] for d in theirs])  # (N, 3)
        assert (ours.sigma == ours.sigma[:, :1]).all()
        ours_sigma = ours.sigma[:, 0]
    else:
        theirs_sigma = np.array([s for d in theirs for s in d["sigmas"]])  # (n chosen, 3)
        ours_sigma = ours.sigma[ours.channels]
    # synchronised axes: one sigma per channel in both; otherwise the axes are independent in both
    assert (theirs_sigma == theirs_sigma[:, :1]).all() == sync_axes
    assert bool((ours_sigma == ours_sigma[:, :1]).all()) == sync_axes
    for d in range(3):
        _ks(ours_sigma[:, d], theirs_sigma[:, d], f"blur sigma, axis {d}")
    if not sync_axes:
        _ks(ours_sigma[:, 0] - ours_sigma[:, 1], theirs_sigma[:, 0] - theirs_sigma[:, 1], "axis differences")


# ------------------------------------------------------------------------------------------------------
# multiplicative brightness and contrast


@pytest.mark.parametrize("sync", [False, True], ids=["per_channel", "sync_channels"])
def test_brightness_matches_bgv2(sync):
    bg = MultiplicativeBrightnessTransform(BGContrast((0.75, 1.25)), sync, p_per_channel=0.6)
    ours = DeviceBrightness.from_nnunet(bg, apply_probability=0.7)
    image = _image((8, 3, *SHAPES[3]))
    params = ours.draw(image)
    _check_exact(ours, bg, image, params, lambda b: {"apply_to_channel": _chosen_idx(params, b),
                                                     "multipliers": params.multiplier[b, _chosen_idx(params, b)]})


@pytest.mark.parametrize("preserve_range", [True, False], ids=["preserve_range", "free_range"])
@pytest.mark.parametrize("sync", [False, True], ids=["per_channel", "sync_channels"])
@pytest.mark.parametrize("dims", [2, 3])
def test_contrast_matches_bgv2(dims, sync, preserve_range):
    bg = ContrastTransform(BGContrast((0.5, 2.0)), preserve_range, sync, p_per_channel=0.6)
    ours = DeviceContrast.from_nnunet(bg, apply_probability=0.7)
    image = _image((8, 3, *SHAPES[dims])) * 2 + 1
    params = ours.draw(image)
    _check_exact(ours, bg, image, params, lambda b: {"apply_to_channel": _chosen_idx(params, b),
                                                     "multipliers": params.multiplier[b, _chosen_idx(params, b)]})
    if preserve_range:
        out = ours.apply(image, params)
        assert (out.flatten(2).amin(-1) >= image.flatten(2).amin(-1)).all()
        assert (out.flatten(2).amax(-1) <= image.flatten(2).amax(-1)).all()


@pytest.mark.parametrize("cls,bg_cls,field", [
    (DeviceBrightness, MultiplicativeBrightnessTransform, "multiplier"),
    (DeviceContrast, ContrastTransform, "multiplier"),
], ids=["brightness", "contrast"])
@pytest.mark.parametrize("sync", [False, True], ids=["per_channel", "sync_channels"])
def test_multiplier_parameters_follow_bgv2(cls, bg_cls, field, sync):
    _seed()
    args = (True,) if bg_cls is ContrastTransform else ()  # contrast: preserve_range
    bg = bg_cls(BGContrast((0.75, 1.25)), *args, sync, p_per_channel=0.8)
    ours = cls.from_nnunet(bg).draw(torch.zeros(N_DRAWS, 2, 2, 2, 2))
    theirs = _bg_draws(bg, torch.zeros(2, 2, 2, 2))
    _rate(ours.channels.sum(), ours.channels.numel(), 0.8, "ours: chosen channels")
    _rate(sum(len(d["apply_to_channel"]) for d in theirs), 2 * N_DRAWS, 0.8, "bgv2: chosen channels")
    m = getattr(ours, field)
    theirs_m = np.concatenate([d["multipliers"].numpy() for d in theirs if len(d["apply_to_channel"])])
    _ks(m[ours.channels], theirs_m, "multiplier")
    _rate((m[ours.channels] < 1).sum(), int(ours.channels.sum()), 0.5, "BGContrast: shrinking half the time")
    assert 0.75 <= m.min() and m.max() < 1.25
    assert bool((m == m[:, :1]).all()) == sync


# ------------------------------------------------------------------------------------------------------
# simulated low resolution


def test_low_resolution_index_arithmetic_is_interpolates():
    """The per-axis gather indices and weights reproduce interpolate(nearest-exact) then interpolate(linear)
    for every pair of sizes up to 64 (all at once: one row per downsampled size)."""
    torch.manual_seed(0)
    for size in range(1, 65):
        small = torch.arange(1, size + 1)
        first, second, lam = low_resolution_axis(size, small)
        x = torch.randn(size)
        ours = (1 - lam) * x[first] + lam * x[second]
        for n in range(1, size + 1):
            down = torch.nn.functional.interpolate(x[None, None], size=n, mode="nearest-exact")
            ref = torch.nn.functional.interpolate(down, size=size, mode="linear")[0, 0]
            torch.testing.assert_close(ours[n - 1], ref, rtol=0, atol=1e-6, msg=f"size {size} via {n}")


LOWRES_CASES = {  # (synchronize_channels, synchronize_axes, ignore_axes, allowed_channels)
    "nnunet": (False, True, None, None),
    "per_axis": (False, False, None, None),
    "sync_channels": (True, False, None, None),
    "sync_all": (True, True, None, None),
    "ignore_axis0": (False, True, (0,), None),
    "allowed_0_2": (False, False, (1,), (0, 2)),
}


@pytest.mark.parametrize("case", list(LOWRES_CASES))
@pytest.mark.parametrize("scale", [(0.5, 1), (0.1, 1)], ids=["nnunet_scale", "wide_scale"])
@pytest.mark.parametrize("dims", [2, 3])
def test_low_resolution_matches_bgv2(dims, scale, case):
    sync_c, sync_a, ignore, allowed = LOWRES_CASES[case]
    bg = SimulateLowResolutionTransform(scale, sync_c, sync_a, ignore, allowed, p_per_channel=0.6)
    ours = DeviceLowResolution.from_nnunet(bg, apply_probability=0.7)
    image = _image((8, 3, *SHAPES[dims]))
    params = ours.draw(image)

    def bg_params(b):
        idx = _chosen_idx(params, b)
        return {"apply_to_channel": idx, "scales": params.scales[b, idx]}

    _check_exact(ours, bg, image, params, bg_params)


@pytest.mark.parametrize("case", ["nnunet", "per_axis", "sync_channels", "ignore_axis0", "allowed_0_2"])
def test_low_resolution_parameters_follow_bgv2(case):
    _seed()
    sync_c, sync_a, ignore, allowed = LOWRES_CASES[case]
    bg = SimulateLowResolutionTransform((0.5, 1), sync_c, sync_a, ignore, allowed, p_per_channel=0.5)
    ours = DeviceLowResolution.from_nnunet(bg).draw(torch.zeros(N_DRAWS, 3, 2, 2, 2))
    theirs = _bg_draws(bg, torch.zeros(3, 2, 2, 2))
    theirs_chosen = torch.zeros(N_DRAWS, 3, dtype=torch.bool)
    for i, d in enumerate(theirs):
        theirs_chosen[i, list(map(int, d["apply_to_channel"]))] = True
    allowed_mask = torch.tensor([allowed is None or c in allowed for c in range(3)])
    for name, chosen in (("ours", ours.channels), ("bgv2", theirs_chosen)):
        assert not chosen[:, ~allowed_mask].any(), f"{name}: a channel outside allowed_channels"
        _rate(chosen[:, allowed_mask].sum(), N_DRAWS * int(allowed_mask.sum()), 0.5, f"{name}: chosen channels")
    theirs_scales = torch.cat([d["scales"] for d in theirs if len(d["apply_to_channel"])]).numpy()  # (n, 3)
    ours_scales = ours.scales[ours.channels].numpy()
    free = [d for d in range(3) if d not in (ignore or ())]
    for name, s in (("ours", ours_scales), ("bgv2", theirs_scales)):
        assert (s[:, list(ignore or ())] == 1).all(), f"{name}: an ignored axis is scaled"
        assert bool((s[:, free] == s[:, free[:1]]).all()) == sync_a, f"{name}: axis synchronisation"
    if sync_c:
        assert (ours.scales == ours.scales[:, :1]).all()
    for d in free:
        _ks(ours_scales[:, d], theirs_scales[:, d], f"scale, axis {d}")
    if not sync_a:
        _ks(ours_scales[:, free[0]] - ours_scales[:, free[1]], theirs_scales[:, free[0]] - theirs_scales[:, free[1]],
            "axis differences")


# ------------------------------------------------------------------------------------------------------
# gamma


@pytest.mark.parametrize("p_invert", [0.0, 1.0, 0.5], ids=["upright", "inverted", "mixed"])
@pytest.mark.parametrize("sync", [False, True], ids=["per_channel", "sync_channels"])
@pytest.mark.parametrize("dims", [2, 3])
def test_gamma_matches_bgv2(dims, sync, p_invert):
    bg = GammaTransform(BGContrast((0.7, 1.5)), p_invert, sync, p_per_channel=0.6, p_retain_stats=0.5)
    ours = DeviceGamma.from_nnunet(bg, apply_probability=0.7)
    image = _image((8, 3, *SHAPES[dims])) * 2 + 1
    image[1, 2] = 3.0  # a constant channel: zero range and zero std
    params = ours.draw(image)
    params = params._replace(channels=params.channels.index_fill(0, torch.tensor([1]), True),
                             applied=params.applied.index_fill(0, torch.tensor([1]), True))

    def bg_params(b):
        idx = _chosen_idx(params, b)
        return {"apply_to_channel": idx, "retain_stats": params.retain_stats[b, idx],
                "invert_image": params.invert_image[b, idx], "gamma": params.gamma[b, idx]}

    _check_exact(ours, bg, image, params, bg_params)
    retained = params.applied[:, None] & params.channels & params.retain_stats
    assert retained.any() and (params.applied[:, None] & params.channels & ~params.retain_stats).any()


@pytest.mark.parametrize("sync", [False, True], ids=["per_channel", "sync_channels"])
def test_gamma_parameters_follow_bgv2(sync):
    _seed()
    bg = GammaTransform(BGContrast((0.7, 1.5)), 0.3, sync, p_per_channel=0.8, p_retain_stats=0.6)
    ours = DeviceGamma.from_nnunet(bg).draw(torch.zeros(N_DRAWS, 2, 2, 2, 2))
    theirs = [d for d in _bg_draws(bg, torch.zeros(2, 2, 2, 2)) if len(d["apply_to_channel"])]
    n_theirs = sum(len(d["apply_to_channel"]) for d in theirs)
    _rate(ours.channels.sum(), ours.channels.numel(), 0.8, "ours: chosen channels")
    _rate(n_theirs, 2 * N_DRAWS, 0.8, "bgv2: chosen channels")
    for field, key, p in (("invert_image", "invert_image", 0.3), ("retain_stats", "retain_stats", 0.6)):
        _rate(getattr(ours, field)[ours.channels].sum(), int(ours.channels.sum()), p, f"ours: {field}")
        _rate(sum(int(d[key].sum()) for d in theirs), n_theirs, p, f"bgv2: {field}")
    theirs_gamma = np.concatenate([d["gamma"].numpy() for d in theirs])
    _ks(ours.gamma[ours.channels], theirs_gamma, "gamma")
    assert bool((ours.gamma == ours.gamma[:, :1]).all()) == sync
    assert not (ours.invert_image == ours.invert_image[:, :1]).all()  # never synchronised, also not by bgv2


# ------------------------------------------------------------------------------------------------------
# the whole transforms as nnU-Net configures them: application probability and output statistics


@pytest.mark.parametrize("index", range(7), ids=[_name(t) for t in _nnunet_intensity(3)])
def test_application_probability_is_nnunets(index):
    _seed()
    rt = _nnunet_intensity(3)[index]
    ours = _ours(rt).draw(torch.zeros(4 * N_DRAWS, 2, 2, 2, 2))
    theirs = sum(rt.get_parameters(image=None)["apply_transform"] for _ in range(4 * N_DRAWS))
    _rate(ours.applied.sum(), 4 * N_DRAWS, rt.apply_probability, "ours: applied samples")
    _rate(theirs, 4 * N_DRAWS, rt.apply_probability, "bgv2: applied samples")


def _fixed_image(dims: int) -> torch.Tensor:
    """(2, *S): a smooth ramp with noise, and a positive skewed channel."""
    g = torch.Generator().manual_seed(3)
    shape = SHAPES[dims]
    ramp = sum(torch.linspace(-1, 1, s).reshape([-1 if i == d else 1 for i in range(dims)])
               for d, s in enumerate(shape))
    return torch.stack([ramp + 0.3 * torch.randn(shape, generator=g), torch.randn(shape, generator=g).exp()])


STATS_CASES = [(3, i) for i in range(7)] + [(2, 1), (2, 4)]  # all in 3D; blur and low resolution also in 2D


@pytest.mark.parametrize("dims,index", STATS_CASES,
                         ids=[f"{d}d-{_name(_nnunet_intensity(3)[i])}" for d, i in STATS_CASES])
def test_output_statistics_match_bgv2(dims, index):
    """On a fixed image, per-draw output statistics (per channel: mean, std, mean |change|) of nnU-Net's
    transform (always applied, 600 draws; 300 for blur, slow in bgv2) and ours (one batch as large) have the
    same distributions (KS p > 1e-3) and their averages agree within 5 standard errors."""
    _seed()
    bg = _nnunet_intensity(dims)[index].transform
    n = 300 if isinstance(bg, GaussianBlurTransform) else 600
    image = _fixed_image(dims)
    theirs = torch.stack([bg(image=image.clone())["image"] for _ in range(n)])
    ours = _ours(bg)(image.expand(n, *image.shape).contiguous())
    for name, out in (("ours", ours), ("bgv2", theirs)):
        assert out.shape == (n, *image.shape) and torch.isfinite(out).all(), name

    def stats(out):
        flat, ref = out.flatten(2), image.flatten(1)
        return {"mean": flat.mean(-1), "std": flat.std(-1), "change": (flat - ref).abs().mean(-1)}

    ours_s, theirs_s = stats(ours), stats(theirs)
    for key in ours_s:
        for c in range(2):
            a, b = ours_s[key][:, c].double(), theirs_s[key][:, c].double()
            what = f"{_name(_nnunet_intensity(3)[index])} channel {c} {key}"
            _ks(a, b, what)
            se = math.sqrt(a.var() / n + b.var() / n)
            assert abs(a.mean() - b.mean()) <= 5 * se + 1e-7, what
