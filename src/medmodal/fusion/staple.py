"""Binary STAPLE (Warfield, Zou, Wells, *Simultaneous Truth and Performance Level Estimation*, IEEE TMI 2004).

Our own float64 torch implementation of the algorithm exactly as ITK's ``STAPLEImageFilter`` runs it
(``shared/methods/deepstaple.md`` §2.5):

1. ``W_i = mean_j D_ij``; the prior ``g = mean_i W_i × confidence_weight`` is computed once and never updated.
2. M-step first: ``p_j = Σ_i W_i D_ij / Σ_i W_i`` (sensitivity), ``q_j = Σ_i (1−W_i)(1−D_ij) / Σ_i (1−W_i)``
   (specificity).
3. E-step: ``W_i = g·a_i / (g·a_i + (1−g)·b_i)`` with ``a_i = Π_j p_j^D_ij (1−p_j)^(1−D_ij)`` and
   ``b_i = Π_j q_j^(1−D_ij) (1−q_j)^D_ij``.
4. Stop after the first iteration (from the second on) in which every ``(Δp_j)²`` and ``(Δq_j)²`` is ``<= tol``.

Differences from ITK, all on purpose: products are summed in log space (no underflow with many raters);
``0/0`` has defined values (``p_j = 1`` when ``Σ W = 0``, ``q_j = 1`` when ``Σ (1−W) = 0``, and ``W_i = g`` when
both ``a_i`` and ``b_i`` are 0) where ITK returns NaN; ``p_j`` and ``q_j`` are clipped to ``[0, 1]`` (a ratio of
two float sums of the same terms can round to ``1 + 2e-16``, which would make ``log(1 − p_j)`` NaN);
``iterations`` counts EM passes, while ITK's
``GetElapsedIterations()`` is one less when it converged (it reports the 0-based index of the last pass); and
the default iteration limit is 200 (DeepSTAPLE's setting) instead of ITK's unlimited one.

EM runs on the distinct rater patterns weighted by their voxel counts (:mod:`medmodal.fusion._common`), which
is exact; ``compress=False`` runs it on every voxel instead, as a reference.

``backend="simpleitk"`` runs SimpleITK's ``STAPLEImageFilter`` itself instead (2D and 3D; the reference of
``shared/methods/deepstaple.md`` §2.4). On the same masks the two agree to about 1e-6 in ``W`` (float
rounding: ITK multiplies the ``K`` per-rater factors directly, we add logarithms) and run the same number of
passes; they differ where ITK has no defined value (``0/0``, e.g. all raters empty: ITK's ``W`` is NaN and
its fused mask empty), where ITK's products underflow (many raters), and, after thresholding, in voxels whose
``W`` lies within that rounding of 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from medmodal.fusion._common import LabelStack, as_label_tensor, check_em_settings, compress_patterns, expand

__all__ = ["STAPLE_BACKENDS", "StapleResult", "staple"]

#: ``staple(backend=...)``: medmodal's float64 implementation, or SimpleITK's ``STAPLEImageFilter``.
STAPLE_BACKENDS = ("torch64", "simpleitk")


@dataclass(frozen=True)
class StapleResult:
    """The outcome of :func:`staple` for ``K`` raters on a grid of shape ``S``.

    Attributes:
        probability: ``(*S)`` float64, ``W``: the posterior probability that each voxel is foreground.
        fused: ``(*S)`` bool, ``probability > 0.5``.
        sensitivity: ``(K,)`` float64, ``p_j``, from the last M-step.
        specificity: ``(K,)`` float64, ``q_j``, from the last M-step.
        prior: ``g``, the prior foreground probability (mean initial ``W`` × ``confidence_weight``).
        iterations: EM passes (M-step then E-step) performed.
        converged: whether the stopping rule was met before ``max_iter``.
        log_likelihood: the observed-data log-likelihood ``Σ_i log(g·a_i + (1−g)·b_i)`` of each pass's
            ``p, q`` (non-decreasing: EM with ``g`` fixed); empty with the SimpleITK backend.
    """

    probability: torch.Tensor
    fused: torch.Tensor
    sensitivity: torch.Tensor
    specificity: torch.Tensor
    prior: float
    iterations: int
    converged: bool
    log_likelihood: tuple[float, ...]


def _m_step(fg: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sensitivities and specificities ``(K,)`` from ``fg (K, U)`` float64 decisions and ``W (U,)``."""
    cw, cb = counts * w, counts * (1.0 - w)
    sum_w, sum_b = cw.sum(), cb.sum()
    ones = torch.ones(fg.shape[0], dtype=torch.float64, device=fg.device)
    p = fg @ cw / sum_w if sum_w > 0 else ones
    q = (1.0 - fg) @ cb / sum_b if sum_b > 0 else ones
    return p.clamp(0.0, 1.0), q.clamp(0.0, 1.0)  # rounding can land a ratio of equal sums at 1 + 2e-16


def _e_step(
    is_fg: torch.Tensor, counts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, g: float
) -> tuple[torch.Tensor, float]:
    """Posterior ``W (U,)`` and the observed-data log-likelihood, from ``is_fg (K, U)`` bool decisions."""
    log_a = torch.where(is_fg, torch.log(p)[:, None], torch.log1p(-p)[:, None]).sum(0)
    log_b = torch.where(is_fg, torch.log1p(-q)[:, None], torch.log(q)[:, None]).sum(0)
    log_ga = log_a + (math.log(g) if g > 0 else -math.inf)
    log_gb = log_b + (math.log1p(-g) if g < 1 else -math.inf)
    log_evidence = torch.logaddexp(log_ga, log_gb)
    impossible = torch.isneginf(log_evidence)  # a_i = b_i = 0 (or g·a_i = (1-g)·b_i = 0): keep the prior
    w = torch.where(impossible, torch.full_like(log_ga, g), torch.exp(log_ga - log_evidence))
    return w, float((counts * log_evidence).sum())


