"""nnU-Net trainers that train MobileViM. They adapt the network to nnU-Net and hold no network code.

    export nnUNet_extTrainer=$(nnunetv2_mobilevim ext-path)
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMobileViM       # MobileViM_s, AdamW + cosine
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMobileViM_xs    # MobileViM_xs, AdamW + cosine
    ... -tr nnUNetTrainerMobileViM_SGD | nnUNetTrainerMobileViM_xs_SGD       # nnU-Net's own recipe

What they change relative to ``nnUNetTrainer``:
- the network: MobileViM built from the plan (patch size, the first four per-axis pooling strides,
  input channels, segmentation heads); 3D configurations only;
- deep-supervision scales: taken from the network, so every output has a target of its size;
- torch.compile: off unless ``nnUNet_compile`` is set to true explicitly (nnU-Net 2.8 compiles by
  default on CUDA; the mamba-ssm kernels are opaque to the compiler, see docs/nnunet.md);
- on a single GPU the whole training step (forward, nnU-Net's loss, GradScaler, clipping, optimiser
  update) is replayed from one CUDA graph, see ``graphed_training.GraphedTrainStep``; the optimiser
  runs its fused kernel (same update, fewer launches, no host sync);
- a truncated or corrupt checkpoint gives an error that says what to do;
- prediction (the network nnU-Net's predictor builds) runs BatchNorm-folded and replayed from a
  CUDA graph on GPUs: same logits, several times fewer kernel launches.
The recipe: AdamW (lr 1e-3, weight decay 0.03) with a cosine schedule, the paper's optimiser family,
chosen by measurement over nnU-Net's SGD + poly (docs/results.md); everything else is nnU-Net's
(1000 epochs x 250 iterations, Dice + CE with deep supervision, fp16 AMP, augmentation). The ``_SGD``
trainers keep nnU-Net's optimiser and schedule unchanged.
"""

from __future__ import annotations

import math
import os
from typing import List

import torch
from torch.optim.lr_scheduler import _LRScheduler
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from ..graphed_training import GraphedTrainStep
from ..network import NUM_DOWNSAMPLINGS, MobileViM, deep_supervision_scales
from ..scan import resolve_backend

THREE_D_CONFIGURATIONS = ("3d_fullres", "3d_lowres", "3d_cascade_fullres")


def strides_from_plan(configuration_manager: ConfigurationManager) -> List[List[int]]:
    """The plan's first four pooling strides (after the stride-1 first stage), padded with 1s."""
    pools = [list(map(int, p)) for p in configuration_manager.pool_op_kernel_sizes]
    strides = pools[1:NUM_DOWNSAMPLINGS + 1]
    return strides + [[1, 1, 1]] * (NUM_DOWNSAMPLINGS - len(strides))


def require_3d(configuration_manager: ConfigurationManager, configuration: str = "") -> None:
    """RuntimeError for 2D configurations, naming the ones that work."""
    if len(configuration_manager.patch_size) != 3:
        raise RuntimeError(
            f"MobileViM is a 3D network and cannot train the 2D configuration {configuration or '2d'!r} "
            f"(patch {list(configuration_manager.patch_size)}). Use one of {', '.join(THREE_D_CONFIGURATIONS)} "
            f"(whichever your plans contain), e.g. nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMobileViM.")


