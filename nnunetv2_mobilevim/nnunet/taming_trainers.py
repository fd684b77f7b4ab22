"""nnU-Net trainers for the four networks of Taming Mambas (Lumetti et al. 2024), on stock nnU-Net 2.8
and this package's machinery (``base_trainer``):

    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerMultiSegMamba

``nnUNetTrainerTamingSegMamba`` is the paper's "SegMamba" (one scan direction), not Xing et al.'s
SegMamba: the name says whose. ``nnUNetTrainerBiSegMamba`` scans both ways, ``nnUNetTrainerMultiSegMamba``
both ways along four axis orders, ``nnUNetTrainerSegMambaSkip`` puts the layers on the skip connections.
Each has a ``_NoMamba`` twin (every Mamba layer replaced by identity) and a ``_Paper`` variant with the
paper's recipe (RAdam, lr 3e-4, linear decay, 300 epochs); the plain names train with nnU-Net's recipe
so that they compare with nnU-Net and the twins at matched schedules.
"""

from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from ..networks.taming import taming_from_plan
from .base_trainer import nnUNetTrainerMambaBase
from .lr_schedulers import LinearLRScheduler
from .optim import portable_checkpoints


class nnUNetTrainerTamingBase(nnUNetTrainerMambaBase):
    """A Taming Mambas network (``taming_variant``; ``mamba``: False for the twin) with nnU-Net's recipe."""

    paper = "Taming Mambas (Lumetti et al. 2024)"
    recipe = "nnU-Net's: SGD (Nesterov 0.99) + poly, 1000 epochs"
    taming_variant = "segmamba"
    mamba = True

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, enable_deep_supervision: bool) -> nn.Module:
        return taming_from_plan(configuration_manager.network_arch_init_kwargs, configuration_manager.patch_size,
                                num_input_channels, num_output_channels, enable_deep_supervision,
                                variant=cls.taming_variant, mamba=cls.mamba)

    def configure_optimizers(self):
        return self.nnunet_sgd()


class TamingPaperRecipe:
    """The paper's recipe (Sec. 4): RAdam, lr 3e-4, a linear schedule, 300 epochs. RAdam has no fused
    kernel, so the step runs eagerly (the trainer log says so)."""

    recipe = "the paper's: RAdam, lr 3e-4, linear decay, 300 epochs"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 3e-4
        self.num_epochs = 300

    def configure_optimizers(self):
        optimizer = portable_checkpoints(torch.optim.RAdam(self.network.parameters(), lr=self.initial_lr,
                                                           weight_decay=self.weight_decay))
        return optimizer, LinearLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class nnUNetTrainerTamingSegMamba(nnUNetTrainerTamingBase):
    """Taming Mambas' SegMamba: one forward scan after every encoder stage."""


class nnUNetTrainerBiSegMamba(nnUNetTrainerTamingBase):
    """BiSegMamba: forward and reversed scans after every encoder stage."""

    taming_variant = "bisegmamba"


class nnUNetTrainerMultiSegMamba(nnUNetTrainerTamingBase):
    """MultiSegMamba: four axis orders, each both ways, after every encoder stage."""

    taming_variant = "multisegmamba"


class nnUNetTrainerSegMambaSkip(nnUNetTrainerTamingBase):
    """SegMambaSkip: bidirectional layers on the skip connections and the bottleneck."""

    taming_variant = "segmambaskip"


class nnUNetTrainerTamingSegMamba_NoMamba(nnUNetTrainerTamingSegMamba):
    """The same network with every Mamba layer replaced by identity."""

    mamba = False


class nnUNetTrainerBiSegMamba_NoMamba(nnUNetTrainerBiSegMamba):
    """The same network with every Mamba layer replaced by identity."""

    mamba = False


class nnUNetTrainerMultiSegMamba_NoMamba(nnUNetTrainerMultiSegMamba):
    """The same network with every Mamba layer replaced by identity."""

    mamba = False


class nnUNetTrainerSegMambaSkip_NoMamba(nnUNetTrainerSegMambaSkip):
    """The same network with every Mamba layer replaced by identity."""

    mamba = False


class nnUNetTrainerTamingSegMamba_Paper(TamingPaperRecipe, nnUNetTrainerTamingSegMamba):
    """The paper's recipe."""


class nnUNetTrainerBiSegMamba_Paper(TamingPaperRecipe, nnUNetTrainerBiSegMamba):
    """The paper's recipe."""


class nnUNetTrainerMultiSegMamba_Paper(TamingPaperRecipe, nnUNetTrainerMultiSegMamba):
    """The paper's recipe."""


class nnUNetTrainerSegMambaSkip_Paper(TamingPaperRecipe, nnUNetTrainerSegMambaSkip):
    """The paper's recipe."""


__all__ = [name for name in dir() if name.startswith("nnUNetTrainer") and name != "nnUNetTrainerMambaBase"]
