"""Optimiser state across GradScaler's skipped steps, and checkpoints across training modes, on the CPU.

Every trainer here is built by nnU-Net's own ``__init__`` and ``initialize()`` (its ``configure_optimizers``
included) from a tiny plan; checkpoints go through nnU-Net's ``save_checkpoint``/``load_checkpoint``.
Modes: ``graphed`` is single-GPU training's (network and optimiser state channels_last_3d, fused kernel:
torch has fused SGD/AdamW kernels on the CPU too, forced on through the trainer's ``_fused``), ``eager``
what the trainer builds on the CPU (contiguous, not fused; DDP, ``torch.compile`` and
``NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0`` are contiguous as well). Gradients are synthetic (seeded, written in
the parameter's layout as autograd writes them): the subject is the optimiser and the checkpoint, not
the network. The reference is torch's plain optimiser (``foreach=False``, not fused) with the trainer's
hyperparameters on contiguous copies, driven by its own GradScaler through the same sequence.
tests/nnunet/test_gpu_optimizer_state.py repeats this on CUDA.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest
import torch

from nnunetv2_mobilevim.nnunet import optim, trainers

DATASET = "Dataset999_Tiny"
ARCHITECTURE = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]},
                "_kw_requires_import": []}
PLANS = {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
         "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [16, 16, 16],
         "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
         "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
         "foreground_intensity_properties_per_channel": {},
         "configurations": {"3d_fullres": {
             "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
             "patch_size": [16, 16, 16], "median_image_size_in_voxels": [16, 16, 16], "spacing": [1.0, 1.0, 1.0],
             "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
             "architecture": ARCHITECTURE, "batch_dice": False}}}
DATASET_JSON = {"channel_names": {"0": "ct"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1,
                "file_ending": ".nii.gz"}
ALL_TRAINERS = ["nnUNetTrainerMobileViM", "nnUNetTrainerMobileViM_xs", "nnUNetTrainerMobileViM_SGD",
                "nnUNetTrainerMobileViM_xs_SGD"]
XS_TRAINERS = ["nnUNetTrainerMobileViM_xs", "nnUNetTrainerMobileViM_xs_SGD"]  # one per optimiser, the smaller net
MODES = {"graphed": {"fused": True, "channels_last": True}, "eager": {"fused": None, "channels_last": False}}
Step = Tuple[int, bool]  # (gradient seed, gradient holds an inf so GradScaler skips the step)


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch) -> Path:
    """nnU-Net's folders in ``tmp_path`` (its paths are read from the environment when used)."""
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    monkeypatch.setenv("NNUNETV2_MOBILEVIM_CUDA_GRAPHS", "0")  # the tests set each mode's layout themselves
    data = tmp_path / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case_000.b2nd").touch()  # initialize() picks its dataset class from file endings; no data is read
    return tmp_path


def make_trainer(name: str, device: str = "cpu", fused: Optional[bool] = None, channels_last: bool = False,
                 scaler: bool = False):
    """Trainer ``name`` after nnU-Net's initialize(); ``fused`` not None overrides the trainer's choice of
    kernel, ``channels_last`` lays the network out as single-GPU (graphed) training does, ``scaler`` gives
    a CPU trainer a GradScaler as a GPU trainer has one."""
    plans = copy.deepcopy(PLANS)
    plans["continue_training"] = False  # what nnU-Net's run_training sets before building a trainer
    trainer = getattr(trainers, name)(plans, "3d_fullres", 0, DATASET_JSON, torch.device(device))
    if fused is not None:
        trainer._fused = lambda: {"fused": fused}  # what _fused answers on a GPU (True) or for a non-fused run
    trainer.initialize()
    # the mode's layout, as initialize() sets it on one GPU (set here both ways: initialize() may already have
    # done it); the optimiser keeps the same Parameters
    trainer.network.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    assert any(not p.is_contiguous() for p in trainer.network.parameters()) == channels_last
    if scaler and trainer.grad_scaler is None:
        trainer.grad_scaler = torch.amp.GradScaler(device)
    return trainer


def params_of(optimizer: torch.optim.Optimizer) -> List[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def reference(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]):
    """torch's plain optimiser of ``optimizer``'s family and hyperparameters on contiguous copies of ``params``."""
    cls = torch.optim.SGD if isinstance(optimizer, torch.optim.SGD) else torch.optim.AdamW
    assert isinstance(optimizer, cls)
    accepted = inspect.signature(cls).parameters
    hyper = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in optim.IMPLEMENTATION_FLAGS}
    copies = [p.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for p in params]
    return cls(copies, **hyper, foreach=False, fused=False), copies


