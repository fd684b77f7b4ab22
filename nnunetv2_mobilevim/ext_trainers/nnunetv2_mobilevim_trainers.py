"""Shim for nnU-Net's trainer lookup: export nnUNet_extTrainer=$(nnunetv2_mobilevim ext-path).

nnU-Net imports every module of that folder by its bare name; the trainers themselves live in
nnunetv2_mobilevim.nnunet.trainers, so their class paths (and checkpoints) never depend on this file.
Every trainer is listed here; their base, nnUNetTrainerMobileViMBase, is not (it has no recipe to train).
nnUNetTrainer_DeviceAug is nnU-Net's default trainer with the augmentation on the GPU.
"""

from nnunetv2_mobilevim.nnunet.device_augmentation import nnUNetTrainer_DeviceAug  # noqa: F401
from nnunetv2_mobilevim.nnunet.trainers import (  # noqa: F401
    nnUNetTrainerMobileViM,
    nnUNetTrainerMobileViM_SGD,
    nnUNetTrainerMobileViM_smoke,
    nnUNetTrainerMobileViM_xs,
    nnUNetTrainerMobileViM_xs_SGD,
)