def staple(
    masks: LabelStack,
    *,
    max_iter: int = 200,
    tol: float = 1e-14,
    confidence_weight: float = 1.0,
    foreground: int = 1,
    compress: bool = True,
    backend: Literal["torch64", "simpleitk"] = "torch64",
) -> StapleResult:
    """Fuse ``K`` binary rater masks with STAPLE (Warfield et al., IEEE TMI 2004), as ITK does, in float64.

    Args:
        masks: ``(K, *S)`` bool or integer label maps (torch or numpy), one per rater; a voxel is foreground
            for a rater where its value equals ``foreground`` exactly, background otherwise.
        max_iter: most EM passes (>= 1); 200 as in DeepSTAPLE (ITK's default is unlimited).
        tol: stop when every squared change of ``p_j`` and ``q_j`` between two passes is ``<= tol`` (ITK: 1e-14).
        confidence_weight: multiplies the prior ``g``; ``g`` must stay within ``[0, 1]``.
        foreground: the label value that counts as foreground.
        compress: run EM on the distinct rater patterns (exact, fast); ``False`` runs it on every voxel.
        backend: ``"torch64"`` (this implementation) or ``"simpleitk"`` (SimpleITK's ``STAPLEImageFilter`` with
            ``max_iter`` and ``confidence_weight``; 2D and 3D only; ``tol`` must stay at ITK's fixed 1e-14 and
            ``compress`` does not apply). See the module docstring for how they can differ.

    Returns:
        A :class:`StapleResult` with ``probability``/``fused`` of shape ``(*S)`` and ``(K,)`` performances.

    Raises:
        TypeError / ValueError: bad ``masks`` (see :func:`~medmodal.fusion._common.as_label_tensor`) or
            settings.
    """
    labels = as_label_tensor(masks, name="masks")
    check_em_settings(max_iter=max_iter, tol=tol)
    if backend not in STAPLE_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(STAPLE_BACKENDS)}, got {backend!r}")
    k_raters, spatial = labels.shape[0], tuple(labels.shape[1:])
    decisions = (labels == foreground).reshape(k_raters, -1)
    if backend == "simpleitk":
        return _staple_simpleitk(decisions.reshape(k_raters, *spatial), max_iter=max_iter, tol=tol,
                                 confidence_weight=confidence_weight)
    patterns, counts, inverse = compress_patterns(decisions, base=2, compress=compress)
    is_fg = patterns.bool()
    fg = patterns.to(torch.float64)
    w = fg.mean(0)
    g = float((counts * w).sum() / counts.sum()) * confidence_weight
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"confidence_weight {confidence_weight} makes the prior g = {g:.4g}; it must be in [0, 1]")
    p_last = q_last = None
    log_likelihood: list[float] = []
    converged = False
    for _ in range(max_iter):
        p, q = _m_step(fg, counts, w)
        w, ll = _e_step(is_fg, counts, p, q, g)
        log_likelihood.append(ll)
        if p_last is not None and bool(((p - p_last) ** 2 <= tol).all() and ((q - q_last) ** 2 <= tol).all()):
            converged = True
            break
        p_last, q_last = p, q
    probability = expand(w, inverse).reshape(spatial)
    return StapleResult(
        probability=probability,
        fused=probability > 0.5,
        sensitivity=p,
        specificity=q,
        prior=g,
        iterations=len(log_likelihood),
        converged=converged,
        log_likelihood=tuple(log_likelihood),
    )


def _staple_simpleitk(
    decisions: torch.Tensor, *, max_iter: int, tol: float, confidence_weight: float
) -> StapleResult:
    """SimpleITK's ``STAPLEImageFilter`` on ``(K, *S)`` bool foreground decisions (``S`` 2D or 3D).

    ITK reports the 0-based index of its last pass, so a run that stopped before ``max_iter`` made one pass more
    than ``GetElapsedIterations()``; the prior ``g`` (not exposed by ITK) is recomputed here the same way.
    """
    import SimpleITK as sitk

    if decisions.ndim - 1 not in (2, 3):
        raise ValueError(f"masks: SimpleITK's STAPLE takes 2D or 3D raters, got shape {tuple(decisions.shape)}")
    if tol != 1e-14:
        raise ValueError(f"tol: SimpleITK's STAPLE stops at its fixed 1e-14, got {tol}; use backend='torch64'")
    g = float(decisions.double().mean()) * confidence_weight
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"confidence_weight {confidence_weight} makes the prior g = {g:.4g}; it must be in [0, 1]")
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    f.SetMaximumIterations(max_iter)
    f.SetConfidenceWeight(confidence_weight)
    arrays = decisions.cpu().numpy().astype(np.uint8)
    out = f.Execute(*[sitk.GetImageFromArray(a) for a in arrays])
    probability = torch.from_numpy(sitk.GetArrayFromImage(out).astype(np.float64))
    elapsed = int(f.GetElapsedIterations())
    converged = elapsed < max_iter
    return StapleResult(
        probability=probability,
        fused=probability > 0.5,
        sensitivity=torch.tensor(f.GetSensitivity(), dtype=torch.float64),
        specificity=torch.tensor(f.GetSpecificity(), dtype=torch.float64),
        prior=g,
        iterations=elapsed + 1 if converged else elapsed,
        converged=converged,
        log_likelihood=(),
    )