def gradients(params: Sequence[torch.Tensor], seed: int) -> List[torch.Tensor]:
    """Seeded gradients (generated on the CPU, so every device and mode sees the same values)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]


def fill_freed_memory_with_nan(params: Sequence[torch.Tensor]) -> None:
    """Leave NaN in memory the allocator hands out next: a state tensor created with ``empty_like`` and
    never written then shows up as NaN instead of depending on what that memory held before."""
    for _ in range(2):
        junk = [torch.full_like(p, float("nan")) for p in params]
        del junk


def drive(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], scaler, steps: Sequence[Step]) -> None:
    """nnU-Net's step order for each (seed, skipped): zero_grad, scale the loss, backward (here the scaled
    gradients are written directly, in the parameter's layout), unscale_, step, update."""
    for seed, skipped in steps:
        optimizer.zero_grad(set_to_none=True)
        scale = 1.0
        if scaler is not None:  # a power of two: scaled and unscaled gradients are exact
            scale = scaler.scale(torch.ones((), device=params[0].device)).item()
        for p, g in zip(params, gradients(params, seed)):
            p.grad = torch.empty_like(p).copy_(g * scale)
        if skipped:
            assert scaler is not None
            params[0].grad[(0,) * params[0].dim()] = float("inf")
        if scaler is None:
            optimizer.step()
            continue
        scaler.unscale_(optimizer)
        if skipped:
            fill_freed_memory_with_nan(params)
        scaler.step(optimizer)
        scaler.update()


def assert_same(params: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], start: Sequence[torch.Tensor],
                rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """``params`` equal ``expected`` to ``rtol`` (``atol`` for values near 0, far below any update), and the
    reference moved (so the comparison can fail)."""
    got = torch.cat([p.detach().cpu().flatten() for p in params])
    want = torch.cat([p.detach().cpu().flatten() for p in expected])
    moved = (want - torch.cat([p.detach().cpu().flatten() for p in start])).abs().max().item()
    assert moved > 100 * atol, "the reference did not move: the comparison would prove nothing"
    excess = ((got - want).abs() - rtol * want.abs()).nan_to_num(float("inf"))
    worst = int(excess.argmax())
    assert excess[worst] <= atol, (f"{int((excess > atol).sum())} of {got.numel()} values differ from the reference, "
                                   f"worst {got[worst].item():.9g} vs {want[worst].item():.9g} "
                                   f"(largest update of the reference {moved:.3g})")


def saved_tensors(obj, where: str = "checkpoint"):
    """(place, tensor) for every tensor in a loaded checkpoint."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from saved_tensors(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from saved_tensors(value, f"{where}[{i}]")


def assert_state_fits(trainer, built_fused) -> None:
    """The loaded optimiser runs as built (its own ``fused``), every state tensor in its parameter's layout,
    Adam's ``step`` where this optimiser creates it (float32 on the device when fused, else on the CPU)."""
    groups = trainer.optimizer.param_groups
    assert [group["fused"] for group in groups] == [built_fused] * len(groups)
    for p in params_of(trainer.optimizer):
        for key, value in trainer.optimizer.state[p].items():
            if key == "step":
                assert value.dtype == torch.float32
                assert value.device == (p.device if built_fused else torch.device("cpu"))
            elif isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert value.stride() == p.stride() and value.device == p.device, key


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ALL_TRAINERS)
def test_every_trainer_optimizer_gives_reference_update_fused_sgd_skipped_step(nnunet_dirs, name):
    """Each trainer's optimiser, fused, as its configure_optimizers builds it: a first step that GradScaler
    skips (inf gradient), normal steps, another skipped step, a normal step: the reference's parameters.
    Fused SGD before the fix kept its ``empty_like`` momentum buffers (here NaN) after the skipped step."""
    trainer = make_trainer(name, fused=True)
    check_skipped_steps(trainer.optimizer, torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu"))


def check_skipped_steps(optimizer, scaler, reference_scaler, **tolerance) -> None:
    """A fused ``optimizer`` driven through skipped, normal, normal, skipped, normal steps by ``scaler``
    gives the parameters of PyTorch's reference optimiser driven by ``reference_scaler``."""
    assert all(group["fused"] for group in optimizer.param_groups)
    params = params_of(optimizer)
    start = [p.detach().clone() for p in params]
    ref, ref_params = reference(optimizer, params)
    steps = [(0, True), (1, False), (2, False), (3, True), (4, False)]
    drive(optimizer, params, scaler, steps)
    drive(ref, ref_params, reference_scaler, steps)
    assert_same(params, ref_params, start, **tolerance)


def test_fused_sgd_with_dampening_is_refused_fused_sgd_skipped_step():
    """Zero momentum buffers equal the reference only with dampening 0: other dampening is refused."""
    param = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="dampening"):
        optim.SGD([param], lr=0.1, momentum=0.9, dampening=0.1, fused=True)
    optim.SGD([param], lr=0.1, momentum=0.9, dampening=0.1)  # not fused: torch's own, allowed


