"""tests/nnunet/test_optimizer_state.py on CUDA (skipped elsewhere; the mamba-ssm kernels are not needed: no
forward runs). The trainers choose the fused kernel themselves here, and CUDA's fused kernels check that
state and parameters share one layout. Modes: ``graphed`` (one GPU: channels_last_3d, fused), ``eager``
(DDP, torch.compile, NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0: contiguous, fused), ``cpu`` (contiguous, not fused).

    pytest -m gpu tests/nnunet/test_gpu_optimizer_state.py
"""

from __future__ import annotations

import pytest
import test_optimizer_state
import torch
from test_optimizer_state import (  # noqa: F401
    ALL_TRAINERS,
    XS_TRAINERS,
    assert_same,
    assert_state_fits,
    check_skipped_steps,
    drive,
    make_trainer,
    params_of,
    reference,
    saved_tensors,
)

nnunet_dirs = test_optimizer_state.nnunet_dirs  # the same fixture, shared by name

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODES = {"graphed": {"device": "cuda", "channels_last": True}, "eager": {"device": "cuda", "channels_last": False},
         "cpu": {"device": "cpu", "channels_last": False, "scaler": True}}
BUILT_FUSED = {"graphed": True, "eager": True, "cpu": None}  # what each mode's configure_optimizers builds
# CUDA's fused Adam rounds its update differently from the single-tensor loop (values near 0 differ by
# float32 rounding of lr-sized updates): ATOL stays far below one step's update (lr 1e-3)
ATOL = 1e-7


@pytest.mark.parametrize("name", ALL_TRAINERS)
def test_every_trainer_optimizer_on_cuda_fused_sgd_skipped_step(nnunet_dirs, name):
    """Each trainer's optimiser as built on one GPU (fused, channels_last_3d) with its own GradScaler:
    skipped, normal, normal, skipped, normal steps give the reference's parameters (reference on CUDA)."""
    trainer = make_trainer(name, **MODES["graphed"])
    check_skipped_steps(trainer.optimizer, trainer.grad_scaler, torch.amp.GradScaler("cuda"), atol=ATOL)


@pytest.mark.parametrize("name", XS_TRAINERS)
@pytest.mark.parametrize("writer_mode,reader_mode", [("graphed", "eager"), ("eager", "graphed"),
                                                     ("cpu", "graphed"), ("graphed", "cpu")])
def test_checkpoint_continues_in_the_other_mode_on_cuda_resume_across_modes(nnunet_dirs, name, writer_mode,
                                                                             reader_mode):
    """Three GradScaler steps in one mode, nnU-Net's save_checkpoint, the other mode continues (normal,
    skipped, normal): the reference's uninterrupted run (plain optimiser on the CPU). Before the fix a
    channels_last checkpoint crashed CUDA's fused kernel in a contiguous run, and the reverse."""
    writer = make_trainer(name, **MODES[writer_mode])
    params = params_of(writer.optimizer)
    start = [p.detach().cpu() for p in params]
    ref, ref_params = reference(writer.optimizer, start)
    ref_scaler = torch.amp.GradScaler("cpu")
    first, then = [(0, False), (1, False), (2, False)], [(3, False), (4, True), (5, False)]
    drive(writer.optimizer, params, writer.grad_scaler, first)
    path = nnunet_dirs / "checkpoint.pth"
    writer.save_checkpoint(str(path))
    laid_out = [where for where, t in saved_tensors(torch.load(path, weights_only=False)) if not t.is_contiguous()]
    assert not laid_out, f"{len(laid_out)} tensors in the file are not contiguous, e.g. {laid_out[:3]}"

    reader = make_trainer(name, **MODES[reader_mode])
    reader.load_checkpoint(str(path))
    assert_state_fits(reader, BUILT_FUSED[reader_mode])
    drive(reader.optimizer, params_of(reader.optimizer), reader.grad_scaler, then)
    drive(ref, ref_params, ref_scaler, first + then)
    assert_same(params_of(reader.optimizer), ref_params, start, atol=ATOL)


@pytest.mark.parametrize("name", XS_TRAINERS)
@pytest.mark.parametrize("writer_fused", [False, True], ids=["non_fused_writer", "fused_writer"])
def test_checkpoint_continues_with_the_other_kernel_on_cuda_non_fused_checkpoint(nnunet_dirs, name, writer_fused):
    """On one GPU: a checkpoint of a non-fused optimiser (Adam's ``step`` on the CPU) continues in the
    graphed, fused trainer with GradScaler, and a fused one in a non-fused trainer: the reference's update."""
    writer = make_trainer(name, device="cuda", fused=writer_fused, channels_last=writer_fused)
    params = params_of(writer.optimizer)
    start = [p.detach().cpu() for p in params]
    ref, ref_params = reference(writer.optimizer, start)
    first, then = [(0, False), (1, False)], [(2, False), (3, True), (4, False)]
    drive(writer.optimizer, params, writer.grad_scaler, first)
    path = nnunet_dirs / "checkpoint.pth"
    writer.save_checkpoint(str(path))

    reader = make_trainer(name, device="cuda", fused=not writer_fused, channels_last=not writer_fused)
    reader.load_checkpoint(str(path))
    assert_state_fits(reader, not writer_fused)
    drive(reader.optimizer, params_of(reader.optimizer), reader.grad_scaler, then)
    drive(ref, ref_params, torch.amp.GradScaler("cpu"), first + then)
    assert_same(params_of(reader.optimizer), ref_params, start, atol=ATOL)
