"""ShaSpec's auxiliary losses (Wang et al., *Multi-modal Learning with Missing Modality via Shared-Specific
Feature Modelling*, CVPR 2023).

* Distribution alignment (DAO) pulls the **shared** features of different modalities together: a sum over
  modality pairs of a distance between their shared bottleneck features. The paper compares KL, MSE, CE and L1
  and keeps L1; the released code sums ``mean|r_i - r_j|`` over the cyclic pairs (0,1), (1,2), (2,3), (3,0).
* Domain classification (DCO) asks a linear classifier to recover the modality identity from the globally
  pooled **specific** features: cross-entropy with the modality index as the label.

Both are computed over the available modalities of each sample only (the paper's intent); passing an
all-True mask reproduces the released code, which also includes zero-filled missing modalities.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DaoForm = Literal["l1_pairs", "mse_pairs", "kl_softmax_pairs"]
DaoPairs = Literal["cyclic", "all"]


def modality_pairs(present: list[int], *, pairs: DaoPairs = "cyclic") -> list[tuple[int, int]]:
    """Modality index pairs the DAO loss sums over, for the ``present`` indices (in modality order).

    ``cyclic``: consecutive present modalities and the last back to the first — ``{(0,1),(1,2),(2,3),(3,0)}``
    for four, the single pair for two, none for one. ``all``: every unordered pair.
    """
    n = len(present)
    if n < 2:
        return []
    if pairs == "all":
        return [(present[i], present[j]) for i in range(n) for j in range(i + 1, n)]
    if pairs == "cyclic":
        if n == 2:
            return [(present[0], present[1])]
        return [(present[i], present[(i + 1) % n]) for i in range(n)]
    raise ValueError(f"unknown dao_pairs {pairs!r}; expected cyclic or all")


def _pair_distance(a: torch.Tensor, b: torch.Tensor, form: DaoForm) -> torch.Tensor:
    """Distance between two shared features ``(C, *s)``: a scalar."""
    if form == "l1_pairs":
        return (a - b).abs().mean()
    if form == "mse_pairs":
        return (a - b).square().mean()
    if form == "kl_softmax_pairs":  # KL(softmax_C(a) || softmax_C(b)), averaged over positions
        la, lb = F.log_softmax(a.flatten(1), dim=0), F.log_softmax(b.flatten(1), dim=0)
        return (la.exp() * (la - lb)).sum(0).mean()
    raise ValueError(f"unknown dao_form {form!r}; expected l1_pairs, mse_pairs or kl_softmax_pairs")


def dao_loss(
    shared: torch.Tensor,
    available: torch.Tensor,
    *,
    form: DaoForm = "l1_pairs",
    pairs: DaoPairs = "cyclic",
) -> torch.Tensor:
    """Distribution-alignment loss over the shared bottleneck features of each sample's available modalities.

    ``L_dao = mean_b Σ_{(i,j) ∈ P_b} d(r_{b,i}, r_{b,j})`` where ``P_b`` are the pairs among sample ``b``'s
    available modalities (:func:`modality_pairs`); a sample with one modality contributes 0.

    Args:
        shared: ``(B, M, C, *s)`` shared features r.
        available: ``(B, M) bool``: which slots enter the loss.
        form: ``"l1_pairs"`` (paper's choice), ``"mse_pairs"`` or ``"kl_softmax_pairs"``.
        pairs: ``"cyclic"`` (released code) or ``"all"``.

    Returns:
        Scalar loss.
    """
    if available.shape != shared.shape[:2]:
        raise ValueError(f"available must be (B, M) = {tuple(shared.shape[:2])}, got {tuple(available.shape)}")
    total = shared.new_zeros(())
    for b in range(shared.shape[0]):
        present = [int(i) for i in torch.nonzero(available[b]).flatten()]
        for i, j in modality_pairs(present, pairs=pairs):
            total = total + _pair_distance(shared[b, i], shared[b, j], form)
    return total / shared.shape[0]


def dco_loss(domain_logits: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Domain-classification loss: cross-entropy of each available slot's logits against its modality index.

    Args:
        domain_logits: ``(B, M, M)``; row ``[b, m]`` are the classifier's logits for specific feature ``s_{b,m}``.
        available: ``(B, M) bool``: which slots enter the loss (mean over them).

    Returns:
        Scalar loss (0 when no slot is selected).
    """
    b, m = available.shape
    if domain_logits.shape != (b, m, m):
        raise ValueError(f"domain_logits must be (B, M, M) = {(b, m, m)}, got {tuple(domain_logits.shape)}")
    labels = torch.arange(m, device=domain_logits.device).expand(b, m)
    sel = available.to(torch.bool)
    if not bool(sel.any()):
        return domain_logits.sum() * 0.0
    return F.cross_entropy(domain_logits[sel], labels[sel])