@pytest.mark.parametrize("name", XS_TRAINERS)
@pytest.mark.parametrize("writer_mode,reader_mode", [("graphed", "eager"), ("eager", "graphed")])
def test_checkpoint_continues_in_the_other_mode_resume_across_modes(nnunet_dirs, name, writer_mode, reader_mode):
    """Three steps in one mode, nnU-Net's save_checkpoint, a new trainer in the other mode continues from
    it (nnU-Net's load_checkpoint) for three steps: the reference's six uninterrupted steps. The file holds
    contiguous tensors only; the reader's state takes its parameters' layout and its own kernel."""
    writer = make_trainer(name, **MODES[writer_mode])
    params = params_of(writer.optimizer)
    start = [p.detach().clone() for p in params]
    ref, ref_params = reference(writer.optimizer, params)
    first, then = [(seed, False) for seed in range(3)], [(seed, False) for seed in range(3, 6)]
    drive(writer.optimizer, params, None, first)
    path = nnunet_dirs / "checkpoint.pth"
    writer.save_checkpoint(str(path))

    reader = make_trainer(name, **MODES[reader_mode])
    reader.load_checkpoint(str(path))
    drive(reader.optimizer, params_of(reader.optimizer), None, then)
    drive(ref, ref_params, None, first + then)
    assert_same(params_of(reader.optimizer), ref_params, start)

    laid_out = [where for where, t in saved_tensors(torch.load(path, weights_only=False)) if not t.is_contiguous()]
    assert not laid_out, f"{len(laid_out)} tensors in the file are not contiguous, e.g. {laid_out[:3]}"
    assert_state_fits(reader, MODES[reader_mode]["fused"])


def test_compiled_graphed_mode_hands_the_compiled_network_to_the_step_resume_across_modes(nnunet_dirs):
    """``nnUNet_compile`` on one GPU (both switches, and the fused kernel, answered here as there; no kernel
    runs): nnU-Net's initialize compiles the network; ours gives the compiled module to the graphed step and
    the eager network, wrapped for validation, to everything else, one set of Parameters for all three
    and the optimiser. Its checkpoint (weights trained in place) continues in an eager trainer."""
    from nnunetv2_mobilevim.acceleration.inference import FastInference

    plans = copy.deepcopy(PLANS)
    plans["continue_training"] = False
    trainer = trainers.nnUNetTrainerMobileViM_xs(plans, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    trainer._do_i_compile = trainer._use_cuda_graphs = lambda: True
    trainer._fused = lambda: {"fused": True}
    trainer.initialize()
    compiled = trainer.compiled_network
    assert compiled is not None and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(trainer.network, FastInference) and trainer.network.network is compiled._orig_mod
    assert trainer.graphed_train_step is not None
    params = params_of(trainer.optimizer)
    ids = list(map(id, params))
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in trainer.network.parameters()] == ids
    with torch.no_grad():
        for p, g in zip(params, gradients(params, 0)):
            p.add_(g)
    path = nnunet_dirs / "checkpoint.pth"
    trainer.save_checkpoint(str(path))
    reader = make_trainer("nnUNetTrainerMobileViM_xs")
    reader.load_checkpoint(str(path))
    assert all(torch.equal(a, b.contiguous()) for a, b in zip(params_of(reader.optimizer), params))


