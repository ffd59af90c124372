"""The scalable vote and multi-label STAPLE equal naive per-voxel references on small random inputs.

The references count every label at every voxel (``L × volume`` memory), as the old implementations did; the
library's versions count per voxel chunk and per rater pattern and must give the same answers: exactly for the
vote (tie rule included), to float64 rounding for STAPLE.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import medmodal.fusion.multilabel as multilabel_module
import medmodal.fusion.vote as vote_module
from medmodal.fusion import majority_vote, multilabel_staple
from medmodal.fusion.vote import vote_mode


def naive_vote(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel: the most frequent value (smallest on a tie) and whether it was tied; a Python loop."""
    k, spatial = labels.shape[0], labels.shape[1:]
    flat = labels.reshape(k, -1)
    mode, tied = np.empty(flat.shape[1], labels.dtype), np.empty(flat.shape[1], bool)
    for i in range(flat.shape[1]):
        counts = Counter(flat[:, i].tolist())
        top = max(counts.values())
        winners = sorted(v for v, c in counts.items() if c == top)
        mode[i], tied[i] = winners[0], len(winners) > 1
    return mode.reshape(spatial), tied.reshape(spatial)


def naive_multilabel_staple(labels: np.ndarray, *, max_iter: int = 200, tol: float = 1e-5) -> dict:
    """ITK's multi-label STAPLE with a dense ``(V, L)`` posterior and plain products (no log space)."""
    k_raters = labels.shape[0]
    values, index = np.unique(labels.reshape(k_raters, -1), return_inverse=True)
    index = index.reshape(k_raters, -1)
    n_labels, n_voxels = values.size, index.shape[1]
    prior = np.bincount(index.ravel(), minlength=n_labels) / index.size
    votes = np.zeros((n_voxels, n_labels))
    for k in range(k_raters):
        votes[np.arange(n_voxels), index[k]] += 1
    decided = (votes == votes.max(1, keepdims=True)).sum(1) == 1
    vote = votes.argmax(1)
    theta = np.zeros((k_raters, n_labels, n_labels))  # [k, observed, truth]
    for k in range(k_raters):
        np.add.at(theta[k], (index[k][decided], vote[decided]), 1.0)
    rows = theta.sum(2, keepdims=True)
    theta = np.divide(theta, rows, out=np.zeros_like(theta), where=rows > 0)

    def posterior(theta: np.ndarray) -> np.ndarray:
        w = np.tile(prior, (n_voxels, 1))
        for k in range(k_raters):
            w = w * theta[k][index[k]]
        total = w.sum(1, keepdims=True)
        return np.divide(w, total, out=np.zeros_like(w), where=total > 0), w

    iterations, converged = 0, False
    while iterations < max_iter:
        iterations += 1
        w, _ = posterior(theta)
        updated = np.zeros_like(theta)
        for k in range(k_raters):
            np.add.at(updated[k], index[k], w)
        mass = updated.sum(1, keepdims=True)
        updated = np.divide(updated, mass, out=np.zeros_like(updated), where=mass > 0)
        change = np.abs(updated - theta).max()
        theta = updated
        if change < tol:
            converged = True
            break
    w, raw = posterior(theta)
    ordered = np.sort(raw, axis=1)
    clear = ordered[:, -1] > ordered[:, -2] * (1 + 1e-9)  # no tie, even up to rounding
    return {"w": w.T.reshape(n_labels, *labels.shape[1:]), "theta": theta.transpose(0, 2, 1), "prior": prior,
            "fused": values[w.argmax(1)].reshape(labels.shape[1:]), "clear": clear.reshape(labels.shape[1:]),
            "iterations": iterations, "converged": converged}


def noisy_label_maps(k: int, shape: tuple[int, ...], n_labels: int, *, seed: int, flip: float = 0.3) -> np.ndarray:
    """A smooth label map (bands) and ``k`` raters that replace a fraction ``flip`` of voxels by random labels."""
    rng = np.random.default_rng(seed)
    truth = np.indices(shape).sum(0) * n_labels // sum(shape)
    return np.stack([np.where(rng.random(shape) < flip, rng.integers(0, n_labels, shape), truth)
                     for _ in range(k)]).astype(np.int16)


