"""MultiMix's losses (Haque et al., *MultiMix: Sparingly-Supervised, Extreme Multitask Learning From Medical
Images*, ISBI 2021; ``shared/methods/multimix.md`` §2.2–2.3).

* :func:`fixmatch_loss`: FixMatch confidence-based pseudo-labelling of the classifier (weak view → pseudo-label,
  strong view trained on it), normalised over the whole unlabelled batch as in the released code, or over the
  confident samples only.
* :func:`segmentation_kl`: the consistency term between segmentation predictions on labelled and unlabelled
  images. ``"bernoulli"`` is the paper's intent (a per-pixel Bernoulli KL of the sigmoid probabilities);
  ``"faithful_zero"`` reproduces the released code, whose softmax over the single seg channel makes it ≡ 0;
  ``"none"`` is the ablation without it.
* :func:`dice_loss`: the soft Dice of the released code, smoothing 1 in numerator and denominator, per sample and
  channel (MONAI's :class:`~monai.losses.DiceLoss`).

Tensors in, tensors out; the training system chooses the weights (code defaults
``L = L_cls + 5·L_dice + 0.25·L_u + 0.01·L_KL``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

FixMatchNorm = Literal["batch", "confident"]
SegKLMode = Literal["bernoulli", "faithful_zero", "none"]

#: Probabilities are clamped to ``[KL_EPS, 1 - KL_EPS]`` before the logarithms of the Bernoulli KL (spec §2.3).
KL_EPS = 1e-6

_DICE = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, batch=False)


class FixMatchTerms(NamedTuple):
    """The unlabelled classification loss and what it was built from (for logging)."""

    loss: torch.Tensor
    """Scalar L_u."""
    mask: torch.Tensor
    """``(B,)`` bool: the samples whose weak-view confidence reached τ."""
    pseudo: torch.Tensor
    """``(B,)`` long: the weak view's argmax (pseudo-label), for every sample."""
    confidence: torch.Tensor
    """``(B,)`` float: the weak view's max softmax probability."""


def fixmatch_loss(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    *,
    tau: float = 0.7,
    norm: FixMatchNorm = "batch",
) -> FixMatchTerms:
    """FixMatch's unlabelled loss (Sohn et al., NeurIPS 2020; MultiMix spec §2.2).

    ``p_w = softmax(weak_logits)``, pseudo-label ``ỹ = argmax p_w``, mask ``m = 1[max p_w ≥ τ]`` (``≥``: a
    sample exactly at τ counts), and

    * ``norm="batch"`` (the released code and FixMatch): ``L_u = Σ_i m_i · CE(strong_i, ỹ_i) / B``;
    * ``norm="confident"``: ``L_u = Σ_i m_i · CE(strong_i, ỹ_i) / max(Σ_i m_i, 1)``.

    The pseudo-label is a target, never a path for gradients: ``weak_logits`` is detached here, and the
    MultiMix system computes it under :func:`torch.no_grad` in the first place (``net.classify`` on the weak
    view), which also saves the memory of that forward pass.

    Args:
        strong_logits: ``(B, K)`` classifier logits of the strongly augmented views (gets the gradient).
        weak_logits: ``(B, K)`` classifier logits of the weakly augmented views of the same images, same order.
        tau: confidence threshold in [0, 1] (code default 0.7).
        norm: ``"batch"`` or ``"confident"``.

    Returns:
        :class:`FixMatchTerms`. With no confident sample the loss is an exact 0 that still belongs to the
        graph of ``strong_logits`` (its gradient is 0).
    """
    if strong_logits.ndim != 2 or strong_logits.shape != weak_logits.shape:
        raise ValueError(
            f"fixmatch_loss: strong {tuple(strong_logits.shape)} and weak {tuple(weak_logits.shape)} logits must "
            "both be (B, K)"
        )
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"fixmatch_loss: tau must be in [0, 1], got {tau}")
    if norm not in ("batch", "confident"):
        raise ValueError(f"fixmatch_loss: norm must be 'batch' or 'confident', got {norm!r}")
    with torch.no_grad():
        weak = weak_logits.detach()
        probs = weak.to(torch.promote_types(weak.dtype, torch.float32)).softmax(dim=1)
        confidence, pseudo = probs.max(dim=1)
        mask = confidence >= tau
    per_sample = F.cross_entropy(strong_logits, pseudo, reduction="none")
    total = (per_sample * mask.to(per_sample.dtype)).sum()
    denom = strong_logits.shape[0] if norm == "batch" else max(int(mask.sum()), 1)
    return FixMatchTerms(loss=total / max(denom, 1), mask=mask, pseudo=pseudo, confidence=confidence)


