"""Masked image modelling helpers of PUMIT (Luo et al., arXiv 2312.07630; ``shared/methods/pumit.md`` §2.4).

The ViT (:class:`medmodal.networks.pumit_vit.PUMITViT`) sees a uniform random subset of ``floor(L (1 - r))`` of
its ``L`` grid tokens (mask ratio ``r = 0.55``; the cls token is always visible) and predicts, at every masked
position, the frozen tokenizer's soft token: the distribution ``softmax(tokenizer logits)`` over the ``K`` codes.
The loss is the cross-entropy with these soft targets averaged over the masked positions; the KL divergence from
the target to the prediction (the cross-entropy minus the target's entropy) is logged.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MASK_RATIO", "masked_positions", "random_visible", "soft_target_cross_entropy", "soft_target_kl"]

#: The spec's MIM mask ratio.
MASK_RATIO = 0.55


def _num_visible(num_tokens: int, mask_ratio: float) -> int:
    # round first: 20 * (1 - 0.55) is 8.999... in floating point, and the spec's count is floor(20 * 0.45) = 9
    return math.floor(round(num_tokens * (1.0 - mask_ratio), 9))


def random_visible(
    num_tokens: int,
    *,
    batch_size: int = 1,
    mask_ratio: float = MASK_RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the visible grid tokens of each sample: ``floor(L (1 - mask_ratio))`` distinct indices, uniformly.

    Args:
        num_tokens: ``L``, the grid tokens per sample (the cls token is not counted; it is always visible).
        batch_size: ``B``, one independent draw per sample.
        mask_ratio: the masked fraction ``r`` in ``(0, 1)``.
        generator: the random source (a seeded generator makes the draw reproducible).
        device: where the indices live.

    Returns:
        ``(B, floor(L (1 - r)))`` LongTensor, each row sorted ascending.
    """
    if num_tokens < 1 or batch_size < 1:
        raise ValueError(f"random_visible needs num_tokens >= 1 and batch_size >= 1, got {num_tokens}, {batch_size}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    n = _num_visible(num_tokens, mask_ratio)
    keys = torch.rand(batch_size, num_tokens, generator=generator, device=generator.device if generator else None)
    visible = keys.argsort(dim=1)[:, :n].sort(dim=1).values
    return visible if device is None else visible.to(device)


def masked_positions(visible: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(B, L)`` bool, True where a grid token is masked (not listed in ``visible (B, n)``)."""
    masked = torch.ones(visible.shape[0], num_tokens, dtype=torch.bool, device=visible.device)
    return masked.scatter(1, visible, False)


def _check(logits: torch.Tensor, target_probs: torch.Tensor, masked: torch.Tensor) -> None:
    if logits.shape != target_probs.shape or logits.ndim != 3 or masked.shape != logits.shape[:2]:
        raise ValueError(
            "expected logits and target_probs (B, L, K) and masked (B, L), got "
            f"{tuple(logits.shape)}, {tuple(target_probs.shape)}, {tuple(masked.shape)}"
        )
    if masked.dtype != torch.bool or not masked.any():
        raise ValueError("masked must be a bool (B, L) tensor with at least one masked position")


def soft_target_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """MIM loss: ``mean over masked i of -sum_k q_ik log softmax(logits_i)_k`` (spec §2.4).

    Args:
        logits: ``(B, L, K)`` predictions at every grid position.
        target_probs: ``(B, L, K)`` target distributions (the tokenizer's ``softmax(logits)``; no gradient needed).
        masked: ``(B, L)`` bool, the positions that count. Visible positions are not read (their logits may hold
            anything, NaN included, without changing the loss or its gradient).

    Returns:
        A scalar. With one-hot targets it is the hard-label cross-entropy; with ``target = prediction`` it is the
        prediction's mean entropy.
    """
    _check(logits, target_probs, masked)
    log_p = logits[masked].log_softmax(dim=-1)
    return -(target_probs[masked] * log_p).sum(dim=-1).mean()


def soft_target_kl(logits: torch.Tensor, target_probs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``mean over masked i of KL(q_i || softmax(logits_i))`` (logged next to the MIM loss; ``>= 0``, 0 iff the
    prediction equals the target). Shapes as :func:`soft_target_cross_entropy`; ``0 log 0 = 0``."""
    _check(logits, target_probs, masked)
    q = target_probs[masked]
    log_p = logits[masked].log_softmax(dim=-1)
    return (torch.xlogy(q, q) - q * log_p).sum(dim=-1).mean()
