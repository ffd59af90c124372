"""Data parameters for segmentation with noisy candidate labels (DeepSTAPLE), as pure tensor functions.

Every candidate label ``j`` has a learnable scalar ``θ_j`` (Saxena, Tuzel, DeCoste, *Data Parameters*, NeurIPS
2019). DeepSTAPLE (Weihsbach et al., *Learning to Predict Multimodal Registration Quality for Unsupervised Domain
Adaptation*, WBIR 2022) turns it into a per-sample loss weight for segmentation and adds a fixed weighting by label
size and a risk regulariser, so that ``θ`` learns the quality of each registered label rather than its size:

* ``w_c ∝ N_c^(-0.35)`` class weights, mean 1 (:func:`class_weights`);
* ``φ(n) = ln(n + e) + e`` fixed divisor of a label with ``n`` foreground voxels (:func:`fixed_divisor`);
* ``w_b = σ(θ_b) / mean_b σ(θ_b)``, divided by ``φ_b`` with fixed weighting (:func:`batch_weights`);
* ``R = -Σ_b w_b F_b / V`` with ``F_b`` the (detached) predicted-foreground voxel count (:func:`risk_term`);
* ``L_dp = Σ_b w_b ℓ_b + R``, ``ℓ_b`` the per-sample cross-entropy (:func:`data_parameter_loss`).

See ``shared/methods/deepstaple.md`` §2.3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fixed_divisor(foreground_voxels: torch.Tensor) -> torch.Tensor:
    """``φ(n) = ln(n + e) + e``: the size term that stops θ from tracking label volume.

    ``φ(0) = 1 + e ≈ 3.718`` (finite for an empty label), ``φ(1000) ≈ 9.63``.

    Args:
        foreground_voxels: ``(...)`` foreground voxel counts ``n ≥ 0``.

    Returns:
        ``(...)`` float divisors, same shape.
    """
    n = torch.as_tensor(foreground_voxels, dtype=torch.float64)
    if bool((n < 0).any()):
        raise ValueError("foreground voxel counts must be non-negative")
    return (torch.log(n + math.e) + math.e).to(torch.get_default_dtype())


def class_weights(class_voxels: torch.Tensor, *, exponent: float = 0.35) -> torch.Tensor:
    """Class weights ``w_c ∝ N_c^(-exponent)``, normalised to mean 1 (DeepSTAPLE: exponent 0.35).

    Args:
        class_voxels: ``(C,)`` voxel count of each class over all training labels.
        exponent: ``0`` gives uniform weights.

    Returns:
        ``(C,)`` float weights with mean 1; the rarer class gets the larger weight. An absent class (count 0)
        is counted as one voxel so its weight stays finite.
    """
    counts = class_voxels.to(torch.float64)
    if counts.ndim != 1 or counts.numel() < 1 or bool((counts < 0).any()):
        raise ValueError(f"class_voxels must be a (C,) tensor of non-negative counts, got {class_voxels}")
    w = counts.clamp_min(1.0).pow(-exponent)
    return (w / w.mean()).to(torch.get_default_dtype())


def batch_weights(theta: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss weights ``w_b = σ(θ_b) / mean_b σ(θ_b)`` (then ``/ φ_b`` when ``divisor`` is given).

    Args:
        theta: ``(B,)`` data parameters of the batch's labels (differentiable).
        divisor: ``(B,)`` fixed divisors ``φ_b`` (:func:`fixed_divisor`), or ``None`` for no fixed weighting.

    Returns:
        ``(B,)`` weights; with ``θ = 0`` and no divisor every weight is exactly 1.
    """
    s = torch.sigmoid(theta)
    w = s / s.mean()
    return w if divisor is None else w / divisor.to(w)


def per_sample_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy averaged over the voxels of each sample.

    Args:
        logits: ``(B, C, *S)``.
        target: ``(B, *S)`` or ``(B, 1, *S)`` integer class map.
        weight: ``(C,)`` class weights or ``None``. With weights each voxel's loss is multiplied by its class
            weight and the plain mean over voxels is taken (not PyTorch's weight-normalised mean), so a sample's
            loss does not depend on the class balance of its own label.

    Returns:
        ``(B,)`` losses.
    """
    if target.ndim == logits.ndim:
        target = target[:, 0]
    voxel = F.cross_entropy(logits.float(), target.long(), weight=None if weight is None else weight.float(),
                            reduction="none")
    return voxel.flatten(1).mean(1)


def foreground_fraction(logits: torch.Tensor) -> torch.Tensor:
    """``F_b / V``: the share of voxels whose arg-max class is not background (0), **detached**.

    Args:
        logits: ``(B, C, *S)``.

    Returns:
        ``(B,)`` fractions in ``[0, 1]`` that carry no gradient.
    """
    with torch.no_grad():
        return (logits.argmax(1) != 0).flatten(1).float().mean(1)


def risk_term(weights: torch.Tensor, fg_fraction: torch.Tensor) -> torch.Tensor:
    """``R = -Σ_b w_b F_b / V``: rewards up-weighting samples the network predicts foreground for.

    Without it, an empty label that the network overfits would reach a small loss and a large weight.

    Args:
        weights: ``(B,)`` sample weights (differentiable in θ).
        fg_fraction: ``(B,)`` predicted-foreground fractions; detached here whatever the caller passes.
    """
    return -(weights * fg_fraction.detach()).sum()


def data_parameter_loss(
    theta: torch.Tensor,
    sample_loss: torch.Tensor,
    fg_fraction: torch.Tensor,
    *,
    divisor: torch.Tensor | None = None,
    risk: bool = True,
) -> torch.Tensor:
    """``L_dp = Σ_b w_b ℓ_b + R`` (a sum over the batch, DeepSTAPLE §2.3).

    Args:
        theta: ``(B,)`` data parameters of the batch's labels.
        sample_loss: ``(B,)`` per-sample losses ``ℓ_b`` (:func:`per_sample_cross_entropy`).
        fg_fraction: ``(B,)`` predicted-foreground fractions (:func:`foreground_fraction`).
        divisor: ``(B,)`` fixed divisors ``φ_b`` or ``None`` (no fixed weighting).
        risk: add the risk regulariser :func:`risk_term`.

    Returns:
        The scalar loss.
    """
    w = batch_weights(theta, divisor)
    loss = (w * sample_loss).sum()
    return loss + risk_term(w, fg_fraction) if risk else loss
