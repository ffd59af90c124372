"""Segmentation losses for overlapping sigmoid regions (BraTS WT/TC/ET)."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn


class RegionDiceBCELoss(nn.Module):
    """Soft Dice + binary cross-entropy on sigmoid region channels, as in nnU-Net's region-based BraTS training.

    MONAI's ``DiceCELoss`` applies a softmax cross-entropy when there is more than one channel, which is wrong
    for overlapping regions, so the two terms are combined here: ``lambda_dice * Dice + lambda_bce * BCE``.

    Shapes: ``logits (B, R, *S)``, ``target (B, R, *S)`` in {0, 1} → scalar.
    """

    def __init__(self, *, lambda_dice: float = 1.0, lambda_bce: float = 1.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce
        self.dice = DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must match")
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target.float())
