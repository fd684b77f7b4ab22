"""nnU-Net's own network and recipe on this package's machinery:

    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainer_Accelerated

The network is the plan's architecture (PlainConvUNet, a ResEnc UNet, ...), built by nnU-Net's own
``build_network_architecture``; the recipe is nnU-Net's (SGD, Nesterov 0.99, poly, 1000 epochs). What
changes is how it runs, as for every trainer of this package (``base_trainer``): the augmentation on
the GPU, the whole training step replayed from one CUDA graph with the fused optimiser, validation
without a host sync per step, progress.png drawn in a worker; torch.compile only with
``nnUNet_compile=true``, then inside the graphed step. Checkpoints and logs
are nnU-Net's; ``nnUNetv2_predict`` with this trainer's name predicts with the replayed forward.

``nnUNetTrainer_DeviceAug`` moves only the augmentation and keeps nnU-Net's compiled, eager step.
"""

from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from .base_trainer import nnUNetTrainerMambaBase


class nnUNetTrainer_Accelerated(nnUNetTrainerMambaBase):
    """nnU-Net's default network and recipe, trained with the graphed step and the device augmentation
    (``nnunetv2_mobilevim list`` names nnU-Net's paper and recipe for it, as for nnU-Net's own trainers)."""

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, enable_deep_supervision: bool) -> nn.Module:
        return nnUNetTrainer.build_network_architecture(None, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    def configure_optimizers(self):
        return self.nnunet_sgd()


__all__ = ["nnUNetTrainer_Accelerated"]
