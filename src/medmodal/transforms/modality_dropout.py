"""Random modality dropout as a sampler plus a deterministic function (TorchIO's pattern).

``sample_modality_subsets`` draws, per sample, which of its available modalities to keep; it never returns
an empty row. ``drop_modalities`` applies a keep-mask to a batch. Training with random subsets is what lets
one model serve every missing-modality pattern at test time (the "non-dedicated" setting of ShaSpec,
Wang et al., CVPR 2023).
"""

from __future__ import annotations

from typing import Literal

import torch

from medmodal.data.case import Batch


def sample_modality_subsets(
    available: torch.Tensor,
    *,
    p: float,
    sampler: Literal["uniform", "by_size"] = "uniform",
    per: Literal["sample", "batch"] = "sample",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw a random non-empty subset of each row's available modalities.

    With probability ``p`` a sample gets a random subset; otherwise it keeps all its modalities. Samplers:

    * ``"uniform"``: uniform over the ``2**n - 1`` non-empty subsets of the ``n`` available modalities
      (mmFormer's choice);
    * ``"by_size"``: a size ``k ~ U{1..n}`` first, then a uniform ``k``-subset, as the released ShaSpec code
      does. It is *not* uniform over subsets: for ``n = 4`` the full set has probability 1/4, each single
      modality 1/16, each pair 1/24, each triple 1/16.

    ``per="batch"`` draws one subset (and one drop decision) for the whole batch, as the released ShaSpec code
    does, among the modalities every sample has; it needs that intersection to be non-empty.

    Args:
        available: ``(B, M) bool``, at least one True per row.
        p: probability of dropping (0 keeps everything, 1 always draws a random subset).
        sampler: ``"uniform"`` or ``"by_size"``.
        per: ``"sample"`` or ``"batch"``.
        generator: for reproducible draws (CPU).

    Returns:
        ``(B, M) bool`` keep-mask, a subset of ``available``, never an empty row.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1], got {p}")
    if sampler not in ("uniform", "by_size"):
        raise ValueError(f"unknown subset sampler {sampler!r}; expected uniform or by_size")
    if per not in ("sample", "batch"):
        raise ValueError(f"per must be 'sample' or 'batch', got {per!r}")
    available = available.to(torch.bool)
    if not bool(available.any(dim=1).all()):
        raise ValueError("every sample needs at least one available modality")
    if per == "batch":
        common = available.all(dim=0, keepdim=True)
        if not bool(common.any()):
            raise ValueError("per-batch subsets need a modality that every sample of the batch has")
        return sample_modality_subsets(common, p=p, sampler=sampler, generator=generator).expand_as(available)
    b, m = available.shape
    dev = available.device
    drop = (torch.rand(b, generator=generator) < p).to(dev)
    draw = _by_size(available.cpu(), generator) if sampler == "by_size" else _uniform(available.cpu(), generator)
    return torch.where(drop[:, None], draw.to(dev), available)


def _uniform(available: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli(1/2) per available modality, redrawing empty rows: uniform over non-empty subsets."""
    keep = torch.zeros_like(available)
    todo = torch.ones(available.shape[0], dtype=torch.bool)
    while bool(todo.any()):
        draw = (torch.rand(available.shape, generator=generator) < 0.5) & available
        ok = todo & draw.any(dim=1)
        keep[ok] = draw[ok]
        todo &= ~ok
    return keep


def _by_size(available: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``k ~ U{1..n}``, then the ``k`` available modalities with the largest random scores."""
    n = available.sum(dim=1)
    k = (torch.rand(n.shape, generator=generator) * n).long().clamp_max(n - 1) + 1
    scores = torch.rand(available.shape, generator=generator).masked_fill(~available, -1.0)
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = highest score
    return (rank < k[:, None]) & available


def drop_modalities(batch: Batch, keep: torch.Tensor) -> Batch:
    """Return ``batch`` with only the ``keep (B, M)`` modalities available and the others zeroed."""
    keep = keep.to(batch.available.device, torch.bool) & batch.available
    shape = (*keep.shape, *([1] * (batch.image.ndim - 2)))
    image = torch.where(keep.reshape(shape), batch.image, torch.zeros((), dtype=batch.image.dtype))
    return Batch(
        image=image,
        available=keep,
        modalities=batch.modalities,
        label=batch.label,
        target=batch.target,
        case_id=list(batch.case_id),
        weight=batch.weight,
    )
