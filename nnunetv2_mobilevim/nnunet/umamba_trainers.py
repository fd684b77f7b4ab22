"""nnU-Net trainers for U-Mamba (Ma, Li, Wang 2024), under the names its own trainers use, on stock
nnU-Net 2.8 and this package's machinery (``base_trainer``):

    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerUMambaBot   # Mamba at the bottleneck
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerUMambaEnc           # Mamba after every encoder stage
    ... -tr nnUNetTrainerUMambaBot_NoMamba | nnUNetTrainerUMambaEnc_NoMamba   # the same without Mamba

The recipe is nnU-Net's (SGD + poly, 1000 epochs), as U-Mamba's trainers use it. The ``_NoMamba``
twins replace every Mamba layer by identity: the ablation "nnU-Net Revisited" asks for.
"""

from __future__ import annotations

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from ..networks.umamba import umamba_from_plan
from .base_trainer import nnUNetTrainerMambaBase


class nnUNetTrainerUMambaBase(nnUNetTrainerMambaBase):
    """U-Mamba (``umamba_variant``: "bot" or "enc"; ``mamba``: False for the twin) with nnU-Net's recipe."""

    paper = "U-Mamba (Ma, Li, Wang 2024)"
    recipe = "nnU-Net's: SGD (Nesterov 0.99) + poly, 1000 epochs"
    umamba_variant = "bot"
    mamba = True

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, enable_deep_supervision: bool) -> nn.Module:
        return umamba_from_plan(configuration_manager.network_arch_init_kwargs, configuration_manager.patch_size,
                                num_input_channels, num_output_channels, enable_deep_supervision,
                                variant=cls.umamba_variant, mamba=cls.mamba)

    def configure_optimizers(self):
        return self.nnunet_sgd()


class nnUNetTrainerUMambaBot(nnUNetTrainerUMambaBase):
    """U-Mamba Bot: one Mamba layer on the bottleneck."""


class nnUNetTrainerUMambaBot_NoMamba(nnUNetTrainerUMambaBot):
    """U-Mamba Bot with its Mamba layer replaced by identity."""

    mamba = False


class nnUNetTrainerUMambaEnc(nnUNetTrainerUMambaBase):
    """U-Mamba Enc: a Mamba layer after every encoder stage and on the bottleneck."""

    umamba_variant = "enc"


class nnUNetTrainerUMambaEnc_NoMamba(nnUNetTrainerUMambaEnc):
    """U-Mamba Enc with every Mamba layer replaced by identity."""

    mamba = False


__all__ = ["nnUNetTrainerUMambaBase", "nnUNetTrainerUMambaBot", "nnUNetTrainerUMambaBot_NoMamba",
           "nnUNetTrainerUMambaEnc", "nnUNetTrainerUMambaEnc_NoMamba"]
