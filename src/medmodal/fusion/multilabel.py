"""Multi-label STAPLE (Rohlfing, Russakoff, Maurer, *Performance-based classifier combination in atlas-based
image segmentation using expectation-maximization parameter estimation*, IEEE TMI 2004), as ITK's
``MultiLabelSTAPLEImageFilter`` runs it, in float64 torch.

Each rater k has a confusion matrix ``θ_k[o, t] = P(rater says o | truth t)``. ITK's algorithm:

1. **Priors** ``π_t``: the frequency of label t over every rater's every voxel, computed once.
2. **Seed** ``θ_k`` from a majority vote: count (rater label, voted label) pairs, then normalise each rater-label
   row to sum 1 (so the seed is ``P(vote | rater label)``; the EM updates normalise the other way).
3. **E-step** ``W_i(t) ∝ π_t Π_k θ_k[D_ik, t]``; **M-step** ``θ_k[o, t] = Σ_{i: D_ik = o} W_i(t) / Σ_i W_i(t)``.
4. Stop when no entry of any ``θ_k`` changed by ``tol`` (1e-5) or more, then run one more E-step and take the
   label of largest ``W_i``; a voxel whose largest ``W_i`` is shared by several labels (or whose ``W_i`` are all 0)
   is **undecided** and gets ``undecided`` (default: the largest label + 1, as ITK).

Known ITK pitfalls (``shared/methods/deepstaple.md`` §2.5) and what happens here instead:

* voxels tied in the seeding vote carry no evidence and are skipped (ITK ≤ 5.4 wrote them one past the matrix
  column and corrupted the next rater-label row, InsightSoftwareConsortium/ITK#6579, #6607);
* the undecided label is the caller's ``undecided`` (SimpleITK/SimpleITK#943);
* everything is float64 and counted exactly (SimpleITK's float weights stop counting at 2^24 voxels ×
  raters, SimpleITK/SimpleITK#2670), and products are summed in log space, so a voxel with many disagreeing
  raters does not underflow to "all W = 0" (undecided) as it can in ITK's float products.

Labels are the values present in any rater (any integers, negative included), not ``0..max``: a value absent
from every rater has prior 0 in ITK and can never win, so the result is the same. ``iterations`` counts EM
passes; the default limit is 200 (ITK's is unlimited).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medmodal.fusion._common import LabelStack, as_label_tensor, check_em_settings, compress_patterns, expand

__all__ = ["MultiLabelStapleResult", "multilabel_staple"]


@dataclass(frozen=True)
class MultiLabelStapleResult:
    """The outcome of :func:`multilabel_staple` for ``K`` raters, ``L`` labels and a grid of shape ``S``.

    Attributes:
        fused: ``(*S)`` int64 label values; undecided voxels hold ``undecided_label``.
        probability: ``(L, *S)`` float64 posterior ``W`` of each label (in ``labels`` order); all 0 where no
            label is possible.
        labels: ``(L,)`` int64, the label values, ascending.
        confusion: ``(K, L, L)`` float64, ``confusion[k, t, o] = P(rater k says labels[o] | truth labels[t])``
            (rows are the truth and sum to 1 unless the label never gets weight; ITK's ``GetConfusionMatrix(k)``
            is the transpose with one extra, unused row).
        prior: ``(L,)`` float64 label frequencies over all raters.
        iterations: EM passes performed.
        converged: whether the stopping rule was met before ``max_iter``.
        undecided_label: the value written to undecided voxels.
        undecided: ``(*S)`` bool, the undecided voxels.
    """

    fused: torch.Tensor
    probability: torch.Tensor
    labels: torch.Tensor
    confusion: torch.Tensor
    prior: torch.Tensor
    iterations: int
    converged: bool
    undecided_label: int
    undecided: torch.Tensor


def _label_index(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, N)`` label values → their sorted distinct values ``(L,)`` and ``(K, N)`` indices into them.

    The indices keep the input's integer dtype when the values already are ``0..L-1`` (no copy).
    """
    lo, hi = int(labels.min()), int(labels.max())
    if hi - lo >= 1 << 20:  # sparse huge values: sort instead of a lookup table
        return torch.unique(labels, sorted=True, return_inverse=True)
    shifted = labels if lo == 0 and labels.dtype != torch.bool else labels.long() - lo
    present = torch.bincount(shifted.flatten(), minlength=hi - lo + 1) > 0
    values = torch.nonzero(present).flatten() + lo
    if bool(present.all()) and lo == 0:
        return values, shifted
    return values, (torch.cumsum(present.long(), 0) - 1)[shifted.long()]