@pytest.mark.parametrize("shape", [(17, 18, 19), (21, 22)], ids=["3d", "2d"])
@pytest.mark.parametrize(("k", "n_labels"), [(2, 3), (3, 5), (4, 7), (7, 40)])
def test_vote_equals_the_naive_vote_with_its_tie_rule(shape: tuple[int, ...], k: int, n_labels: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(k * n_labels)
    labels = (rng.integers(0, n_labels, (k, *shape)) - 2).astype(np.int16)  # negative values too
    expected, tied = naive_vote(labels)
    assert tied.any() and not tied.all()
    monkeypatch.setattr(vote_module, "VOXEL_CHUNK", 97)  # many chunks, the last one partial
    mode, is_tied = vote_mode(labels)
    np.testing.assert_array_equal(mode.numpy(), expected)
    np.testing.assert_array_equal(is_tied.numpy(), tied)
    np.testing.assert_array_equal(majority_vote(labels).numpy(), expected)
    np.testing.assert_array_equal(majority_vote(labels, undecided=99).numpy(), np.where(tied, 99, expected))


def test_binary_vote_with_an_undecided_label() -> None:
    masks = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert majority_vote(masks, undecided=2).tolist() == [2, 2, 0, 1]  # 2-2 splits are undecided, not background
    with pytest.raises(ValueError, match="does not fit the labels' dtype torch.uint8"):
        majority_vote(masks.to(torch.uint8), undecided=300)


def test_vote_reports_progress_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vote_module, "VOXEL_CHUNK", 100)
    calls: list[tuple[int, int]] = []
    vote_mode(np.zeros((3, 7, 50), np.uint8), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(100, 350), (200, 350), (300, 350), (350, 350)]


@pytest.mark.parametrize("shape", [(9, 10, 11), (23, 19)], ids=["3d", "2d"])
@pytest.mark.parametrize(("k", "n_labels"), [(3, 3), (4, 6), (5, 12)])
def test_multilabel_staple_equals_the_naive_reference(shape: tuple[int, ...], k: int, n_labels: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    labels = noisy_label_maps(k, shape, n_labels, seed=k + n_labels)
    expected = naive_multilabel_staple(labels)
    monkeypatch.setattr(multilabel_module, "VOXEL_CHUNK", 53)  # chunked E-step, seed and final pass
    for compress in (True, False):
        ours = multilabel_staple(labels, compress=compress, posterior=True)
        assert ours.iterations == expected["iterations"] and ours.converged == expected["converged"]
        np.testing.assert_allclose(ours.confusion.numpy(), expected["theta"], atol=1e-10)
        np.testing.assert_allclose(ours.prior.numpy(), expected["prior"], atol=1e-12)
        np.testing.assert_allclose(ours.probability.numpy(), expected["w"], atol=1e-10)
        np.testing.assert_allclose(ours.confidence.numpy(), expected["w"].max(0), atol=1e-10)
        clear = expected["clear"]
        np.testing.assert_array_equal(ours.fused.numpy()[clear], expected["fused"][clear])
        assert not bool(ours.undecided[torch.from_numpy(clear)].any())


def test_patterns_too_many_for_one_integer_are_still_compressed_exactly() -> None:
    labels = noisy_label_maps(14, (7, 8, 9), 30, seed=3, flip=0.2)  # 30 ** 14 > 2 ** 62: byte-string patterns
    fast, dense = multilabel_staple(labels, posterior=True), multilabel_staple(labels, compress=False, posterior=True)
    assert fast.iterations == dense.iterations
    torch.testing.assert_close(fast.confusion, dense.confusion, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast.probability, dense.probability, atol=1e-12, rtol=0)
    assert torch.equal(fast.fused, dense.fused)


def test_multilabel_staple_reports_progress_per_em_pass() -> None:
    calls: list[tuple[int, int]] = []
    result = multilabel_staple(noisy_label_maps(3, (9, 10, 11), 4, seed=0), max_iter=50,
                               progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 50) for i in range(1, result.iterations + 1)]
    assert result.probability is None  # the (L, *S) posterior only on request
