"""MedCoSS's pretext and rehearsal losses (Ye et al., CVPR 2024; ``shared/methods/medcoss.md`` §2.3, §6).

* **MAE** (images of the current stage): each sample keeps ``floor(L (1 - 0.75))`` of its ``L`` grid tokens
  (:func:`random_keep`, drawn from an explicit generator); the target is the image cut into patches
  (:func:`patchify`), normalised per patch ``(t - mean) / sqrt(var + 1e-6)`` (``var`` with Bessel's correction, as
  the MAE code's ``Tensor.var``); the loss is the mean over the masked patches of the per-patch MSE
  (:func:`mae_loss`).
* **MLM** (text of the current stage): cross-entropy over the vocabulary, labels ``-100`` ignored (:func:`mlm_loss`).
* **Feature distillation** (buffer batches of earlier stages): the mean squared difference between the student's and
  the frozen teacher's token features of the same mixed batch, encoded with the same kept tokens; the teacher's side
  carries no gradient (:func:`distillation_loss`).

A norm-pix reconstruction is in normalised units; :func:`unnormalise_patches` maps it back with the statistics of the
original image's patches before it is shown (spec §6; facebookresearch/mae#190).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from medmodal.losses.pumit import masked_positions, random_visible

__all__ = [
    "MAE_MASK_RATIO",
    "NORM_PIX_EPS",
    "KeepDraw",
    "distillation_loss",
    "mae_loss",
    "mlm_loss",
    "normalise_patches",
    "patchify",
    "random_keep",
    "unnormalise_patches",
    "unpatchify",
]

#: The MAE mask ratio of the spec (§2.3).
MAE_MASK_RATIO = 0.75
#: The variance floor of norm-pix targets (§2.3).
NORM_PIX_EPS = 1e-6


class KeepDraw(NamedTuple):
    """What :func:`random_keep` returns.

    Attributes:
        keep: ``(B, n)`` long, the kept grid positions of each sample, ascending, ``n = floor(L (1 - ratio))``.
        mask: ``(B, L)`` bool, True where a position is masked (the MAE loss counts these).
        restore: ``(B, L)`` long, the MAE ``ids_restore``: ``cat(kept, masked)[b, restore[b]]`` is the sequence
            in grid order (the masked positions listed ascending after the kept ones).
    """

    keep: torch.Tensor
    mask: torch.Tensor
    restore: torch.Tensor


def random_keep(
    batch_size: int,
    num_tokens: int,
    *,
    ratio: float = MAE_MASK_RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> KeepDraw:
    """Draw the kept grid tokens of ``batch_size`` samples of ``num_tokens`` tokens (spec §2.3, MAE masking).

    One uniform draw per sample (:func:`medmodal.losses.pumit.random_visible`); the same generator state gives the
    same draw, so the student and the teacher of a buffer batch encode the same tokens when both get this ``keep``.

    Raises:
        ValueError: ``ratio`` outside ``(0, 1)`` or non-positive sizes.
    """
    keep = random_visible(num_tokens, batch_size=batch_size, mask_ratio=ratio, generator=generator, device=device)
    mask = masked_positions(keep, num_tokens)
    masked_ids = torch.arange(num_tokens, device=keep.device).expand(batch_size, -1)[mask].view(batch_size, -1)
    restore = torch.cat((keep, masked_ids), dim=1).argsort(dim=1)
    return KeepDraw(keep, mask, restore)


def _patch_tuple(patch: int | Sequence[int], dims: int) -> tuple[int, ...]:
    patch_t = (patch,) * dims if isinstance(patch, int) else tuple(int(p) for p in patch)
    if len(patch_t) != dims or min(patch_t) < 1:
        raise ValueError(f"patch must be an int or {dims} positive sizes, got {patch}")
    return patch_t


def patchify(x: torch.Tensor, patch: int | Sequence[int]) -> torch.Tensor:
    """Cut ``x (B, C, *S)`` (2D or 3D) into patches ``(B, L, prod(patch) · C)``.

    Patches are ordered row-major over the grid ``S / patch`` (the patch embedding's token order); the values of a
    patch are ordered ``(*within-patch position, C)`` with the channel fastest (the MAE layout).

    Raises:
        ValueError: a tensor that is not 2D/3D or a spatial size that is not a multiple of the patch.
    """
    if x.ndim not in (4, 5):
        raise ValueError(f"patchify expects (B, C, X, Y) or (B, C, X, Y, Z), got {tuple(x.shape)}")
    dims = x.ndim - 2
    patch_t = _patch_tuple(patch, dims)
    spatial = x.shape[2:]
    if any(s % p for s, p in zip(spatial, patch_t, strict=True)):
        raise ValueError(f"spatial shape {tuple(spatial)} must be a multiple of the patch {patch_t}")
    grid = [s // p for s, p in zip(spatial, patch_t, strict=True)]
    split = [v for g, p in zip(grid, patch_t, strict=True) for v in (g, p)]
    y = x.reshape(x.shape[0], x.shape[1], *split)  # (B, C, g0, p0, g1, p1[, g2, p2])
    order = [0, *range(2, 2 + 2 * dims, 2), *range(3, 3 + 2 * dims, 2), 1]  # B, grid axes, patch axes, C
    return y.permute(order).reshape(x.shape[0], math.prod(grid), -1)


def unpatchify(patches: torch.Tensor, patch: int | Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(B, L, prod(patch) · C)`` -> ``(B, C, *(grid · patch))``."""
    grid_t = tuple(int(g) for g in grid)
    dims = len(grid_t)
    patch_t = _patch_tuple(patch, dims)
    if patches.ndim != 3 or patches.shape[1:] != (math.prod(grid_t), math.prod(patch_t) * channels):
        raise ValueError(
            f"patches must be (B, {math.prod(grid_t)}, {math.prod(patch_t) * channels}) for grid {grid_t}, patch "
            f"{patch_t} and {channels} channels, got {tuple(patches.shape)}"
        )
    y = patches.reshape(patches.shape[0], *grid_t, *patch_t, channels)
    order = [0, 1 + 2 * dims]
    for i in range(dims):
        order += [1 + i, 1 + dims + i]
    y = y.permute(order)  # (B, C, g0, p0, g1, p1[, g2, p2])
    return y.reshape(patches.shape[0], channels, *(g * p for g, p in zip(grid_t, patch_t, strict=True)))


def normalise_patches(
    patches: torch.Tensor, *, eps: float = NORM_PIX_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm-pix targets: ``(t - mean) / sqrt(var + eps)`` over the last axis of ``patches (B, L, P)``.

    Returns:
        ``(normalised (B, L, P), mean (B, L, 1), var (B, L, 1))`` (``var`` unbiased, as the MAE code).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt(), mean, var


def unnormalise_patches(pred: torch.Tensor, reference: torch.Tensor, *, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Map a norm-pix prediction ``pred (B, L, P)`` back to image units with the per-patch mean and variance of
    ``reference (B, L, P)``, the original image's patches (spec §6): ``pred · sqrt(var + eps) + mean``."""
    if pred.shape != reference.shape:
        raise ValueError(f"pred and reference must have one shape, got {tuple(pred.shape)}, {tuple(reference.shape)}")
    _, mean, var = normalise_patches(reference, eps=eps)
    return pred * (var + eps).sqrt() + mean


def mae_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool = True
) -> torch.Tensor:
    """MAE reconstruction loss (spec §2.3): the mean over masked patches of the per-patch MSE.

    Args:
        pred: ``(B, L, P)`` predictions at every grid position (the decoder's output).
        target_patches: ``(B, L, P)``, :func:`patchify` of the image the tokenizer read.
        mask: ``(B, L)`` bool, True at masked positions. Visible positions are never read (their predictions may
            hold anything, NaN included, without changing the loss or its gradient).
        norm_pix: normalise each target patch (:func:`normalise_patches`) first (the spec's setting).

    Raises:
        ValueError: mismatched shapes or a mask with no masked position.
    """
    if pred.ndim != 3 or pred.shape != target_patches.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            "expected pred and target_patches (B, L, P) and mask (B, L), got "
            f"{tuple(pred.shape)}, {tuple(target_patches.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool or not bool(mask.any()):
        raise ValueError("mask must be a bool (B, L) tensor with at least one masked position")
    target = target_patches[mask]
    if norm_pix:
        target = normalise_patches(target)[0]
    return (pred[mask] - target.detach()).square().mean()


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-language-model loss (spec §2.3): cross-entropy of ``logits (B, L, V)`` against ``labels (B, L)``
    averaged over the positions whose label is not ``-100``.

    A batch without any counted position gives a zero that still depends on ``logits`` (every rank of a
    distributed step then back-propagates through the same graph).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, L, V) and labels (B, L), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    counted = labels != -100
    if not bool(counted.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[counted], labels[counted])


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Feature distillation (spec §2.3): ``mean over (b, token, channel)`` of ``(student - stopgrad(teacher))²``.

    Args:
        student: ``(B, N, W)`` the current encoder's features of the (mixed) buffer batch.
        teacher: ``(B, N, W)`` the frozen previous-stage encoder's features of the same batch and kept tokens.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher features must have one shape, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    return F.mse_loss(student, teacher.detach())
