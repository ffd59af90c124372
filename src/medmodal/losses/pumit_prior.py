"""PUMIT's prior-distribution regularisers of the soft-token quantiser and the codebook statistics (Luo et al.,
arXiv 2312.07630; ``shared/methods/pumit.md`` §2.3).

With ``p_i`` the code distribution at position ``i`` (``K`` codes) and ``pbar = mean_i p_i`` over every position of
the batch (all ranks):

* :func:`quant_prior_loss` ``L_quant = sum_k pbar_k log pbar_k = KL(pbar || U) - log K``, in ``[-log K, 0]``;
  minimising it spreads the codebook usage;
* :func:`entropy_loss` ``L_ent = mean_i H(p_i) = log K - mean_i KL(p_i || U)``, in ``[0, log K]``; minimising it
  makes each position confident;
* :func:`codebook_usage`: the share of codes that are some position's argmax and the perplexity ``exp(H(pbar))``.

``probs`` is ``(B, K, *S)`` (or ``(N, K)``): the code axis is 1. With ``gather=True`` and an initialised
``torch.distributed`` process group the positions of every rank are all-gathered first; the gradient flows into
this rank's positions only (:func:`gather_with_local_grad`), as in the official code. Without a process group
gathering is the identity.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["CodebookStats", "codebook_usage", "entropy_loss", "gather_with_local_grad", "quant_prior_loss"]


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0; the gradient reaches this rank's ``x`` only.

    The identity when ``torch.distributed`` is unavailable, not initialised, or has one rank. Every rank must pass
    a tensor of the same shape (one batch shape per step, as the DA-bucketed sampler guarantees).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def _positions(probs: torch.Tensor) -> torch.Tensor:
    """``(B, K, *S)`` or ``(N, K)`` -> ``(positions, K)``."""
    if probs.ndim < 2:
        raise ValueError(f"probs must be (N, K) or (B, K, *S) with the codes on axis 1, got shape {tuple(probs.shape)}")
    return probs.movedim(1, -1).reshape(-1, probs.shape[1])


def _plogp(p: torch.Tensor) -> torch.Tensor:
    """``p log p`` with ``0 log 0 = 0`` and a finite gradient at ``p = 0`` (the log clamped at the dtype's tiny)."""
    return p * p.clamp_min(torch.finfo(p.dtype).tiny).log()


def quant_prior_loss(probs: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
    """``L_quant = sum_k pbar_k log pbar_k`` (scalar, in ``[-log K, 0]``; ``-log K`` iff ``pbar`` is uniform, 0 iff
    every position puts all its mass on one and the same code)."""
    flat = _positions(probs)
    if gather:
        flat = gather_with_local_grad(flat)
    return _plogp(flat.mean(0)).sum()


def entropy_loss(probs: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
    """``L_ent = mean_i H(p_i)`` (scalar, in ``[0, log K]``; 0 for one-hot ``p_i``, ``log K`` for uniform ``p_i``)."""
    flat = _positions(probs)
    if gather:
        flat = gather_with_local_grad(flat)
    return -_plogp(flat).sum(-1).mean()


class CodebookStats(NamedTuple):
    """Codebook statistics of one batch (for logging and plots)."""

    usage: float
    """Share of the ``K`` codes that are the argmax at one position at least, in ``[1/K, 1]``."""
    perplexity: float
    """``exp(H(pbar))``, in ``[1, K]``: the effective number of codes in use."""


@torch.no_grad()
def codebook_usage(probs: torch.Tensor, *, gather: bool = False) -> CodebookStats:
    """The codebook statistics of ``probs (B, K, *S)`` (or ``(N, K)``), over all ranks if ``gather``."""
    flat = _positions(probs)
    if gather:
        flat = gather_with_local_grad(flat)
    k = flat.shape[1]
    used = torch.bincount(flat.argmax(1), minlength=k).gt(0).sum().item()
    entropy = -_plogp(flat.mean(0)).sum().item()
    return CodebookStats(usage=used / k, perplexity=math.exp(entropy))
