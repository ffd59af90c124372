"""The feature picture of ShaSpec (Wang et al., CVPR 2023, t-SNE figure): shared features of different
modalities should mix, specific features should separate by modality.

Features are globally pooled bottleneck features of windows of the evaluation cases, one vector per
(window, modality) for the shared and for the specific encoder. Besides the 2D t-SNE embedding
(scikit-learn), the silhouette score of the modality labels puts a number on "mix" (near 0 or below) and
"separate" (near 1), computed in the feature space itself, not in the embedding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medmodal.atomic import atomic_write_text
from medmodal.evaluation.report import pyplot, save_figure

log = logging.getLogger("medmodal")


@dataclass(frozen=True)
class FeatureSet:
    """Pooled bottleneck features: ``shared``/``specific`` ``(N, C)``, ``modality`` ``(N,)`` indices, ``case_id``."""

    shared: np.ndarray
    specific: np.ndarray
    modality: np.ndarray
    case_id: list[str]
    modalities: tuple[str, ...]


def _window_starts(size: Sequence[int], roi: Sequence[int], per_case: int) -> list[tuple[int, ...]]:
    """Up to ``per_case`` window corners spread evenly over a case (one centred window if it is smaller)."""
    axes = []
    n_axis = max(1, round(per_case ** (1 / len(size))))
    for s, r in zip(size, roi, strict=True):
        axes.append(sorted({int(v) for v in np.linspace(0, max(0, s - r), n_axis)}))
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(size))
    return [tuple(int(v) for v in g) for g in grid[:per_case]]


@torch.no_grad()
def collect_features(
    network: nn.Module,
    cases: Sequence,
    *,
    modalities: Sequence[str],
    roi_size: Sequence[int],
    windows_per_case: int = 8,
) -> FeatureSet:
    """Encode windows of each cached case with all its modalities and pool the bottleneck features.

    Args:
        network: a ShaSpec network (``encode(image (B, M, *S), available (B, M))`` returning ``shared`` levels
            ``(B, M, C, *s)`` and ``specific (B, M, C, *s)``).
        cases: cached cases (``image()`` ``(M, *S)``, ``available``).
        roi_size: window size (the training patch size).
        windows_per_case: windows per case (evenly spread).
    """
    if not hasattr(network, "encode"):
        raise ValueError(f"the feature picture needs a ShaSpec network; {type(network).__name__} has no encode()")
    network.eval()
    shared, specific, mod, ids = [], [], [], []
    for case in cases:
        image = torch.from_numpy(np.array(case.image(), dtype=np.float32))
        have = torch.as_tensor(np.asarray(case.available), dtype=torch.bool)
        crops = []
        for start in _window_starts(image.shape[1:], roi_size, windows_per_case):
            sl = tuple(slice(a, a + r) for a, r in zip(start, roi_size, strict=True))
            crops.append(image[(slice(None), *sl)])
        batch = torch.stack(crops)
        feats = network.encode(batch, have.expand(len(crops), -1))
        dims = tuple(range(3, feats.specific.ndim))
        r = feats.shared[-1].mean(dim=dims)  # (n, M, C)
        s = feats.specific.mean(dim=dims)
        for m in torch.nonzero(have).flatten().tolist():
            shared.append(r[:, m].numpy())
            specific.append(s[:, m].numpy())
            mod += [m] * len(crops)
            ids += [case.case_id] * len(crops)
    if not shared:
        raise ValueError("no case to take features from")
    return FeatureSet(np.concatenate(shared), np.concatenate(specific), np.asarray(mod), ids, tuple(modalities))


def silhouette_by_modality(features: np.ndarray, modality: np.ndarray) -> float:
    """Silhouette score of the modality labels in (standardised) feature space: ~1 separated, <= 0 mixed."""
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(modality)) < 2:
        return float("nan")
    return float(silhouette_score(StandardScaler().fit_transform(features), modality))


def embed_tsne(features: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2D t-SNE embedding ``(N, 2)`` of standardised ``features (N, C)`` (scikit-learn)."""
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(StandardScaler().fit_transform(features))


def plot_feature_picture(fs: FeatureSet, path: Path, *, title: str, seed: int = 0) -> dict[str, float]:
    """Two t-SNE panels (shared, specific) coloured by modality; returns the silhouette scores."""
    plt = pyplot()
    scores = {
        "shared": silhouette_by_modality(fs.shared, fs.modality),
        "specific": silhouette_by_modality(fs.specific, fs.modality),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, name, feats in zip(axes, ("shared", "specific"), (fs.shared, fs.specific), strict=True):
        emb = embed_tsne(feats, seed=seed)
        for m, mod in enumerate(fs.modalities):
            sel = fs.modality == m
            if sel.any():
                ax.scatter(emb[sel, 0], emb[sel, 1], s=9, alpha=0.75, label=mod)
        ax.set_title(f"{name} features (silhouette by modality {scores[name]:.2f})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(title="modality", fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    return scores


def write_feature_picture(network: nn.Module, cases: Sequence, out_dir: Path, *, modalities: Sequence[str],
                          roi_size: Sequence[int], title: str) -> dict[str, float]:
    """``features.png`` (t-SNE of shared and specific features by modality) and ``features.json`` (silhouettes)."""
    if not hasattr(network, "encode"):
        raise ValueError(f"the feature picture needs a ShaSpec network; got {type(network).__name__}")
    fs = collect_features(network, cases, modalities=modalities, roi_size=roi_size)
    scores = plot_feature_picture(fs, out_dir / "features.png", title=title)
    doc = {"silhouette_by_modality": scores, "n_points": int(len(fs.modality)), "cases": len(set(fs.case_id)),
           "note": "pooled bottleneck features of windows; silhouette near 1 = separated by modality, <= 0 = mixed"}
    atomic_write_text(out_dir / "features.json", json.dumps(doc, indent=2))
    log.info("feature picture: silhouette by modality shared %.3f, specific %.3f", scores["shared"],
             scores["specific"])
    return scores
