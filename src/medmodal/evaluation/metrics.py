"""Per-region overlap and surface metrics (MONAI), with the BraTS conventions for empty regions."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def region_metrics(
    pred: torch.Tensor, target: torch.Tensor, *, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Dice and HD95 (mm) per region.

    Conventions (BraTS): a region empty in both prediction and reference has Dice 1 and HD95 0; a region
    empty in exactly one of them has Dice 0 and HD95 NaN (undefined; reports count and skip those).

    Args:
        pred: ``(K, R, *S)`` binary predictions (K predictions of one case, e.g. one per modality subset).
        target: ``(1, R, *S)`` or ``(K, R, *S)`` binary reference.
        spacing: voxel size in mm per spatial axis (HD95 in voxels if None).

    Returns:
        ``dice (K, R)`` and ``hd95 (K, R)`` float arrays.
    """
    pred = pred.bool()
    target = target.bool().expand_as(pred)
    dice = compute_dice(pred.float(), target.float(), include_background=True, ignore_empty=False)
    p_any = pred.flatten(2).any(-1)
    t_any = target.flatten(2).any(-1)
    both_empty = ~p_any & ~t_any
    one_empty = p_any ^ t_any
    dice = torch.where(both_empty, torch.ones_like(dice), dice)
    dice = torch.where(one_empty, torch.zeros_like(dice), dice)
    hd = torch.full(dice.shape, float("nan"), dtype=torch.float64)
    ok = p_any & t_any
    if bool(ok.any()):
        with warnings.catch_warnings():  # empty regions are handled above; MONAI warns about each one
            warnings.simplefilter("ignore", UserWarning)
            hd_all = compute_hausdorff_distance(
                pred.float(), target.float(), include_background=True, percentile=95,
                spacing=list(spacing) if spacing is not None else None,
            )
        hd = torch.where(ok, hd_all.double().cpu(), hd)
    hd = torch.where(both_empty, torch.zeros_like(hd), hd)
    return dice.double().cpu().numpy(), hd.numpy()
