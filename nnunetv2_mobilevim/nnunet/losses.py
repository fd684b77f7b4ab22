"""nnU-Net's training losses, made capturable in a CUDA graph where they are not.

With an ignore label (sparse annotation) nnU-Net's ``DC_and_CE_loss`` skips the cross-entropy with
``if num_fg > 0``: a host sync, which a CUDA graph cannot capture, and a data-dependent branch
that torch.compile cannot trace. ``IgnoreLabelDC_and_CE_loss`` computes the same value and gradients
without it: the cross-entropy summed over the labelled voxels, divided by their count (their summed
class weights when the CE has class weights), or by 1 when there are none, so a batch where every
voxel is ignored gives 0 CE, as nnU-Net's does.

Left as nnU-Net builds them, because they have no host sync:
- ``DC_and_CE_loss`` without an ignore label (the ``num_fg`` test is never evaluated);
- ``DC_and_BCE_loss`` (region-based training), with or without the ignore label: its branches depend
  on arguments and dtypes only, and its masked mean divides by ``clip(mask.sum(), 1e-8)`` on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from torch import nn


class IgnoreLabelDC_and_CE_loss(DC_and_CE_loss):
    """nnU-Net's Dice + CE with the ignore label, without host syncs or data-dependent Python branches.
    Built like ``DC_and_CE_loss`` or from one with ``from_nnunet``."""

    @classmethod
    def from_nnunet(cls, loss: DC_and_CE_loss) -> "IgnoreLabelDC_and_CE_loss":
        """The same loss as nnU-Net's ``loss``: its Dice and CE modules (shared, so a Dice that nnU-Net
        compiled stays compiled), weights and ignore label."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight_dice, new.weight_ce, new.ignore_label = loss.weight_dice, loss.weight_ce, loss.ignore_label
        new.dc, new.ce = loss.dc, loss.ce
        return new

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``net_output`` (B, C, *spatial) logits; ``target`` (B, 1, *spatial) label map, where voxels equal
        to the ignore label count neither in the Dice nor in the CE. Returns a scalar."""
        if self.ignore_label is None:
            return super().forward(net_output, target)
        assert target.shape[1] == 1, f"the ignore label needs a label map target (B, 1, ...), got {tuple(target.shape)}"
        mask = target != self.ignore_label
        # ignored voxels get label 0 for the Dice's one-hot; the mask removes them from it
        target_dice = torch.where(mask, target, 0)
        dc_loss = self.dc(net_output, target_dice, loss_mask=mask) if self.weight_dice != 0 else 0
        ce_loss = self._ce_over_labelled(net_output, target[:, 0], mask[:, 0]) if self.weight_ce != 0 else 0
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss

    def _ce_over_labelled(self, logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """nnU-Net's CE (``self.ce``: a CrossEntropyLoss, mean over voxels not equal to ``ignore_index``),
        with the division guarded on the device. ``logits`` (B, C, *spatial); ``labels`` and ``labelled``
        (B, *spatial)."""
        ce = self.ce
        per_voxel = F.cross_entropy(logits, labels.long(), weight=ce.weight, ignore_index=ce.ignore_index,
                                    reduction="none", label_smoothing=ce.label_smoothing)  # 0 where ignored
        if ce.weight is None:
            total = labelled.sum(dtype=per_voxel.dtype)
        else:  # torch's weighted mean divides by the summed weights of the labelled voxels' classes
            total = (ce.weight[torch.where(labelled, labels, 0).long()] * labelled).sum(dtype=per_voxel.dtype)
        return per_voxel.sum() / torch.where(total > 0, total, torch.ones_like(total))


__all__ = ["IgnoreLabelDC_and_CE_loss"]
