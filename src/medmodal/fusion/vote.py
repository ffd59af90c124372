"""Voting label fusion: majority vote, weighted vote, and DeepSTAPLE's data-parameter (DP) consensus.

The DP consensus (Weihsbach et al., *DeepSTAPLE*, WBIR 2022; ``shared/methods/deepstaple.md`` §2.4) is
``C = 1[Σ_k softmax_k(θ) · y_k > 0.5]``, a weighted vote with the weights ``softmax(θ)``; the comparison is
strict, so exact ties go to background.
"""

from __future__ import annotations

import torch

from medmodal.fusion._common import VOXEL_CHUNK, LabelStack, Progress, as_binary_masks, as_label_tensor

__all__ = ["dp_consensus", "majority_vote", "vote_mode", "weighted_vote"]


def vote_mode(labels: LabelStack, *, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per voxel, the most frequent label among the ``K`` raters and whether that count was tied.

    The raters' labels are sorted at each voxel and the longest run of equal values wins; on a tie the
    **smallest** tied value wins and ``tied`` is set. Time ``O(K log K · N)`` and memory ``O(K · chunk)`` whatever
    the number of distinct labels (the voxels are processed in chunks of :data:`VOXEL_CHUNK`).

    Args:
        labels: ``(K, *S)`` bool or integer label maps (torch or numpy), one per rater.
        progress: called as ``progress(voxels_done, voxels_total)`` after each chunk.

    Returns:
        ``mode (*S)`` in the dtype of ``labels`` and ``tied (*S)`` bool.
    """
    stack = as_label_tensor(labels, name="labels")
    k_raters, spatial = stack.shape[0], tuple(stack.shape[1:])
    flat = stack.reshape(k_raters, -1)
    n_voxels = flat.shape[1]
    mode = torch.empty(n_voxels, dtype=stack.dtype, device=stack.device)
    tied = torch.empty(n_voxels, dtype=torch.bool, device=stack.device)
    sortable = stack.dtype == torch.bool
    for start in range(0, n_voxels, VOXEL_CHUNK):
        stop = min(start + VOXEL_CHUNK, n_voxels)
        chunk = flat[:, start:stop].T.contiguous()  # (C, K): each voxel's K labels in one row
        ordered = torch.sort(chunk.to(torch.uint8) if sortable else chunk, dim=1).values
        best_value = ordered[:, 0].clone()
        best_count = torch.ones(stop - start, dtype=torch.int32, device=stack.device)
        run, is_tied = best_count.clone(), torch.zeros_like(best_count, dtype=torch.bool)
        for k in range(1, k_raters):  # ascending values: a later run must beat the best strictly
            run = torch.where(ordered[:, k] == ordered[:, k - 1], run + 1, 1)
            better = run > best_count
            is_tied = torch.where(better, False, is_tied | (run == best_count))
            best_value = torch.where(better, ordered[:, k], best_value)
            best_count = torch.maximum(run, best_count)
        mode[start:stop] = best_value.to(stack.dtype)
        tied[start:stop] = is_tied
        if progress is not None:
            progress(stop, n_voxels)
    return mode.reshape(spatial), tied.reshape(spatial)


def majority_vote(
    labels: LabelStack, *, undecided: int | None = None, progress: Progress | None = None
) -> torch.Tensor:
    """Per voxel, the label given by the most raters (plurality vote).

    Ties: by default a tie goes to the **smallest** tied label value; for binary masks (bool, or 0/1) this is
    "foreground where strictly more than half of the raters say foreground" (with an even number of raters an
    exact tie is background). With ``undecided``, tied voxels get that label instead (SimpleITK's
    ``LabelVotingImageFilter`` writes the largest label + 1 there).

    Memory is proportional to the volume, not to labels × volume (see :func:`vote_mode`).

    Args:
        labels: ``(K, *S)`` bool or integer label maps (torch or numpy), one per rater.
        undecided: the label of tied voxels; ``None``: the smallest tied label.
        progress: called as ``progress(voxels_done, voxels_total)`` on long inputs.

    Returns:
        ``(*S)`` fused labels, in the dtype of ``labels`` (int64 for bool masks with ``undecided``).

    Raises:
        ValueError: ``undecided`` does not fit the labels' dtype.
    """
    stack = as_label_tensor(labels, name="labels")
    if stack.dtype == torch.bool:
        votes = stack.sum(0, dtype=torch.int64) * 2
        fused = votes > stack.shape[0]
        if undecided is None:
            return fused
        return torch.where(votes == stack.shape[0], int(undecided), fused.long())
    mode, tied = vote_mode(stack, progress=progress)
    if undecided is None:
        return mode
    info = torch.iinfo(stack.dtype)
    if not info.min <= undecided <= info.max:
        raise ValueError(f"undecided: {undecided} does not fit the labels' dtype {stack.dtype}; cast them first")
    return torch.where(tied, torch.tensor(undecided, dtype=stack.dtype), mode)


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
