"""Overlap and surface metrics (MONAI), with the BraTS conventions for empty regions.

The one Dice of medmodal: :func:`region_metrics` (per region, with HD95) and :func:`binary_dice` (two masks) both
go through :func:`_dice`, a single :func:`monai.metrics.compute_dice` call with the empty-region convention.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def _dice(
    pred: torch.Tensor, target: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dice per item and channel of boolean ``pred`` and ``target`` ``(B, C, *S)``, BraTS convention for empties.

    A channel empty in both has Dice 1, one empty in exactly one of them has Dice 0.

    Returns:
        ``dice (B, C)`` (``dtype``), and whether each ``(B, C)`` channel of ``pred`` and of ``target`` is non-empty.
    """
    dice = compute_dice(_with_background(pred, dtype), _with_background(target, dtype), include_background=False,
                        ignore_empty=False)
    p_any = pred.flatten(2).any(-1)
    t_any = target.flatten(2).any(-1)
    dice = torch.where(~p_any & ~t_any, torch.ones_like(dice), dice)
    dice = torch.where(p_any ^ t_any, torch.zeros_like(dice), dice)
    return dice, p_any, t_any


def _with_background(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask (B, C, *S)`` as ``dtype`` behind a placeholder channel 0 that ``include_background=False`` skips.

    MONAI reads a single channel as class indices and then divides in float32; with the extra channel every
    region, also a lone one, is scored as a channel in ``dtype``.
    """
    out = torch.zeros((mask.shape[0], mask.shape[1] + 1, *mask.shape[2:]), dtype=dtype, device=mask.device)
    out[:, 1:] = mask
    return out


def _as_bool_tensor(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().bool()
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))


def binary_dice(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Dice ``2|A∩B| / (|A| + |B|)`` of two binary masks of the same shape (numpy or torch, any dimension).

    Non-zero values count as foreground (pass ``label > 0`` for the foreground of a label map). Two empty masks
    agree perfectly (1.0); exactly one empty mask scores 0.0.

    Raises:
        ValueError: if the shapes differ.
    """
    ta, tb = _as_bool_tensor(a), _as_bool_tensor(b)
    if ta.shape != tb.shape:
        raise ValueError(f"binary_dice: masks of different shapes {tuple(ta.shape)} and {tuple(tb.shape)}")
    # float64: exact voxel counts and one rounding of the ratio, like the hand-written Dice this replaced
    dice, _, _ = _dice(ta.reshape(1, 1, -1), tb.reshape(1, 1, -1), dtype=torch.float64)
    return float(dice[0, 0])


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
    dice, p_any, t_any = _dice(pred, target)
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
    hd = torch.where(~p_any & ~t_any, torch.zeros_like(hd), hd)
    return dice.double().cpu().numpy(), hd.numpy()
