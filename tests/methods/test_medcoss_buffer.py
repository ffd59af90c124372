"""MedCoSS rehearsal buffer (spec shared/methods/medcoss.md §2.5, invariants 1-3) and feature pooling."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from medmodal.methods.medcoss import buffer as buffer_module
from medmodal.methods.medcoss.buffer import buffer_quota, pool_tokens, select_buffer

HAS_FAISS = importlib.util.find_spec("faiss") is not None


def blobs(sizes: list[int], *, dim: int = 2, spacing: float = 100.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussians (std 1) of the given sizes, centres on a random simplex-like layout; rows shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * spacing
    truth = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[truth] + rng.normal(size=(truth.size, dim))
    order = rng.permutation(truth.size)
    return x[order], truth[order]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize(("n", "expected"), [(1000, (10, 5)), (150, (1, 7)), (200, (2, 5)), (199, (1, 9)),
                                             (100, (1, 5)), (20, (1, 1)), (7, (1, 1)), (2, (1, 1)), (1, (1, 1))])
def test_quota_follows_the_released_formula(n: int, expected: tuple[int, int]) -> None:
    # k = max(1, int(N 0.01)), q = max(1, int(N 0.05 // k)); N = 150 -> k = 1, q = 7 is the spec's derived example
    assert buffer_quota(n) == expected


def test_quota_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        buffer_quota(0)
    with pytest.raises(ValueError, match="ratio must be in"):
        buffer_quota(100, ratio=0.0)
    with pytest.raises(ValueError, match="cluster_ratio must be in"):
        buffer_quota(100, cluster_ratio=1.5)


def test_buffer_is_five_percent_of_1000_well_separated() -> None:
    """Invariant 1: N = 1000 in 10 clusters of 100 -> k = 10, q = 5, exactly 50 items, 5 per true cluster."""
    x, truth = blobs([100] * 10)
    sel = select_buffer(x, seed=0)
    assert (sel.k, sel.q, sel.size) == (10, 5, 50)
    assert same_partition(sel.labels, truth)
    assert np.bincount(truth[sel.indices], minlength=10).tolist() == [5] * 10
    assert np.array_equal(sel.indices, np.sort(sel.indices))
    assert np.array_equal(sel.clusters, sel.labels[sel.indices])


def test_small_clusters_contribute_all_their_members() -> None:
    """Invariant 1: |buffer| = sum_c min(n_c, q); clusters of 1-4 members (< q = 5) give everything they have."""
    sizes = [1, 2, 3, 4, 190, 160, 160, 160, 160, 160]
    x, truth = blobs(sizes, seed=3)
    sel = select_buffer(x, seed=0)
    assert (sel.k, sel.q) == (10, 5)
    assert same_partition(sel.labels, truth)
    assert sel.size == sum(min(s, 5) for s in sizes) == 40
    assert sel.size == int(np.minimum(np.bincount(sel.labels, minlength=sel.k), sel.q).sum())
    for c, s in enumerate(sizes):
        assert int((truth[sel.indices] == c).sum()) == min(s, 5)


@pytest.mark.parametrize("backend", ["sklearn", "minibatch"])
def test_selected_are_the_nearest_to_their_centroid(backend: str) -> None:
    """Invariant 2: per cluster the kept rows are exactly the q smallest distances to the centroid; a planted
    outlier (still in its cluster) is never kept while a closer member is left out."""
    x, _ = blobs([60, 80, 70], seed=1)
    x[0] = x[0] + 6.0  # 6 sigma from its centre, still far nearer to it than to any other
    sel = select_buffer(x, ratio=0.1, cluster_ratio=0.015, backend=backend, seed=0)  # N = 210: k = 3, q = 7
    assert (sel.k, sel.q) == (3, 7)
    dist_all = np.linalg.norm(x[:, None, :] - sel.centroids[None], axis=2)
    assert np.array_equal(sel.labels, dist_all.argmin(axis=1))  # every row sits with its nearest centroid
    for c in range(sel.k):
        members = np.flatnonzero(sel.labels == c)
        d = dist_all[members, c]
        expected = np.sort(members[np.lexsort((members, d))[: sel.q]])
        kept = sel.indices[sel.clusters == c]
        assert np.array_equal(kept, expected)
        assert d[np.isin(members, kept)].max() <= d[~np.isin(members, kept)].min()
        np.testing.assert_allclose(sel.distances[sel.clusters == c], dist_all[kept, c], rtol=1e-12)
    assert 0 not in sel.indices
    np.testing.assert_allclose(sel.inertia, float((dist_all.min(axis=1) ** 2).sum()), rtol=1e-9)


def test_equal_distances_are_broken_by_row_index() -> None:
    """Four points at distance exactly 1 from the mean, repeated: the quota takes the lowest row indices."""
    square = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    x = np.tile(square, (25, 1))  # N = 100 -> k = 1, q = 5; the centroid is exactly (0, 0)
    sel = select_buffer(x, seed=0)
    assert sel.indices.tolist() == [0, 1, 2, 3, 4]
    assert sel.distances.tolist() == [1.0] * 5


def test_fixed_seed_gives_the_same_buffer_and_ids_follow() -> None:
    """Invariant 3 (determinism), on overlapping clusters where the result does depend on the k-means run."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    ids = [f"case-{i:03d}" for i in range(400)]
    a = select_buffer(x, seed=7, ids=ids)
    b = select_buffer(torch.from_numpy(x), seed=7, ids=ids)  # a torch tensor gives the same result
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.centroids, b.centroids)
    assert a.ids == [f"case-{i:03d}" for i in a.indices]
    assert (a.k, a.q, a.size) == (4, 5, 20)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed")
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_sklearn_and_faiss_agree_on_well_separated_data(init: str) -> None:
    """Invariant 3: sklearn and faiss choose the same buffer on well-separated clusters (k = 3, so a random start
    covers every cluster within a few restarts). MiniBatchKMeans finds the same clusters, but its centroids are
    running averages, not exact means, so rows at the edge of the quota may differ: only its partition is checked."""
    x, truth = blobs([100, 100, 100], dim=16, seed=2)
    chosen = {}
    for backend in ("sklearn", "minibatch", "faiss"):
        sel = select_buffer(x, backend=backend, seed=0, init=init, n_init=5)  # type: ignore[arg-type]
        assert sel.backend == backend and same_partition(sel.labels, truth)
        chosen[backend] = sel
    assert np.array_equal(chosen["sklearn"].indices, chosen["faiss"].indices)
    np.testing.assert_allclose(chosen["sklearn"].inertia, chosen["faiss"].inertia, rtol=1e-6)
    assert chosen["minibatch"].size == chosen["sklearn"].size == 15


