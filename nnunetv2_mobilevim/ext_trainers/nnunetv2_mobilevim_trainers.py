"""Shim for nnU-Net's trainer lookup: export nnUNet_extTrainer=$(nnunetv2_mobilevim ext-path).

nnU-Net imports every module of that folder by its bare name; the trainers themselves live in
nnunetv2_mobilevim.nnunet (trainers, umamba_trainers, taming_trainers, device_augmentation,
nnunet_network_trainers), so their class paths (and checkpoints) never depend on this file. Every
trainer a user trains is listed here (`nnunetv2_mobilevim list` prints them by network); the bases,
which have no network or recipe, are not. nnUNetTrainer_DeviceAug is nnU-Net's default trainer with
the augmentation on the GPU; nnUNetTrainer_Accelerated is nnU-Net's network and recipe on all of this
package's machinery.
"""

from nnunetv2_mobilevim.nnunet.device_augmentation import nnUNetTrainer_DeviceAug  # noqa: F401
from nnunetv2_mobilevim.nnunet.nnunet_network_trainers import nnUNetTrainer_Accelerated  # noqa: F401
from nnunetv2_mobilevim.nnunet.taming_trainers import (  # noqa: F401
    nnUNetTrainerBiSegMamba,
    nnUNetTrainerBiSegMamba_NoMamba,
    nnUNetTrainerBiSegMamba_Paper,
    nnUNetTrainerMultiSegMamba,
    nnUNetTrainerMultiSegMamba_NoMamba,
    nnUNetTrainerMultiSegMamba_Paper,
    nnUNetTrainerSegMambaSkip,
    nnUNetTrainerSegMambaSkip_NoMamba,
    nnUNetTrainerSegMambaSkip_Paper,
    nnUNetTrainerTamingSegMamba,
    nnUNetTrainerTamingSegMamba_NoMamba,
    nnUNetTrainerTamingSegMamba_Paper,
)
from nnunetv2_mobilevim.nnunet.trainers import (  # noqa: F401
    nnUNetTrainerMobileViM,
    nnUNetTrainerMobileViM_SGD,
    nnUNetTrainerMobileViM_smoke,
    nnUNetTrainerMobileViM_xs,
    nnUNetTrainerMobileViM_xs_SGD,
)
from nnunetv2_mobilevim.nnunet.umamba_trainers import (  # noqa: F401
    nnUNetTrainerUMambaBot,
    nnUNetTrainerUMambaBot_NoMamba,
    nnUNetTrainerUMambaEnc,
    nnUNetTrainerUMambaEnc_NoMamba,
)
