"""Segmentation losses for overlapping sigmoid regions (BraTS WT/TC/ET)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

BceReduction = Literal["sum", "mean"]
DiceReduction = Literal["sample", "batch"]


class RegionDiceBCELoss(nn.Module):
    """Soft Dice + binary cross-entropy on sigmoid region channels: ``lambda_dice * Dice + lambda_bce * BCE``.

    MONAI's ``DiceCELoss`` applies a softmax cross-entropy when there is more than one channel, which is wrong
    for overlapping regions, so the two terms are combined here. The defaults are ShaSpec's released loss
    (Wang et al., CVPR 2023; ``shared/methods/shaspec.md`` §2.3), for channel ``c`` with ``p = sigmoid(logits)``:

    * Dice ``1 - (2 Σ p·t + smooth_nr) / (Σ p + Σ t + smooth_dr)`` with ``smooth_nr = 0``, ``smooth_dr = 1``,
      computed **per sample** (``dice_reduction="sample"``) and averaged over samples and channels;
      ``"batch"`` sums the batch into one volume per channel first (nnU-Net's batch Dice). The Dice is MONAI's
      :class:`~monai.losses.DiceLoss`.
    * BCE-with-logits averaged over the batch and voxels of each channel, then **summed** over the channels
      (``bce_reduction="sum"``); ``"mean"`` averages over the channels instead (1/R of the weight for R regions).

    Args:
        lambda_dice, lambda_bce: weights of the two terms.
        bce_reduction: ``"sum"`` (ShaSpec's code) or ``"mean"`` over the region channels.
        dice_reduction: ``"sample"`` (ShaSpec's code: a Dice per sample and channel) or ``"batch"``.
        dice_smooth_nr, dice_smooth_dr: the constants added to the Dice numerator and denominator.

    Shapes: ``logits (B, R, *S)``, ``target (B, R, *S)`` in {0, 1} → scalar.
    """

    def __init__(
        self,
        *,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        bce_reduction: BceReduction = "sum",
        dice_reduction: DiceReduction = "sample",
        dice_smooth_nr: float = 0.0,
        dice_smooth_dr: float = 1.0,
    ) -> None:
        super().__init__()
        if bce_reduction not in ("sum", "mean"):
            raise ValueError(f"bce_reduction must be 'sum' or 'mean', got {bce_reduction!r}")
        if dice_reduction not in ("sample", "batch"):
            raise ValueError(f"dice_reduction must be 'sample' or 'batch', got {dice_reduction!r}")
        if dice_smooth_nr < 0 or dice_smooth_dr < 0:
            raise ValueError(f"Dice smoothing must be >= 0, got nr={dice_smooth_nr}, dr={dice_smooth_dr}")
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce
        self.bce_reduction = bce_reduction
        self.dice = DiceLoss(sigmoid=True, smooth_nr=dice_smooth_nr, smooth_dr=dice_smooth_dr,
                             batch=dice_reduction == "batch")

    def bce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits: mean over batch and voxels per channel, then ``bce_reduction`` over channels."""
        per_voxel = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        per_channel = per_voxel.transpose(0, 1).flatten(1).mean(1)  # (R,)
        return per_channel.sum() if self.bce_reduction == "sum" else per_channel.mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must match")
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target)
