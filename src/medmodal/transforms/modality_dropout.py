"""Random modality dropout as a sampler plus a deterministic function (TorchIO's pattern).

``sample_modality_subsets`` draws, per sample, which of its available modalities to keep; it never returns
an empty row. ``drop_modalities`` applies a keep-mask to a batch. Training with random subsets is what lets
one model serve every missing-modality pattern at test time (the "non-dedicated" setting of ShaSpec,
Wang et al., CVPR 2023).
"""

from __future__ import annotations

import torch

from medmodal.data.case import Batch


def sample_modality_subsets(
    available: torch.Tensor, *, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw a random non-empty subset of each row's available modalities.

    With probability ``p`` a sample gets a subset drawn uniformly among the non-empty subsets of its
    available modalities; otherwise it keeps all of them.

    Args:
        available: ``(B, M) bool``, at least one True per row.
        p: probability of dropping (0 keeps everything, 1 always draws a random subset).
        generator: for reproducible draws.

    Returns:
        ``(B, M) bool`` keep-mask, a subset of ``available``, never an empty row.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1], got {p}")
    available = available.to(torch.bool)
    if not bool(available.any(dim=1).all()):
        raise ValueError("every sample needs at least one available modality")
    b, m = available.shape
    dev = available.device
    drop = torch.rand(b, generator=generator) < p
    # Uniform over non-empty subsets of the available set: Bernoulli(1/2) per modality, rejecting empties.
    keep = available.clone()
    todo = drop.clone()
    while bool(todo.any()):
        draw = (torch.rand(b, m, generator=generator) < 0.5).to(dev) & available
        ok = todo.to(dev) & draw.any(dim=1)
        keep[ok] = draw[ok]
        todo &= ~ok.cpu()
    return keep


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
    )