class nnUNetTrainerMobileViM_SGD(nnUNetTrainer):
    """MobileViM_s with nnU-Net's own recipe (SGD, Nesterov 0.99, lr 1e-2, poly decay, weight decay
    3e-5; fused kernel on GPUs). The base of every MobileViM trainer: it adapts the network to nnU-Net."""

    mobilevim_variant = "s"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        require_3d(self.configuration_manager, configuration)
        self.graphed_train_step: GraphedTrainStep | None = None  # set by initialize() on a single GPU

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> MobileViM:
        require_3d(configuration_manager)
        # enable_deep_supervision=False is how nnU-Net's predictor builds the network: give it the
        # BatchNorm-folded, CUDA-graph-replayed forward (same logits; only active in eval on CUDA).
        network = MobileViM(input_channels=num_input_channels, num_classes=num_output_channels,
                            variant=cls.mobilevim_variant, strides=strides_from_plan(configuration_manager),
                            deep_supervision=enable_deep_supervision, fast_inference=not enable_deep_supervision)
        network.check_input_size(configuration_manager.patch_size)
        return network

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return deep_supervision_scales(strides_from_plan(self.configuration_manager))

    def _do_i_compile(self) -> bool:
        flag = os.environ.get("nnUNet_compile", "").lower()
        return flag in ("true", "1", "t") and self.device.type == "cuda"

    def _use_cuda_graphs(self) -> bool:
        """Graph the training step on one GPU without torch.compile (DDP brings SyncBatchNorm and
        gradient hooks, the compiler its own graphs); ``NNUNETV2_MOBILEVIM_CUDA_GRAPHS=0`` turns it off."""
        flag = os.environ.get("NNUNETV2_MOBILEVIM_CUDA_GRAPHS", "1").lower()
        return (flag not in ("0", "false", "f", "no") and self.device.type == "cuda" and not self.is_ddp
                and not self._do_i_compile())

    def _fused(self) -> dict:
        """The optimiser's fused kernel on GPUs: the same update as the per-tensor loop in a few launches,
        and with GradScaler no host sync for the inf check (the scaler hands ``found_inf`` to the kernel),
        so the update is queued behind the backward instead of waiting for it."""
        return {"fused": True} if self.device.type == "cuda" else {}

    def configure_optimizers(self):
        # nnU-Net's configure_optimizers (SGD, momentum 0.99, Nesterov; poly schedule) plus the fused kernel
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True, **self._fused())
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def initialize(self):
        super().initialize()
        if self._use_cuda_graphs():
            # channels_last_3d: see MobileViM.enable_cuda_graph_training; the optimiser keeps the same Parameters
            self.network.to(memory_format=torch.channels_last_3d)
            self.network.fast_inference = True  # validation: BatchNorm folded, replayed from a CUDA graph
            self.graphed_train_step = self._new_graphed_step()

    def _new_graphed_step(self) -> GraphedTrainStep:
        return GraphedTrainStep(self._train_step_on_gpu, [self.optimizer])

    def train_step(self, batch: dict) -> dict:
        if self.graphed_train_step is None:
            return super().train_step(batch)
        target = batch["target"]
        loss = self.graphed_train_step(batch["data"], *(target if isinstance(target, list) else [target]))
        return {"loss": loss.cpu().numpy()}

    def _train_step_on_gpu(self, data: torch.Tensor, *target: torch.Tensor) -> torch.Tensor:
        """nnU-Net 2.8's ``train_step`` from the forward to the scaler update, in its order and with its
        arguments, for ``GraphedTrainStep`` (gradients start as None, as after nnU-Net's zero_grad).
        Deliberately a copy of those eight lines, not a call: nnU-Net's step also copies the batch to the
        GPU and reads the loss back to the host, which a CUDA graph cannot hold. ``data`` (B, C, D, H, W);
        ``target`` one (B, 1, D', H', W') label map per deep-supervision output."""
        with torch.autocast(self.device.type, enabled=True):
            output = self.network(data)
            loss = self.loss(output, list(target) if self.enable_deep_supervision else target[0])
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return loss.detach()

    def on_train_start(self):
        super().on_train_start()
        backend = resolve_backend(self.device.type == "cuda")
        self.print_to_log_file(
            f"MobileViM_{self.mobilevim_variant}: strides {strides_from_plan(self.configuration_manager)}, "
            f"selective scan backend: {backend}, torch.compile: {self._do_i_compile()}, "
            f"CUDA-graph training step: {self.graphed_train_step is not None}")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        try:
            super().load_checkpoint(filename_or_checkpoint)
        except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:
            if not isinstance(filename_or_checkpoint, str):
                raise
            raise RuntimeError(
                f"could not load the checkpoint {filename_or_checkpoint}: {type(err).__name__}: {err}\n"
                "The file is truncated, corrupt, or from a different network. Nothing was changed. To resume from "
                "an earlier state, move this file away and run again with --c (nnU-Net then falls back to "
                "checkpoint_latest.pth or checkpoint_best.pth); to start over, run without --c.") from err
        if self.graphed_train_step is not None and len(self.graphed_train_step):
            # the optimiser's state tensors were replaced: a captured step would still update the old ones
            self.graphed_train_step = self._new_graphed_step()


class nnUNetTrainerMobileViM_xs_SGD(nnUNetTrainerMobileViM_SGD):
    """MobileViM_xs with nnU-Net's own recipe."""

    mobilevim_variant = "xs"


class CosineLRScheduler(_LRScheduler):
    """Cosine decay from ``initial_lr`` to ``initial_lr * final_fraction`` over ``max_steps`` epochs.

    Written to nnU-Net's scheduler interface (``step(current_epoch)``, like its PolyLRScheduler);
    torch's CosineAnnealingLR warns on every explicit-epoch ``step``.
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, final_fraction: float = 1e-2):
        self.initial_lr, self.max_steps, self.final_fraction, self.ctr = initial_lr, max_steps, final_fraction, 0
        super().__init__(optimizer, -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        progress = min(current_step / max(self.max_steps, 1), 1.0)
        floor = self.initial_lr * self.final_fraction
        new_lr = floor + 0.5 * (self.initial_lr - floor) * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class nnUNetTrainerMobileViM(nnUNetTrainerMobileViM_SGD):
    """MobileViM_s, trained with the paper's optimiser family: AdamW (weight decay 0.03, as the released
    scripts) and a cosine schedule, at lr 1e-3 (the paper's 1.6e-6 start would barely move a network
    trained from scratch in nnU-Net's epoch budget). The default: it beat nnU-Net's SGD + poly on both
    comparison datasets (docs/results.md)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weight_decay = 3e-2

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                                      **self._fused())
        return optimizer, CosineLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class nnUNetTrainerMobileViM_xs(nnUNetTrainerMobileViM):
    """MobileViM_xs, AdamW + cosine."""

    mobilevim_variant = "xs"


class nnUNetTrainerMobileViM_smoke(nnUNetTrainerMobileViM):
    """A first check (and the test suite's trainer): 2 epochs of 4 iterations, a checkpoint every epoch."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1


__all__ = ["nnUNetTrainerMobileViM", "nnUNetTrainerMobileViM_xs", "nnUNetTrainerMobileViM_SGD",
           "nnUNetTrainerMobileViM_xs_SGD", "nnUNetTrainerMobileViM_smoke", "CosineLRScheduler",
           "strides_from_plan", "require_3d"]
