"""Sliding-window inference under one or many modality subsets (MONAI's ``sliding_window_inference``)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
from monai.inferers import sliding_window_inference
from torch import nn


def nonempty_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """All ``2**M - 1`` non-empty subsets, ordered by size then by modality order (15 for BraTS)."""
    mods = tuple(modalities)
    return [c for k in range(1, len(mods) + 1) for c in combinations(mods, k)]


def subset_masks(modalities: Sequence[str], subsets: Sequence[Sequence[str]]) -> torch.Tensor:
    """``(K, M) bool``: row k is True for the modalities of ``subsets[k]``."""
    mods = list(modalities)
    unknown = sorted({s for sub in subsets for s in sub} - set(mods))
    if unknown:
        raise ValueError(f"unknown modality name(s) {unknown}; expected some of {mods}")
    return torch.tensor([[m in sub for m in mods] for sub in subsets], dtype=torch.bool)


@torch.no_grad()
def predict_subsets(
    network: nn.Module,
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    one_pass: bool = True,
) -> torch.Tensor:
    """Logits of one case under each of ``K`` availability masks, in a single sliding-window pass.

    Each window is read once and run through the network for every mask as one batch of ``n * K`` inputs,
    so the cost is one sliding-window sweep with a ``K`` times larger batch (never batch 1 on the CPU).

    Networks that encode each modality separately (ShaSpec: ``encode`` + ``decode_subsets``) go further when
    ``one_pass``: each window's modalities are encoded once, then fused and decoded under all ``K`` masks.
    This gives the same logits as a forward per mask, because a modality's features do not depend on which
    other modalities are present; ``one_pass=False`` runs that forward per mask (for comparison).

    Args:
        network: ``forward(image (B, M, *S), available (B, M)) -> (B, R, *S)``; optionally ``encode(image,
            available)`` and ``decode_subsets(features, masks (K, M))`` returning ``.logits (B * K, R, *S)``.
        image: ``(1, M, *S)`` one case.
        masks: ``(K, M) bool`` availability masks (each a subset of what the case has).
        roi_size: window size (the training patch size); smaller images are padded.
        overlap: window overlap fraction.
        sw_batch_size: windows per network call (each expanded ``K`` times).

    Returns:
        ``(K, R, *S)`` logits.
    """
    if image.ndim < 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, M, *S), got {tuple(image.shape)}")
    k, m = masks.shape
    if m != image.shape[1]:
        raise ValueError(f"masks have {m} modalities but the image has {image.shape[1]} channels")
    if not bool(masks.any(dim=1).all()):
        raise ValueError("every availability mask needs at least one modality")
    masks = masks.to(image.device)
    spatial = image.ndim - 2

    union = masks.any(dim=0, keepdim=True)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if one_pass and hasattr(network, "decode_subsets"):
            features = network.encode(x, union.expand(n, m))
            out = network.decode_subsets(features, masks).logits  # (n * K, R, *S), sample-major
            return out.reshape(n, k * out.shape[1], *out.shape[2:])
        xx = x.unsqueeze(1).expand(n, k, *x.shape[1:]).reshape(n * k, *x.shape[1:])
        av = masks.unsqueeze(0).expand(n, k, m).reshape(n * k, m)
        out = network(xx, av)
        return out.reshape(n, k * out.shape[1], *out.shape[2:])

    if len(roi_size) != spatial:
        raise ValueError(f"roi_size {tuple(roi_size)} does not match a {spatial}D image")
    roi = tuple(int(r) for r in roi_size)
    logits = sliding_window_inference(
        image, roi_size=roi, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode="gaussian"
    )
    logits = torch.as_tensor(logits)
    return logits.reshape(k, -1, *logits.shape[2:])
