"""MedCoSS rehearsal buffer: after a stage, keep about 5 % of its samples, chosen by k-means on encoder features
(spec ``shared/methods/medcoss.md`` §2.5; Ye et al., CVPR 2024).

Pipeline: encode every sample of the finished stage (mask ratio 0, no augmentation), pool each sample's output
tokens into one feature with :func:`pool_tokens`, then :func:`select_buffer` clusters the ``(N, D)`` features into
``k = max(1, int(N * 0.01))`` clusters and keeps, in each cluster, the ``q = max(1, int(N * 0.05 // k))`` members
nearest to its centroid (:func:`buffer_quota`). A cluster with fewer than ``q`` members contributes all of them, so
the buffer holds ``sum_c min(n_c, q)`` samples, which can be fewer than 5 %.

k-means backends (``backend``): ``"sklearn"`` (:class:`sklearn.cluster.KMeans`, the released code's choice),
``"minibatch"`` (:class:`sklearn.cluster.MiniBatchKMeans`), ``"faiss"`` (``faiss.Kmeans``, optional extra
``medmodal[faiss]``, imported only when used) and ``"auto"``, the default (faiss when it is installed and
N > 50 000, sklearn otherwise; spec §2.7 ``buffer_kmeans_backend``). Measured at N = 100 000, k = 1 000, width 768
on 2 loaded cores (``benchmarks/medcoss.py``, ``docs/benchmarks.md``): sklearn ``KMeans`` 2.3-2.7 min, most of it
the k-means++ start; faiss with its default random start 4-6x faster but with a 13 % higher inertia on clustered
features (from the same k-means++ start faiss reaches the same inertia and is no faster); MiniBatchKMeans 22 %
higher and a buffer of 69 % of the target size. Every backend is seeded; the assignment, the distances, the
inertia and the selection are computed the same way for all of them, so their results compare directly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Backend = Literal["sklearn", "minibatch", "faiss", "auto"]
Init = Literal["k-means++", "random"]
BACKENDS = ("sklearn", "minibatch", "faiss", "auto")
INITS = ("k-means++", "random")
#: ``backend="auto"`` uses faiss (when installed) above this many samples (spec §2.7)
AUTO_FAISS_ABOVE = 50_000
_CHUNK = 8192  # rows per block when distances are computed in float64


@dataclass(frozen=True)
class BufferSelection:
    """The samples :func:`select_buffer` keeps, with what the choice was based on.

    Attributes:
        indices: ``(n,) int64``, the selected rows of ``features``, ascending.
        clusters: ``(n,) int64``, the cluster of each selected row.
        distances: ``(n,) float64``, each selected row's Euclidean distance to its cluster's centroid.
        labels: ``(N,) int64``, the cluster of every row (its nearest centroid).
        centroids: ``(k, D) float64``, the final centroids.
        k: number of clusters asked for (a cluster may end up empty when features repeat).
        q: quota, the most rows kept per cluster.
        inertia: sum over all rows of the squared distance to their centroid (float64, the same formula for
            every backend).
        backend: the backend that ran (``"auto"`` resolved).
        ids: the identifiers of the selected rows in the order of ``indices`` when ``ids`` were given, else None.
    """

    indices: np.ndarray
    clusters: np.ndarray
    distances: np.ndarray
    labels: np.ndarray
    centroids: np.ndarray
    k: int
    q: int
    inertia: float
    backend: str
    ids: list[Any] | None = None

    @property
    def size(self) -> int:
        """Number of selected samples, ``sum_c min(n_c, q)``."""
        return int(self.indices.size)


def buffer_quota(n: int, *, ratio: float = 0.05, cluster_ratio: float = 0.01) -> tuple[int, int]:
    """Clusters and per-cluster quota for ``n`` samples (spec §2.5, step 2).

    ``k = max(1, int(n * cluster_ratio))`` and ``q = max(1, int(n * ratio // k))``, the released code's formulas
    (float arithmetic; for the default ratios they equal the exact rational values for every ``n`` up to 300 000,
    checked). ``q`` is 5 when ``n`` is a multiple of 100 but not in general:
    ``n = 150`` gives ``k = 1, q = 7``. The ``max(1, ·)`` guards are medmodal's: below 100 samples there is one
    cluster, and below 20 samples the quota is 1, so a tiny stage keeps exactly one sample (the one nearest to the
    mean feature) instead of none or a crash.

    Raises:
        ValueError: ``n < 1`` or a ratio outside ``(0, 1]``.
    """
    if n < 1:
        raise ValueError(f"the buffer needs at least one sample, got n = {n}")
    for name, value in (("ratio", ratio), ("cluster_ratio", cluster_ratio)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"buffer {name} must be in (0, 1], got {value}")
    k = max(1, int(n * cluster_ratio))
    q = max(1, int(n * ratio // k))
    return k, q


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor | None = None, *,
                mode: Literal["mask_aware", "all"] = "mask_aware") -> torch.Tensor:
    """One feature per sample: the mean of its output tokens (spec §2.5, step 1; switch ``text_pooling``).

    Images: pass every output token (cls included, no mask) and get the plain mean, as the released code does.
    Text: ``mode="mask_aware"`` (medmodal's default) averages only the real tokens (``mask == 1``);
    ``mode="all"`` averages every position, padding included, as the released code does.

    Args:
        tokens: ``(B, L, D)`` floating encoder output.
        mask: ``(B, L)`` bool or integer, 1 / True for a real token; None means every token is real.
        mode: ``"mask_aware"`` or ``"all"``.

    Returns:
        ``(B, D)``, the dtype of ``tokens``.

    Raises:
        ValueError: wrong ranks or shapes, an unknown mode, a mask value other than 0/1, or (mask-aware) a sample
            without any real token.
    """
    if mode not in ("mask_aware", "all"):
        raise ValueError(f"unknown pooling mode {mode!r}; expected 'mask_aware' or 'all'")
    if tokens.ndim != 3 or not tokens.is_floating_point():
        raise ValueError(f"tokens must be a floating (B, L, D) tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if mode == "all" or mask is None:
        return tokens.mean(dim=1)
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"mask must be (B, L) = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must hold only 0 and 1 (1 = a real token)")
    weight = mask.to(tokens.dtype)
    count = weight.sum(dim=1, keepdim=True)
    if bool((count == 0).any()):
        empty = torch.nonzero(count[:, 0] == 0).flatten().tolist()
        raise ValueError(f"samples {empty} have no real token (all-zero attention mask); drop empty inputs first")
    return torch.einsum("bld,bl->bd", tokens, weight) / count


def _as_features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu()
        features = features.numpy() if features.dtype == torch.float64 else features.float().numpy()
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"buffer features must be a 2-D (N, D) array, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("buffer features are empty (N = 0): the stage has no samples to choose from")
    if x.shape[1] == 0:
        raise ValueError("buffer features have width D = 0")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"buffer features must be real numbers, got dtype {x.dtype}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"buffer features hold NaN or infinite values in {rows.size} rows (first: "
                         f"{rows[:5].tolist()}); check the encoder output of this stage")
    return x


def _kmeans_plusplus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``(k, D) float32`` starting centroids by :func:`sklearn.cluster.kmeans_plusplus` (greedy k-means++, sklearn's
    default start), computed on a float64 copy of ``x``: on float32 rows sklearn upcasts the whole matrix to float64
    in every one of its ``k`` distance steps, which made the start about 4x slower (10 000 x 768 rows, k = 100:
    23 s against 5.5 s on 2 cores) and the bulk of ``KMeans``' time at 1 % of N clusters (``benchmarks/medcoss.py``).
    """
    from sklearn.cluster import kmeans_plusplus

    return kmeans_plusplus(x.astype(np.float64), k, random_state=seed)[0].astype(np.float32)


def _sklearn_kmeans(x: np.ndarray, k: int, *, minibatch: bool, init: Init, n_init: int, max_iter: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if minibatch:  # its k-means++ start runs on a subsample of 3 * max(1024, k) rows: cheap enough as it is
        km = MiniBatchKMeans(n_clusters=k, init=init, n_init=n_init, max_iter=max_iter, random_state=seed).fit(x)
        return km.cluster_centers_, km.labels_
    if init == "random":
        km = KMeans(n_clusters=k, init=init, n_init=n_init, max_iter=max_iter, random_state=seed).fit(x)
        return km.cluster_centers_, km.labels_
    best = None
    for r in range(n_init):  # restarts seeded seed, seed + 1, ... (as faiss); the lowest inertia wins
        start = _kmeans_plusplus(x, k, seed + r)
        km = KMeans(n_clusters=k, init=start, n_init=1, max_iter=max_iter, random_state=seed + r).fit(x)
        if best is None or km.inertia_ < best.inertia_:
            best = km
    assert best is not None
    return best.cluster_centers_, best.labels_


def _faiss_kmeans(x: np.ndarray, k: int, *, init: Init, n_init: int, max_iter: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        import faiss
    except ImportError:
        raise ImportError("k-means backend 'faiss' needs the faiss-cpu package: pip install 'medmodal[faiss]', "
                          "or use backend 'sklearn' or 'minibatch'") from None
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for r in range(n_init):  # restarts seeded seed, seed + 1, ...; the lowest objective wins
        km = faiss.Kmeans(x.shape[1], k, niter=max_iter, seed=seed + r, verbose=False,
                          min_points_per_centroid=1)
        start = _kmeans_plusplus(x, k, seed + r) if init == "k-means++" else None
        km.train(x, init_centroids=start)
        dist, assign = km.index.search(x, 1)
        objective = float(dist.sum(dtype=np.float64))
        if best is None or objective < best[0]:
            best = (objective, km.centroids.copy(), assign[:, 0].astype(np.int64))
    assert best is not None
    return best[1], best[2]


def select_buffer(
    features: np.ndarray | torch.Tensor,
    *,
    ratio: float = 0.05,
    cluster_ratio: float = 0.01,
    backend: Backend = "auto",
    seed: int = 0,
    ids: Sequence[Any] | None = None,
    init: Init | None = None,
    n_init: int = 1,
    max_iter: int = 300,
) -> BufferSelection:
    """Choose a stage's rehearsal buffer by k-means on its features (spec §2.5, steps 2-4; invariants 1-3).

    ``k, q = buffer_quota(N, ratio=ratio, cluster_ratio=cluster_ratio)``; k-means with ``k`` clusters; every
    row is assigned to its nearest centroid; in each cluster the ``q`` rows with the smallest Euclidean distance
    to the centroid are kept (float64 distances; equal distances are broken by the smaller row index, so the
    choice is deterministic), and all of them when the cluster has fewer than ``q``.

    k-means settings:

    * ``init``: ``"k-means++"`` (:func:`sklearn.cluster.kmeans_plusplus` on float64 rows, then the backend's Lloyd
      iterations; MiniBatchKMeans seeds on its own subsample) or ``"random"`` (k distinct rows drawn at random).
      None (default) takes each library's default: k-means++ for sklearn and MiniBatchKMeans, random for faiss (a
      k-means++ start costs far more than the Lloyd iterations at 1 % of N clusters, which is what faiss avoids).
    * ``n_init``: restarts, the lowest inertia wins (1 is what sklearn's ``n_init="auto"`` does for k-means++).
    * ``max_iter``: Lloyd iterations at most (sklearn ``KMeans`` also stops at its relative tolerance 1e-4;
      ``MiniBatchKMeans`` counts passes over the data; faiss always runs ``max_iter``).
    * ``seed`` seeds every draw: k-means++ and faiss restart r use ``seed + r``; sklearn's random start and
      MiniBatchKMeans draw their restarts from ``seed``.

    faiss trains on float32 and on at most 256 rows per centroid (its default subsampling, which applies only when
    N > 256 k; the buffer's k = 1 % of N never triggers it). Memory: besides ``features``, a float32 copy (when
    they are not float32) and, for k-means++, a float64 copy.

    Args:
        features: ``(N, D)`` real features (numpy or torch, any float dtype), e.g. :func:`pool_tokens` output.
        ratio: buffer fraction (spec: 0.05).
        cluster_ratio: clusters per sample (spec: 0.01).
        backend: ``"sklearn"``, ``"minibatch"``, ``"faiss"`` or ``"auto"`` (faiss when installed and
            N > 50 000, else sklearn).
        seed: seeds k-means.
        ids: optional identifiers of the N rows; the selection returns those of the kept rows.
        init, n_init, max_iter: k-means settings (above).

    Returns:
        :class:`BufferSelection`.

    Raises:
        ValueError: features not ``(N, D)``, empty, non-finite or non-numeric; a bad ratio, backend, init,
            ``n_init`` / ``max_iter`` < 1, or ``len(ids) != N``.
        ImportError: ``backend="faiss"`` without faiss installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if init is not None and init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; expected one of {', '.join(INITS)}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"k-means n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    x = _as_features(features)
    n = x.shape[0]
    if ids is not None and len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but features have {n} rows")
    k, q = buffer_quota(n, ratio=ratio, cluster_ratio=cluster_ratio)
    if backend == "auto":
        backend = "faiss" if n > AUTO_FAISS_ABOVE and importlib.util.find_spec("faiss") is not None else "sklearn"
    if init is None:
        init = "random" if backend == "faiss" else "k-means++"

    x32 = np.ascontiguousarray(x, dtype=np.float32)
    settings = dict(init=init, n_init=n_init, max_iter=max_iter, seed=int(seed))
    if backend == "faiss":
        centroids, labels = _faiss_kmeans(x32, k, **settings)  # type: ignore[arg-type]
    else:
        centroids, labels = _sklearn_kmeans(x32, k, minibatch=backend == "minibatch", **settings)  # type: ignore[arg-type]
    centroids = np.asarray(centroids, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)

    dist = np.empty(n, dtype=np.float64)
    for s in range(0, n, _CHUNK):  # float64 in blocks: an (N, D) float64 copy of 100 k x 768 would be 600 MB
        diff = x[s:s + _CHUNK].astype(np.float64) - centroids[labels[s:s + _CHUNK]]
        dist[s:s + _CHUNK] = np.sqrt(np.einsum("nd,nd->n", diff, diff))

    index = np.arange(n)
    order = np.lexsort((index, dist, labels))  # by cluster, then distance, then row index
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")  # where each row's cluster starts
    rank = np.arange(n) - first
    chosen = np.sort(order[rank < q])
    return BufferSelection(
        indices=chosen.astype(np.int64),
        clusters=labels[chosen],
        distances=dist[chosen],
        labels=labels,
        centroids=centroids,
        k=k,
        q=q,
        inertia=float(np.sum(dist**2)),
        backend=backend,
        ids=[ids[i] for i in chosen] if ids is not None else None,
    )