def _posterior(
    patterns: torch.Tensor, log_prior: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised ``log W (U, L)`` and normalised ``W (U, L)`` (rows of zeros where every label is impossible)."""
    log_theta = torch.log(theta)  # (K, L_obs, L_true); log 0 = -inf
    log_w = log_prior.expand(patterns.shape[1], -1).clone()
    for k in range(patterns.shape[0]):
        log_w += log_theta[k][patterns[k]]
    norm = torch.logsumexp(log_w, dim=1, keepdim=True)
    w = torch.where(torch.isneginf(norm), torch.zeros_like(log_w), torch.exp(log_w - norm))
    return log_w, w


def _accumulate(patterns: torch.Tensor, weights: torch.Tensor, n_labels: int) -> torch.Tensor:
    """``out[k, o, :] = Σ_{u: patterns[k, u] = o} weights[u, :]`` → ``(K, L, L)``."""
    out = torch.zeros((patterns.shape[0], n_labels, weights.shape[1]), dtype=torch.float64, device=weights.device)
    for k in range(patterns.shape[0]):
        out[k].index_add_(0, patterns[k], weights)
    return out


def _seed(patterns: torch.Tensor, counts: torch.Tensor, n_labels: int) -> torch.Tensor:
    """ITK's seed from a majority vote (ties skipped), each rater-label row normalised to sum 1: ``(K, L, L)``."""
    votes = torch.zeros((patterns.shape[1], n_labels), dtype=torch.float64, device=patterns.device)
    for k in range(patterns.shape[0]):
        votes.scatter_add_(1, patterns[k][:, None], torch.ones_like(votes[:, :1]))
    top = votes.max(dim=1, keepdim=True).values
    decided = (votes == top).sum(1) == 1
    one_hot = ((votes == top) & decided[:, None]).to(torch.float64) * counts[:, None]
    seed = _accumulate(patterns, one_hot, n_labels)
    rows = seed.sum(2, keepdim=True)
    return torch.where(rows > 0, seed / rows.clamp_min(1e-300), seed)


def multilabel_staple(
    labels: LabelStack,
    *,
    max_iter: int = 200,
    tol: float = 1e-5,
    undecided: int | None = None,
    compress: bool = True,
) -> MultiLabelStapleResult:
    """Fuse ``K`` label maps with multi-label STAPLE (Rohlfing et al., IEEE TMI 2004), as ITK does, in float64.

    Args:
        labels: ``(K, *S)`` bool or integer label maps (torch or numpy), one per rater.
        max_iter: most EM passes (>= 1); ITK's default is unlimited.
        tol: stop once every confusion-matrix entry changed by less than ``tol`` in a pass (ITK: 1e-5).
        undecided: label for undecided voxels; ``None`` uses the largest label + 1 (ITK's default).
        compress: run EM on the distinct rater patterns (exact; used when ``L ** K < 2**62``); ``False``
            runs it on every voxel.

    Returns:
        A :class:`MultiLabelStapleResult`.

    Raises:
        TypeError / ValueError: bad ``labels`` (see :func:`~medmodal.fusion._common.as_label_tensor`) or
            settings.
    """
    stack = as_label_tensor(labels, name="labels")
    check_em_settings(max_iter=max_iter, tol=tol)
    k_raters, spatial = stack.shape[0], tuple(stack.shape[1:])
    values, index = _label_index(stack.reshape(k_raters, -1))
    n_labels = values.numel()
    patterns, counts, inverse = compress_patterns(index, base=n_labels, compress=compress)

    prior = _accumulate(patterns, counts[:, None], n_labels).sum((0, 2))
    prior = prior / prior.sum()
    log_prior = torch.log(prior)
    theta = _seed(patterns, counts, n_labels)  # (K, observed, truth), as ITK stores it
    converged = False
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        _, w = _posterior(patterns, log_prior, theta)
        updated = _accumulate(patterns, counts[:, None] * w, n_labels)
        mass = updated.sum(1, keepdim=True)  # per rater and truth label
        updated = torch.where(mass > 0, updated / mass.clamp_min(1e-300), updated)
        change = float((updated - theta).abs().max())
        theta = updated
        if change < tol:
            converged = True
            break

    log_w, w = _posterior(patterns, log_prior, theta)
    best = log_w.max(dim=1, keepdim=True).values
    undecided_pattern = ((log_w == best).sum(1) > 1) | torch.isneginf(best[:, 0])
    undecided_label = int(values.max()) + 1 if undecided is None else int(undecided)
    fused_pattern = torch.where(undecided_pattern, undecided_label, values[log_w.argmax(1)])
    return MultiLabelStapleResult(
        fused=expand(fused_pattern, inverse).reshape(spatial),
        probability=expand(w, inverse).T.reshape(n_labels, *spatial),
        labels=values,
        confusion=theta.transpose(1, 2).contiguous(),
        prior=prior,
        iterations=iterations,
        converged=converged,
        undecided_label=undecided_label,
        undecided=expand(undecided_pattern, inverse).reshape(spatial),
    )
