"""nnU-Net trainers that train MobileViM: the network's base and the recipes, a few lines each.

    export nnUNet_extTrainer=$(nnunetv2_mobilevim ext-path)
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMobileViM       # MobileViM_s, AdamW + cosine
    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMobileViM_xs    # MobileViM_xs, AdamW + cosine
    ... -tr nnUNetTrainerMobileViM_SGD | nnUNetTrainerMobileViM_xs_SGD       # nnU-Net's own recipe

``nnUNetTrainerMobileViMBase`` puts MobileViM on the package's adapter base
(``base_trainer.nnUNetTrainerMambaBase``: compile off, device augmentation, the graphed step, portable
checkpoints, the fast predictor); the trainers are recipes on it, as nnU-Net's own variants are on
``nnUNetTrainer``. What the MobileViM base adds:
- the network: MobileViM built from the plan (patch size, the first four per-axis pooling strides,
  input channels, segmentation heads), in 3D and 2D (its dimension-independent mechanism scans the
  per-axis profiles of either);
- deep-supervision scales: taken from the network, so every output has a target of its size;
- it trains in channels_last(_3d) on a GPU.
The recipes (``configure_optimizers``): the default AdamW (lr 1e-3, weight decay 0.03) with a cosine
schedule, the paper's optimiser family, chosen by measurement over nnU-Net's SGD + poly
(docs/results.md); the ``_SGD`` trainers keep nnU-Net's optimiser and schedule unchanged. Everything
else is nnU-Net's (1000 epochs x 250 iterations, Dice + CE with deep supervision, fp16 AMP, augmentation).
"""

from __future__ import annotations

from typing import List

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from ..networks.mobilevim.network import deep_supervision_scales, mobilevim_from_plan, strides_from_pooling
from .base_trainer import nnUNetTrainerMambaBase
from .lr_schedulers import CosineLRScheduler
from .optim import portable_checkpoints


def strides_from_plan(configuration_manager: ConfigurationManager) -> List[List[int]]:
    """The plan's first four pooling strides (after the stride-1 first stage), padded with 1s."""
    return strides_from_pooling(configuration_manager.pool_op_kernel_sizes)


class nnUNetTrainerMobileViMBase(nnUNetTrainerMambaBase):
    """The base of every MobileViM trainer: MobileViM (``mobilevim_variant``) adapted to nnU-Net, no recipe.
    A recipe is a subclass that defines ``configure_optimizers`` (wrapping its optimiser in
    ``optim.portable_checkpoints``, passing ``**self._fused()``) and, where it differs from nnU-Net's,
    ``initial_lr`` / ``weight_decay`` / the epoch budget in ``__init__``."""

    paper = "MobileViM (Dai, Wang, Liu 2025)"
    mobilevim_variant = "s"
    channels_last = True  # MobileViM's convolutions and BatchNorms train faster in it (docs/benchmarks.md)

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, enable_deep_supervision: bool) -> nn.Module:
        return mobilevim_from_plan(configuration_manager.pool_op_kernel_sizes, configuration_manager.patch_size,
                                   num_input_channels, num_output_channels, enable_deep_supervision,
                                   variant=cls.mobilevim_variant)

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return deep_supervision_scales(strides_from_plan(self.configuration_manager))

    def describe_network(self) -> str:
        return f"MobileViM_{self.mobilevim_variant}: strides {strides_from_plan(self.configuration_manager)}"


# The recipes: siblings on the base, like nnU-Net's variants on nnUNetTrainer.


class nnUNetTrainerMobileViM(nnUNetTrainerMobileViMBase):
    """MobileViM_s, trained with the paper's optimiser family: AdamW (weight decay 0.03, as the released
    scripts) and a cosine schedule, at lr 1e-3 (the paper's 1.6e-6 start would barely move a network
    trained from scratch in nnU-Net's epoch budget). The default: it beat nnU-Net's SGD + poly on both
    comparison datasets (docs/results.md)."""

    recipe = "AdamW lr 1e-3, weight decay 0.03, cosine, 1000 epochs"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weight_decay = 3e-2

    def configure_optimizers(self):
        # fused AdamW creates its state before the kernel and undoes the step count of a skipped step itself
        optimizer = portable_checkpoints(torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr,
                                                           weight_decay=self.weight_decay, **self._fused()))
        return optimizer, CosineLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class nnUNetTrainerMobileViM_xs(nnUNetTrainerMobileViM):
    """MobileViM_xs, AdamW + cosine."""

    mobilevim_variant = "xs"


class nnUNetTrainerMobileViM_SGD(nnUNetTrainerMobileViMBase):
    """MobileViM_s with nnU-Net's own recipe (SGD, Nesterov 0.99, lr 1e-2, poly decay, weight decay
    3e-5; fused kernel on GPUs)."""

    recipe = "nnU-Net's: SGD (Nesterov 0.99) + poly, 1000 epochs"

    def configure_optimizers(self):
        return self.nnunet_sgd()


class nnUNetTrainerMobileViM_xs_SGD(nnUNetTrainerMobileViM_SGD):
    """MobileViM_xs with nnU-Net's own recipe."""

    mobilevim_variant = "xs"


class nnUNetTrainerMobileViM_smoke(nnUNetTrainerMobileViM):
    """A first check (and the test suite's trainer): 2 epochs of 4 iterations, a checkpoint every epoch."""

    recipe = "AdamW + cosine, 2 epochs x 4 iterations (a first check)"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1


__all__ = ["nnUNetTrainerMobileViMBase", "nnUNetTrainerMobileViM", "nnUNetTrainerMobileViM_xs",
           "nnUNetTrainerMobileViM_SGD", "nnUNetTrainerMobileViM_xs_SGD", "nnUNetTrainerMobileViM_smoke",
           "strides_from_plan"]
