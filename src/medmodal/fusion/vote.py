"""Voting label fusion: majority vote, weighted vote, and DeepSTAPLE's data-parameter (DP) consensus.

The DP consensus (Weihsbach et al., *DeepSTAPLE*, WBIR 2022; ``shared/methods/deepstaple.md`` §2.4) is
``C = 1[Σ_k softmax_k(θ) · y_k > 0.5]``, a weighted vote with the weights ``softmax(θ)``; the comparison is
strict, so exact ties go to background.
"""

from __future__ import annotations

import torch

from medmodal.fusion._common import LabelStack, as_binary_masks, as_label_tensor

__all__ = ["dp_consensus", "majority_vote", "weighted_vote"]


def majority_vote(labels: LabelStack) -> torch.Tensor:
    """Per voxel, the label given by the most raters; a tie goes to the **smallest** tied label value.

    For binary masks (bool, or 0/1) this is "foreground where strictly more than half of the raters say
    foreground": with an even number of raters an exact tie is background.

    Args:
        labels: ``(K, *S)`` bool or integer label maps (torch or numpy), one per rater.

    Returns:
        ``(*S)`` fused labels, in the dtype of ``labels``.
    """
    stack = as_label_tensor(labels, name="labels")
    if stack.dtype == torch.bool:
        return stack.sum(0, dtype=torch.int64) * 2 > stack.shape[0]
    best_value = torch.empty(stack.shape[1:], dtype=stack.dtype, device=stack.device)
    best_count = torch.full(stack.shape[1:], -1, dtype=torch.int64, device=stack.device)
    for value in torch.unique(stack).tolist():  # ascending, so a later value must beat a tie strictly
        count = (stack == value).sum(0, dtype=torch.int64)
        wins = count > best_count
        best_value[wins] = value
        best_count = torch.where(wins, count, best_count)
    return best_value


def weighted_vote(masks: LabelStack, weights: torch.Tensor) -> torch.Tensor:
    """Foreground where ``Σ_k w_k y_k > 0.5 · Σ_k w_k`` (strict; exact ties are background).

    The test is evaluated as "foreground weight > background weight", each summed over the raters in order,
    so equal weights and an even split compare exactly equal (no rounding turns a tie into a decision).

    Args:
        masks: ``(K, *S)`` binary masks (bool, or integers 0/1), torch or numpy.
        weights: ``(K,)`` non-negative finite rater weights, not all zero.

    Returns:
        ``(*S)`` bool.

    Raises:
        ValueError: non-binary masks, or weights of the wrong shape, negative, non-finite or all zero.
    """
    stack = as_binary_masks(masks, name="masks")
    w = torch.as_tensor(weights, dtype=torch.float64, device=stack.device)
    if w.shape != (stack.shape[0],):
        raise ValueError(f"weights: expected shape ({stack.shape[0]},) (one per rater), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool(w.sum() > 0):
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    fg = torch.zeros(stack.shape[1:], dtype=torch.float64, device=stack.device)
    bg = torch.zeros_like(fg)
    for k in range(stack.shape[0]):
        fg += torch.where(stack[k], w[k], 0.0)
        bg += torch.where(stack[k], 0.0, w[k])
    return fg > bg


def dp_consensus(masks: LabelStack, theta: torch.Tensor) -> torch.Tensor:
    """DeepSTAPLE's data-parameter consensus: :func:`weighted_vote` with weights ``softmax(theta)``.

    Args:
        masks: ``(K, *S)`` binary candidate labels of one target (bool, or integers 0/1).
        theta: ``(K,)`` raw data parameters of those labels (the softmax runs over these K only).

    Returns:
        ``(*S)`` bool, ``Σ_k softmax_k(θ) y_k > 0.5`` (strict).
    """
    return weighted_vote(masks, torch.softmax(torch.as_tensor(theta).detach().to(torch.float64), dim=0))
