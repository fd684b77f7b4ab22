"""Optimisers whose state survives GradScaler's skipped steps and checkpoints across training modes.

The trainers train in several modes: one GPU replaying the step from a CUDA graph (parameters,
gradients and optimiser state channels_last_3d, fused kernel), DDP, ``torch.compile``, the eager step
(``NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0``) and the CPU (all contiguous; fused only on GPUs). A checkpoint
written in one mode must continue in any other, so:

- ``SGD``: ``torch.optim.SGD`` whose fused kernel gives the reference update after a skipped step;
- ``portable_checkpoints(optimizer)``: one layout on disk (contiguous) and, on load, the state in the
  reader's layout, device and implementation flags (the checkpoint's flags describe the writer);
- ``contiguous_state_dict(module)``: the network's weights contiguous in the checkpoint too;
- ``checkpoint_mismatch(...)``: what in a readable checkpoint does not fit this trainer, in words.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

# Param-group entries that say how an optimiser runs, not what it computes: the reader's own apply.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
# What nnU-Net's load_checkpoint reads from every checkpoint.
CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "init_args", "current_epoch", "logging", "_best_ema")


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` (same arguments, same updates) whose fused kernel survives a skipped step.

    When GradScaler skips a step (inf/NaN gradients, common in the first fp16 iterations), stock SGD's
    fused path has already created the momentum buffers with ``torch.empty_like`` and the kernel returns
    without writing them: the state keeps uninitialised memory, and the next step adds
    ``momentum * garbage`` to the update. Deviation from stock: in fused groups, missing momentum buffers
    are created as zeros (the parameter's layout) just before each step. With ``dampening == 0`` that is
    exactly the reference update: the first real step gives ``momentum * 0 + grad = grad``, the buffer
    the reference sets on its first step (after a skipped step it has no buffer at all). Fused groups
    with ``dampening != 0`` are refused: zeros would scale that first buffer by ``1 - dampening``.
    Non-fused groups are untouched (GradScaler never calls their step when it skips).
    """

    def __init__(self, params, *args, **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            _refuse_fused_dampening(group)
        self._register_zero_momentum_hook()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_zero_momentum_hook" not in self.__dict__:  # unpickled or deep-copied: hooks are not pickled
            self._register_zero_momentum_hook()

    def _register_zero_momentum_hook(self) -> None:
        # a step pre-hook (public API) rather than overriding step(): torch wraps both this class's and
        # SGD's step with its hook runner, so an override would run every step hook twice
        self._zero_momentum_hook = self.register_step_pre_hook(_zero_missing_momentum)


def _refuse_fused_dampening(group: dict) -> None:
    if group["fused"] and group["momentum"] != 0 and group["dampening"] != 0:
        raise ValueError(
            f"fused SGD with dampening {group['dampening']} is not supported here: its momentum buffers start "
            "as zeros so that a step GradScaler skips leaves them valid, which equals the reference update only "
            "with dampening 0. Use dampening=0 or fused=False.")


def _zero_missing_momentum(optimizer: Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        if not group["fused"] or group["momentum"] == 0:
            continue
        for p in group["params"]:
            if p.grad is not None and optimizer.state[p].get("momentum_buffer") is None:
                _refuse_fused_dampening(group)  # dampening may come from a loaded checkpoint
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def portable_checkpoints(optimizer: Optimizer) -> Optimizer:
    """Install on ``optimizer`` (and return it) the hooks that make its checkpoints portable between modes.

    ``state_dict()``: state tensors contiguous (a copy where the live one is not), the one layout on disk.
    ``load_state_dict()``: torch keeps the saved layout and the writer's flags; afterwards every state
    tensor takes its parameter's layout (the fused kernel requires it on GPUs and silently misreads a
    different one on CPUs), each param group gets back this optimiser's ``fused``/``foreach``/
    ``capturable``/``differentiable`` as constructed (a non-fused checkpoint would otherwise leave
    ``fused=None`` while the optimiser still tells GradScaler it unscales itself), and Adam's ``step``
    goes where this optimiser keeps it: float32 on the parameter's device when fused or capturable,
    otherwise on the CPU, as its own first step creates it (torch: "special device hosting for step").
    """
    built = [{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group} for group in optimizer.param_groups]

    def fit_to_this_optimizer(opt: Optimizer) -> None:
        for group, flags in zip(opt.param_groups, built):
            group.update(flags)
            on_device = bool(group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                state = opt.state.get(p)
                for key, value in list((state or {}).items()):
                    if not isinstance(value, Tensor):
                        continue
                    if key == "step":
                        state[key] = value.to(dtype=torch.float32, device=p.device) if on_device else value.cpu()
                    elif value.shape == p.shape and value.stride() != p.stride():
                        state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    optimizer.register_state_dict_post_hook(_contiguous_optimizer_state)
    optimizer.register_load_state_dict_post_hook(fit_to_this_optimizer)
    return optimizer


def _contiguous_optimizer_state(optimizer: Optimizer, state_dict: dict) -> None:
    # new per-parameter dicts: the ones state_dict() returns are the optimiser's live state
    state_dict["state"] = {
        index: ({k: v.contiguous() if isinstance(v, Tensor) else v for k, v in state.items()}
                if isinstance(state, dict) else state)
        for index, state in state_dict["state"].items()}


def _contiguous_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


@contextlib.contextmanager
def contiguous_state_dict(module: nn.Module) -> Iterator[None]:
    """Within the block ``module.state_dict()`` holds contiguous tensors (copies of channels_last weights).

    Scoped, not permanent: outside a checkpoint save ``state_dict()`` keeps returning the live tensors
    (nnU-Net's load_checkpoint calls it once per key). ``register_state_dict_post_hook`` is public from
    torch 2.5; on torch 2.4 the same hook goes through the private ``_register_state_dict_hook``.
    """
    register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    handle = register(_contiguous_weights)
    try:
        yield
    finally:
        handle.remove()


def checkpoint_mismatch(checkpoint: dict, network: nn.Module, optimizer: Optimizer) -> List[str]:
    """What keeps a readable nnU-Net checkpoint from fitting ``network`` and ``optimizer``, one line per
    finding (empty: it fits). Keys are matched as nnU-Net's load_checkpoint matches them."""
    problems = _network_mismatch(checkpoint["network_weights"], network)
    return problems + _optimizer_mismatch(checkpoint["optimizer_state"], optimizer)


def _examples(names, limit: int = 3, sep: str = ", ") -> str:
    names = list(names)
    return sep.join(names[:limit]) + (f"{sep}and {len(names) - limit} more" if len(names) > limit else "")


def _network_mismatch(weights: Dict[str, Tensor], network: nn.Module) -> List[str]:
    own = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    theirs = {}
    for key, value in weights.items():  # nnU-Net drops a DataParallel/DDP "module." prefix the network lacks
        theirs[key[7:] if key not in own and key.startswith("module.") else key] = tuple(getattr(value, "shape", ()))
    problems = []
    missing, unexpected = [k for k in own if k not in theirs], [k for k in theirs if k not in own]
    if missing:
        problems.append(f"network: {len(missing)} of this network's tensors are not in the checkpoint "
                        f"({_examples(missing)})")
    if unexpected:
        problems.append(f"network: the checkpoint has {len(unexpected)} tensors this network lacks "
                        f"({_examples(unexpected)})")
    shapes = [f"{k}: {list(theirs[k])} in the checkpoint, {list(own[k])} here" for k in own
              if k in theirs and theirs[k] != own[k]]
    if shapes:
        problems.append(f"network: {len(shapes)} tensors differ in shape ({_examples(shapes, sep='; ')})")
    return problems


def _optimizer_mismatch(saved: dict, optimizer: Optimizer) -> List[str]:
    name = type(optimizer).__name__
    groups, own_groups = saved.get("param_groups", []), optimizer.param_groups
    if len(groups) != len(own_groups):
        return [f"optimizer: {len(groups)} parameter groups in the checkpoint, {len(own_groups)} in this {name}"]
    ignore = {"params", "param_names", "initial_lr", *IMPLEMENTATION_FLAGS}
    theirs = set(groups[0]) - ignore if groups else set()
    own = set(own_groups[0]) - ignore
    if theirs != own:
        return [f"optimizer: the checkpoint's optimizer has settings {sorted(theirs - own)} and lacks "
                f"{sorted(own - theirs)} of this trainer's {name}: a different optimizer wrote it"]
    problems = []
    for i, (group, own_group) in enumerate(zip(groups, own_groups)):
        if len(group["params"]) != len(own_group["params"]):
            problems.append(f"optimizer: group {i} holds {len(group['params'])} parameters in the checkpoint, "
                            f"{len(own_group['params'])} here")
    if problems:
        return problems
    params = {index: p for group, own_group in zip(groups, own_groups)
              for index, p in zip(group["params"], own_group["params"])}
    shapes = [f"parameter {index} {key}: {list(value.shape)} in the checkpoint, {list(params[index].shape)} here"
              for index, state in saved.get("state", {}).items() if index in params
              for key, value in state.items()
              if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[index].shape]
    if shapes:
        problems.append(f"optimizer: {len(shapes)} state tensors differ in shape from their parameters "
                        f"({_examples(shapes, sep='; ')})")
    return problems


__all__ = ["SGD", "portable_checkpoints", "contiguous_state_dict", "checkpoint_mismatch", "CHECKPOINT_KEYS",
           "IMPLEMENTATION_FLAGS"]