def segmentation_kl(
    labelled_logits: torch.Tensor,
    unlabelled_logits: torch.Tensor,
    *,
    mode: SegKLMode,
) -> torch.Tensor:
    """Consistency between the segmentation predictions on labelled and unlabelled images (spec §2.3).

    ``"bernoulli"`` (paper intent, medmodal's default): with ``p = σ(labelled_i)``, ``q = σ(unlabelled_i)``
    clamped to ``[1e-6, 1 − 1e-6]``, the per-pixel KL(Bernoulli(p) ‖ Bernoulli(q))

        ``p·(log p − log q) + (1−p)·(log(1−p) − log(1−q))``

    averaged over the pixels and the first ``n = min(B_l, B_u)`` pairs (sample i of each batch, as the released
    code pairs them). Gradients flow into both arguments; the clamp keeps them finite at saturated logits
    (there the clamped side gets no gradient).

    ``"faithful_zero"`` computes what the released code computes: ``softmax`` / ``log_softmax`` over the channel
    axis of the one-channel maps, i.e. ``p ≡ 1``, ``log p ≡ log q ≡ 0``, so the result is exactly 0 and its
    gradient with respect to both inputs is exactly 0 (it is in the graph; ``.grad`` comes back as zeros).

    ``"none"``: a constant 0 outside any graph (``requires_grad`` False).

    Args:
        labelled_logits: ``(B_l, C, *S)`` seg logits of the labelled images (MultiMix: ``C = 1``, the lungs; one
            channel per region otherwise, the KL averaged over them too).
        unlabelled_logits: ``(B_u, C, *S)`` seg logits of the unlabelled images (same ``C`` and ``*S``).
        mode: ``"bernoulli"``, ``"faithful_zero"`` or ``"none"``.

    Returns:
        Scalar tensor.
    """
    if mode not in ("bernoulli", "faithful_zero", "none"):
        raise ValueError(f"segmentation_kl: mode must be 'bernoulli', 'faithful_zero' or 'none', got {mode!r}")
    if labelled_logits.ndim < 3 or labelled_logits.shape[1:] != unlabelled_logits.shape[1:]:
        raise ValueError(
            f"segmentation_kl: labelled {tuple(labelled_logits.shape)} and unlabelled "
            f"{tuple(unlabelled_logits.shape)} logits must be (B, C, *S) with the same C and *S"
        )
    n = min(labelled_logits.shape[0], unlabelled_logits.shape[0])
    if mode == "none" or n == 0:
        return torch.zeros((), dtype=labelled_logits.dtype, device=labelled_logits.device)
    a, b = labelled_logits[:n], unlabelled_logits[:n]
    if mode == "faithful_zero":
        # the released kl_divergence_seg: softmax(l) * (log_softmax(l) - log_softmax(u)) over ONE channel ≡ 0;
        # with several region channels each is taken as its own one-channel map (a new singleton axis)
        a, b = a.unsqueeze(1), b.unsqueeze(1)
        return (a.softmax(dim=1) * (a.log_softmax(dim=1) - b.log_softmax(dim=1))).mean()
    p = torch.sigmoid(a).clamp(KL_EPS, 1.0 - KL_EPS)
    q = torch.sigmoid(b).clamp(KL_EPS, 1.0 - KL_EPS)
    kl = p * (p.log() - q.log()) + (1.0 - p) * (torch.log1p(-p) - torch.log1p(-q))
    return kl.mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MultiMix's soft Dice loss (spec §2.2): ``1 − mean_{b,c} (2 Σ p·y + 1) / (Σ p + Σ y + 1)``.

    ``p = sigmoid(logits)``; the sums run over the pixels of each sample ``b`` and channel ``c``, with smoothing 1
    in numerator and denominator, so a perfect prediction gives ≈ 0 and an empty target with an empty
    prediction gives 0. This is MONAI's :class:`~monai.losses.DiceLoss` with ``sigmoid=True``,
    ``smooth_nr = smooth_dr = 1`` and ``batch=False``.

    Args:
        logits: ``(B, C, *S)`` segmentation logits.
        target: ``(B, C, *S)`` binary target (0/1, any dtype).
    """
    if logits.shape != target.shape:
        raise ValueError(f"dice_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} must match")
    return _DICE(logits, target.to(logits.dtype))