@pytest.mark.parametrize("backend", ["sklearn", "minibatch", "faiss"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_tiny_stages_keep_one_sample(backend: str, n: int) -> None:
    """k = q = 1 below 20 samples: the row nearest to the centroid (sklearn, faiss: the mean) -- no crash, never
    empty."""
    if backend == "faiss" and not HAS_FAISS:
        pytest.skip("faiss is not installed")
    x = np.arange(n * 3, dtype=np.float64).reshape(n, 3) ** 1.5
    sel = select_buffer(x, backend=backend, seed=0)  # type: ignore[arg-type]
    expected = int(np.lexsort((np.arange(n), np.linalg.norm(x - sel.centroids[0], axis=1)))[0])
    assert (sel.k, sel.q, sel.indices.tolist()) == (1, 1, [expected])
    if backend != "minibatch":
        np.testing.assert_allclose(sel.centroids[0], x.mean(axis=0), rtol=1e-6)
        assert expected == (n - 1) // 2  # the rows grow monotonically: the middle one is nearest to the mean


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_two_rows_equally_far_keep_the_first(backend: str) -> None:
    if backend == "faiss" and not HAS_FAISS:
        pytest.skip("faiss is not installed")
    sel = select_buffer(np.array([[2.0, 2.0], [0.0, 0.0]]), backend=backend, seed=0)  # type: ignore[arg-type]
    assert sel.indices.tolist() == [0] and sel.distances.tolist() == [np.sqrt(2.0)]


def test_auto_backend_is_sklearn_up_to_50000() -> None:
    x, _ = blobs([50, 50], seed=4)
    assert select_buffer(x, seed=0).backend == "sklearn"  # the default is "auto"


def test_auto_uses_faiss_above_50000_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = blobs([50, 50], seed=4)
    monkeypatch.setattr(buffer_module, "AUTO_FAISS_ABOVE", 10)
    assert select_buffer(x, backend="auto", seed=0).backend == ("faiss" if HAS_FAISS else "sklearn")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert select_buffer(x, backend="auto", seed=0).backend == "sklearn"


def test_faiss_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes ``import faiss`` raise ImportError
    with pytest.raises(ImportError, match=r"faiss-cpu.*medmodal\[faiss\]"):
        select_buffer(np.zeros((5, 2)), backend="faiss")


@pytest.mark.parametrize(("features", "kwargs", "message"), [
    (np.zeros((0, 4)), {}, "empty"),
    (np.zeros(4), {}, r"2-D \(N, D\)"),
    (np.zeros((2, 3, 4)), {}, r"2-D \(N, D\)"),
    (np.zeros((4, 0)), {}, "width D = 0"),
    (np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, np.inf]]), {}, r"NaN or infinite values in 2 rows \(first: \[1, 2\]\)"),
    (np.array([["a", "b"]]), {}, "real numbers"),
    (np.zeros((4, 2)), {"ids": ["a"]}, "ids has 1 entries but features have 4 rows"),
    (np.zeros((4, 2)), {"backend": "kmeans"}, "unknown k-means backend 'kmeans'"),
    (np.zeros((4, 2)), {"init": "pp"}, "unknown k-means init"),
    (np.zeros((4, 2)), {"n_init": 0}, "n_init and max_iter must be >= 1"),
    (np.zeros((4, 2)), {"ratio": 0}, "ratio must be in"),
])
def test_bad_input_is_one_clear_error(features: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_buffer(features, **kwargs)


def test_pool_tokens_image_is_the_mean_of_all_tokens_cls_included() -> None:
    tokens = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))  # cls + 4 patches
    torch.testing.assert_close(pool_tokens(tokens), tokens.mean(dim=1))
    torch.testing.assert_close(pool_tokens(tokens, mode="all"), (tokens[:, 0] + tokens[:, 1:].sum(1)) / 5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long])
def test_pool_tokens_text_mask_aware_and_released(mask_dtype: torch.dtype) -> None:
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).to(mask_dtype)
    pooled = pool_tokens(tokens, mask)
    torch.testing.assert_close(pooled[0], (tokens[0, 0] + tokens[0, 1]) / 2)  # padding left out
    torch.testing.assert_close(pooled[1], tokens[1].mean(0))
    released = pool_tokens(tokens, mask, mode="all")  # the released code: padding averaged in
    torch.testing.assert_close(released, tokens.mean(1))
    assert not torch.allclose(released[0], pooled[0])


def test_pool_tokens_errors() -> None:
    tokens = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"samples \[1\] have no real token"):
        pool_tokens(tokens, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"mask must be \(B, L\)"):
        pool_tokens(tokens, torch.ones(2, 3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        pool_tokens(tokens, torch.full((2, 4), 2))
    with pytest.raises(ValueError, match=r"floating \(B, L, D\)"):
        pool_tokens(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool_tokens(tokens, mode="cls")  # type: ignore[arg-type]
