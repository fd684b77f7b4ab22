"""The adapter base of every trainer in this package: a network built from nnU-Net's plan, trained
in nnU-Net's loop with this package's speed machinery, no recipe.

What it changes relative to ``nnUNetTrainer`` (the network and the recipe are the subclasses'):
- torch.compile: off unless ``nnUNet_compile`` is set to true explicitly (nnU-Net 2.8 compiles by
  default on CUDA; the mamba-ssm kernels are opaque to the compiler, see docs/nnunet.md); when it is on,
  the compiled forward runs inside the CUDA-graph step below (compiled kernels, replayed launches);
- data augmentation: nnU-Net's training transforms run batched on the GPU, the worker processes only
  load and crop (``device_augmentation.DeviceAugmentation``; ``NNUNETV2_MOBILEVIM_DEVICE_AUGMENTATION=0``
  keeps nnU-Net's pipeline);
- on a single GPU the whole training step (forward, nnU-Net's loss, GradScaler, clipping, optimiser
  update) is replayed from one CUDA graph, see ``acceleration.training.GraphedTrainStep``; the optimiser
  runs its fused kernel (same update, fewer launches, no host sync; ``optim.SGD`` keeps it exact after
  GradScaler's skipped steps); with an ignore label the loss is ``losses.IgnoreLabelDC_and_CE_loss``
  (nnU-Net's value, no host sync); the step's loss stays on the GPU until the epoch ends (one read-back
  per epoch instead of a host sync per step; the host queues at most ``steps_ahead`` steps ahead, see
  ``acceleration.training.RunAhead``; the logged train loss is the same); ``NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0``
  turns every graph off;
- validation: nnU-Net's step with its loss and Dice counts left on the device until the epoch ends
  (the same logged values, no host sync per step);
- on CUDA nnU-Net's progress.png is drawn in a worker process, not between epochs (``progress_plot``;
  ``NNUNETV2_MOBILEVIM_BACKGROUND_PLOT=0`` draws it in the training process);
- checkpoints are portable between every mode (graphed, eager, DDP, compiled, CPU; fused or not):
  contiguous on disk, re-laid-out for the reader on load (``optim.portable_checkpoints``);
- a checkpoint that is missing, unreadable, or does not fit gives an error that says which and what to do;
- prediction (the network nnU-Net's predictor builds) runs BatchNorm-folded and replayed from a
  CUDA graph on GPUs: same logits, several times fewer kernel launches.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from ..acceleration.inference import FastInference
from ..acceleration.training import GraphedTrainStep, RunAhead
from ..ssm import DualDirectionMamba, describe_backend, resolve_backend
from ..ssm.mamba import Mamba
from .device_augmentation import DeviceAugmentation
from .optim import CHECKPOINT_KEYS, SGD, checkpoint_mismatch, contiguous_state_dict, portable_checkpoints
from .prediction_networks import for_prediction
from .progress_plot import BackgroundProgressPlot
from .switches import cuda_graphs_enabled


def _has_selective_scan(network: nn.Module) -> bool:
    """Whether ``network`` holds a Mamba layer of this package (its scan backend is then worth a log line)."""
    return any(isinstance(m, (Mamba, DualDirectionMamba)) for m in network.modules())


class nnUNetTrainerMambaBase(BackgroundProgressPlot, DeviceAugmentation, nnUNetTrainer):
    """The base of every trainer of this package: a network adapted to nnU-Net, no network and no recipe.

    A network's trainer defines ``network_from_plan`` (and, where its outputs are not nnU-Net's
    UNetDecoder's, ``_get_deep_supervision_scales``); ``build_network_architecture`` (nnU-Net's hook,
    also used by its predictor) wraps it for prediction in ``acceleration.inference.FastInference``.

    A recipe is a subclass that defines ``configure_optimizers`` (wrapping its optimiser in
    ``optim.portable_checkpoints``, passing ``**self._fused()``) and, where it differs from nnU-Net's,
    ``initial_lr`` / ``weight_decay`` / the epoch budget in ``__init__``.
    """

    paper = ""  # for `nnunetv2_mobilevim list`
    recipe = ""
    #: train in channels_last(_3d) on a GPU (where it measured faster), else contiguous
    channels_last = False
    #: replayed steps the host may queue ahead of the GPU (their losses are read back when the epoch ends)
    steps_ahead = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.graphed_train_step: GraphedTrainStep | None = None  # set by initialize() on a single GPU
        #: the network under torch.compile that the graphed step calls (nnUNet_compile=true); None: self.network
        self.compiled_network: nn.Module | None = None
        self.run_ahead = RunAhead(self.steps_ahead)

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, enable_deep_supervision: bool) -> nn.Module:
        """The network for this plan, as its paper defines it: what a trainer for a network overrides."""
        raise NotImplementedError(f"{cls.__name__} builds no network: a network's trainer defines network_from_plan")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = cls.network_from_plan(configuration_manager, num_input_channels, num_output_channels,
                                        enable_deep_supervision)
        # enable_deep_supervision=False is how nnU-Net's predictor builds the network: give it the
        # BatchNorm-folded, CUDA-graph-replayed forward (same logits and state_dict; only in eval on CUDA)
        return network if enable_deep_supervision else for_prediction(network)

    def _build_loss(self):
        """nnU-Net's loss (deep-supervision wrapper and weights included), except that with an ignore label
        and no regions its Dice + CE becomes ``losses.IgnoreLabelDC_and_CE_loss``: the same value and
        gradients without the host sync that a CUDA graph cannot capture. Region losses have none."""
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

        from .losses import IgnoreLabelDC_and_CE_loss

        loss = super()._build_loss()
        wrapped = isinstance(loss, DeepSupervisionWrapper)
        inner = loss.loss if wrapped else loss
        # exactly nnU-Net's class: a trainer that builds its own loss keeps it
        if type(inner) is DC_and_CE_loss and inner.ignore_label is not None:
            inner = IgnoreLabelDC_and_CE_loss.from_nnunet(inner)
            if wrapped:
                loss.loss = inner
            else:
                loss = inner
        return loss

    def _do_i_compile(self) -> bool:
        flag = os.environ.get("nnUNet_compile", "").lower()
        return flag in ("true", "1", "t") and self.device.type == "cuda"

    def _use_cuda_graphs(self) -> bool:
        """Graph the training step on one GPU (DDP brings SyncBatchNorm and gradient hooks), with the compiled
        forward inside where ``nnUNet_compile`` asks for it; ``NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0`` turns it off."""
        return cuda_graphs_enabled() and self.device.type == "cuda" and not self.is_ddp

    def _fused(self) -> dict:
        """The optimiser's fused kernel on GPUs: the same update as the per-tensor loop in a few launches,
        and with GradScaler no host sync for the inf check (the scaler hands ``found_inf`` to the kernel),
        so the update is queued behind the backward instead of waiting for it."""
        return {"fused": True} if self.device.type == "cuda" else {}

    def configure_optimizers(self):
        # deliberately not nnU-Net's: its torch.optim.SGD, unwrapped, would write checkpoints that other modes
        # cannot continue; each recipe names its optimiser
        raise NotImplementedError(
            f"{type(self).__name__} has no recipe: a trainer defines configure_optimizers. "
            "Train one of the recipes (`nnunetv2_mobilevim list` shows them), or subclass one of them.")

    def nnunet_sgd(self):
        """nnU-Net's recipe (SGD, Nesterov 0.99, poly decay, its lr and weight decay) with the fused kernel;
        ``optim.SGD``: torch's, with a fused kernel that survives GradScaler's skipped steps."""
        optimizer = portable_checkpoints(SGD(self.network.parameters(), self.initial_lr, momentum=0.99,
                                             weight_decay=self.weight_decay, nesterov=True, **self._fused()))
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def initialize(self):
        super().initialize()
        if self._use_cuda_graphs() and not self.optimizer.defaults.get("fused"):
            # an unfused optimiser under GradScaler checks for infs on the host: a graph cannot hold that
            self.print_to_log_file(f"CUDA-graph training step off: {type(self.optimizer).__name__} has no fused "
                                   "kernel here; the step runs eagerly (same updates)")
        elif self._use_cuda_graphs():
            network = self.network
            if hasattr(network, "_orig_mod"):  # nnU-Net compiled it: the step calls the compiled module,
                self.compiled_network, network = network, network._orig_mod  # validation the eager one
            if self.channels_last:  # the optimiser keeps the same Parameters
                three_d = len(self.configuration_manager.patch_size) == 3
                network.to(memory_format=torch.channels_last_3d if three_d else torch.channels_last)
            # validation: BatchNorm folded, replayed
            self.network = network if isinstance(network, FastInference) else FastInference(network)
            self.graphed_train_step = self._new_graphed_step()

    def _new_graphed_step(self) -> GraphedTrainStep:
        return GraphedTrainStep(self._train_step_on_device, [self.optimizer], log=self.print_to_log_file)

    def train_step(self, batch: dict) -> dict:
        batch = self.augment_batch(batch)
        if self.graphed_train_step is None:
            self.prefetch_next_batch()
            return super().train_step(batch)
        target = batch["target"]
        loss = self.graphed_train_step(batch["data"], *(target if isinstance(target, list) else [target]))
        self.prefetch_next_batch()  # overlaps the replayed step
        self.run_ahead.step_queued(self.device)
        return {"loss": loss}  # on the device: on_train_epoch_end reads the epoch's losses back at once

    def on_train_epoch_end(self, train_outputs: list) -> None:
        super().on_train_epoch_end(outputs_on_host(train_outputs))

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net 2.8's ``validation_step`` in its order and with its arguments, except that its four results
        stay on the device: nnU-Net reads each back (``.cpu()``), so the host waits for every step and the
        GPU idles while the next batch is fetched and launched. ``on_validation_epoch_end`` reads the
        epoch's back at once, as the same arrays. Deliberately a copy, not a call: the read-backs are
        inside nnU-Net's step."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else nullcontext():
            output = self.network(data)
            del data
            loss = self.loss(output, target)
        if self.enable_deep_supervision:  # the online Dice uses the full-resolution output only
            output, target = output[0], target[0]
        axes = [0] + list(range(2, output.ndim))
        labels = self.label_manager
        if labels.has_regions:
            predicted = (torch.sigmoid(output) > 0.5).long()
        else:
            predicted = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
            predicted.scatter_(1, output.argmax(1)[:, None], 1)
        mask = None
        if labels.has_ignore_label:
            if not labels.has_regions:
                mask = (target != labels.ignore_label).float()
                target[target == labels.ignore_label] = 0  # in place, as nnU-Net does
            else:
                mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
                target = target[:, :-1]
        tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, target, axes=axes, mask=mask)
        first = 0 if labels.has_regions else 1  # with softmax outputs the background's Dice is not reported
        return {"loss": loss.detach(), "tp_hard": tp.detach()[first:], "fp_hard": fp.detach()[first:],
                "fn_hard": fn.detach()[first:]}

    def on_validation_epoch_end(self, val_outputs: list) -> None:
        super().on_validation_epoch_end(outputs_on_host(val_outputs))

    def _train_step_on_device(self, data: torch.Tensor, *target: torch.Tensor) -> torch.Tensor:
        """nnU-Net 2.8's ``train_step`` from the forward to the optimiser step, in its order and with its
        arguments, on tensors already on the device, for ``GraphedTrainStep`` (gradients start as None, as
        after nnU-Net's zero_grad). Deliberately a copy of those lines, not a call: nnU-Net's step also
        copies the batch to the GPU and reads the loss back to the host, which a CUDA graph cannot hold.
        ``data`` (B, C, D, H, W); ``target`` one (B, 1 or regions, D', H', W') map per deep-supervision
        output. Runs on any device (the CPU tests compare it with nnU-Net's step). Calls the compiled network
        where there is one (the same module, compiled), as nnU-Net's step calls its compiled ``self.network``."""
        network = self.network if self.compiled_network is None else self.compiled_network
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else nullcontext():
            output = network(data)
            loss = self.loss(output, list(target) if self.enable_deep_supervision else target[0])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return loss.detach()

    def on_train_start(self):
        super().on_train_start()
        on_cuda = self.device.type == "cuda"
        scans = _has_selective_scan(self.network)  # nnU-Net's own networks (nnUNetTrainer_Accelerated) have none
        scan = f"selective scan backend: {resolve_backend(on_cuda)}" if scans else "no selective scan"
        self.print_to_log_file(
            f"{self.describe_network()}, {scan}, torch.compile: "
            f"{self._do_i_compile()}{' (inside the graph)' if self.compiled_network is not None else ''}, "
            f"CUDA-graph training step: {self.graphed_train_step is not None}"
            + (f"\n{describe_backend(on_cuda)}" if scans else ""))

    def describe_network(self) -> str:
        """One line for the training log."""
        network = self.network.module if self.is_ddp else self.network
        network = getattr(network, "network", network)  # inside FastInference
        return f"network {getattr(getattr(network, 'config', None), 'name', type(network).__name__)}"

    def save_checkpoint(self, filename: str) -> None:
        # one layout on disk: the network's weights contiguous (the optimiser's state: portable_checkpoints)
        network = self.network.module if self.is_ddp else self.network
        with contiguous_state_dict(getattr(network, "_orig_mod", network)):  # the module nnU-Net saves
            super().save_checkpoint(filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's load_checkpoint, with errors that say which of three things happened and what to do:
        the file is missing; it cannot be read (truncated, corrupt, not a checkpoint); or it is a readable
        checkpoint that does not fit this trainer (naming what differs). The file is never modified."""
        path = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else None
        source = f"the checkpoint {path}" if path is not None else "the checkpoint (given as a dict)"
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(
                f"{source} does not exist. Check the path; with --c nnU-Net itself looks for checkpoint_final.pth, "
                "then checkpoint_latest.pth, then checkpoint_best.pth in the fold's folder.")
        unreadable = ("The file is truncated, corrupt, or not a checkpoint; it was not modified. To resume from an "
                      "earlier state, move this file away and run again with --c (nnU-Net then falls back to "
                      "checkpoint_latest.pth or checkpoint_best.pth); to start over, run without --c.")
        checkpoint = filename_or_checkpoint
        if path is not None:
            try:
                checkpoint = torch.load(path, map_location=self.device, weights_only=False)  # as nnU-Net loads it
            except Exception as err:  # truncated zip, unpickling error, ...: torch raises many kinds
                raise RuntimeError(f"could not read {source}: {type(err).__name__}: {err}\n{unreadable}") from err
        lacking = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
        if lacking:
            raise RuntimeError(f"{source} is readable but not an nnU-Net checkpoint (it lacks {', '.join(lacking)}).\n"
                               f"{unreadable}")
        if not self.was_initialized:
            self.initialize()
        network = self.network.module if self.is_ddp else self.network
        network = getattr(network, "_orig_mod", network)
        problems = checkpoint_mismatch(checkpoint, network, self.optimizer)
        writer = checkpoint.get("trainer_name", "an unknown trainer")
        configuration = (checkpoint["init_args"] or {}).get("configuration", "?")
        network_name = getattr(getattr(network, "config", None), "name", type(network).__name__)
        what = f"{self.__class__.__name__} (network {network_name}, optimizer {type(self.optimizer).__name__})"
        advice = (f"It was written by {writer} ({configuration}); the file was not modified. "
                  + (f"Continue it with -tr {writer}, or, to " if writer != self.__class__.__name__ else
                     "The same trainer wrote it, with other plans or another version of this package. To ")
                  + f"train {self.__class__.__name__} from scratch, run without --c (copy the file elsewhere first "
                  "if you want to keep it: the new run's checkpoints replace it).")
        if problems:
            raise RuntimeError(f"{source} does not fit this trainer, {what}:\n  - " + "\n  - ".join(problems)
                               + f"\n{advice}")
        try:
            # nnU-Net 2.8's load_checkpoint works from a path only (given a dict, its `checkpoint` stays
            # unbound), so it reads the file a second time
            super().load_checkpoint(filename_or_checkpoint)
        except Exception as err:
            if path is None:
                raise
            raise RuntimeError(f"{source} does not fit this trainer, {what}: {type(err).__name__}: {err}\n"
                               f"{advice}") from err
        if self.graphed_train_step is not None and len(self.graphed_train_step):
            # the optimiser's state tensors were replaced: a captured step would still update the old ones
            self.graphed_train_step = self._new_graphed_step()


def outputs_on_host(outputs: list) -> list:
    """``train_step`` / ``validation_step`` outputs with every device tensor among their values read back,
    one transfer per key, as the arrays nnU-Net's own steps return (``t.detach().cpu().numpy()``: same
    dtype and shape, 0-d for a loss), so that ``collate_outputs`` and the logged values do not change;
    values already on the host are kept, and a list without device tensors is returned as it is."""
    keys = list(dict.fromkeys(k for out in outputs for k, v in out.items() if torch.is_tensor(v)))
    if not keys:
        return outputs
    host = [dict(out) for out in outputs]
    for key in keys:
        where = [i for i, out in enumerate(outputs) if torch.is_tensor(out.get(key))]
        values = torch.stack([outputs[i][key].detach() for i in where]).cpu().numpy()
        for j, i in enumerate(where):
            host[i][key] = values[j:j + 1].reshape(values.shape[1:])  # an array, also when 0-d
    return host