@pytest.mark.parametrize("name", XS_TRAINERS)
@pytest.mark.parametrize("writer_fused", [False, True], ids=["non_fused_writer", "fused_writer"])
def test_checkpoint_continues_with_the_other_kernel_non_fused_checkpoint(nnunet_dirs, name, writer_fused):
    """A checkpoint of a non-fused optimiser (``fused=None`` in its param groups, Adam's ``step`` on the CPU)
    continues in a fused trainer under GradScaler (normal, skipped, normal steps): the reference's update;
    and a fused one continues in a non-fused trainer. Before the fix the fused reader took ``fused=None``
    from the file while telling GradScaler it unscales itself: AssertionError at its first step."""
    writer = make_trainer(name, fused=True if writer_fused else None, scaler=True)
    params = params_of(writer.optimizer)
    start = [p.detach().clone() for p in params]
    ref, ref_params = reference(writer.optimizer, params)
    ref_scaler = torch.amp.GradScaler("cpu")
    first, then = [(0, False), (1, False)], [(2, False), (3, True), (4, False)]
    drive(writer.optimizer, params, writer.grad_scaler, first)
    path = nnunet_dirs / "checkpoint.pth"
    writer.save_checkpoint(str(path))
    saved = torch.load(path, weights_only=False)["optimizer_state"]
    assert bool(saved["param_groups"][0]["fused"]) == writer_fused  # the file is what this test says it is
    if "step" in saved["state"][0]:
        assert saved["state"][0]["step"].device.type == "cpu"

    reader = make_trainer(name, fused=None if writer_fused else True, scaler=True)
    reader.load_checkpoint(str(path))
    drive(reader.optimizer, params_of(reader.optimizer), reader.grad_scaler, then)
    drive(ref, ref_params, ref_scaler, first + then)
    assert_same(params_of(reader.optimizer), ref_params, start)
    assert_state_fits(reader, None if writer_fused else True)


def test_unreadable_checkpoint_is_reported_as_unreadable_silent_fallback(nnunet_dirs):
    """Truncated, not a checkpoint at all, readable but no nnU-Net checkpoint, missing: each says which,
    with what to do, and the file keeps its bytes."""
    trainer = make_trainer("nnUNetTrainerMobileViM_xs")
    good = nnunet_dirs / "good.pth"
    trainer.save_checkpoint(str(good))
    truncated, garbage, foreign = (nnunet_dirs / f"{n}.pth" for n in ("truncated", "garbage", "foreign"))
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    garbage.write_bytes(b"this is not a checkpoint\n" * 100)
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path, says in ((truncated, "could not read"), (garbage, "could not read"),
                       (foreign, "readable but not an nnU-Net checkpoint")):
        before = digest(path)
        with pytest.raises(RuntimeError) as info:
            trainer.load_checkpoint(str(path))
        message = str(info.value)
        assert says in message and str(path) in message, message
        assert "truncated, corrupt" in message and "--c" in message and "not modified" in message, message
        assert "does not fit" not in message and "different network" not in message, message
        assert digest(path) == before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer.load_checkpoint(str(nnunet_dirs / "missing.pth"))


def test_checkpoint_of_another_network_names_the_mismatch_silent_fallback(nnunet_dirs):
    """A valid MobileViM_xs checkpoint into a MobileViM_s trainer: 'does not fit', the differing tensors
    with both shapes, who wrote it; neither the file nor the trainer's weights change."""
    writer = make_trainer("nnUNetTrainerMobileViM_xs")
    path = nnunet_dirs / "xs.pth"
    writer.save_checkpoint(str(path))
    before = digest(path)
    reader = make_trainer("nnUNetTrainerMobileViM")
    weights = {k: v.clone() for k, v in reader.network.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        reader.load_checkpoint(str(path))
    message = str(info.value)
    assert "does not fit this trainer, nnUNetTrainerMobileViM (network MobileViM_s" in message, message
    assert "differ in shape" in message and "in the checkpoint" in message, message
    assert "written by nnUNetTrainerMobileViM_xs" in message and "-tr nnUNetTrainerMobileViM_xs" in message, message
    assert "could not read" not in message and "truncated" not in message, message
    assert digest(path) == before
    assert all(torch.equal(v, weights[k]) for k, v in reader.network.state_dict().items())
    assert reader.current_epoch == 0


def test_checkpoint_of_another_optimizer_names_the_mismatch_silent_fallback(nnunet_dirs):
    """The same network trained with AdamW, continued by the SGD trainer: 'does not fit', naming the
    optimiser settings that differ (before the fix it loaded and failed at the first step)."""
    writer = make_trainer("nnUNetTrainerMobileViM_xs")
    drive(writer.optimizer, params_of(writer.optimizer), None, [(0, False)])
    path = nnunet_dirs / "adamw.pth"
    writer.save_checkpoint(str(path))
    before = digest(path)
    reader = make_trainer("nnUNetTrainerMobileViM_xs_SGD")
    with pytest.raises(RuntimeError) as info:
        reader.load_checkpoint(str(path))
    message = str(info.value)
    assert "does not fit this trainer" in message and "optimizer SGD" in message, message
    assert "'betas'" in message and "'momentum'" in message, message
    assert digest(path) == before
