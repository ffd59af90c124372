"""Classification under every modality subset: accuracy per subset, each case encoded once.

For ShaSpec (Wang et al., CVPR 2023) a case's modalities are encoded once and the classifier runs on the fused
features of each subset (``decode_subsets``); other networks get one batched forward with ``K`` masks.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from torch import nn

from medmodal.evaluation.inference import nonempty_subsets, subset_masks
from medmodal.evaluation.subsets import subset_name


@dataclass(frozen=True)
class ClassificationResult:
    """One case under one modality subset."""

    model: str
    case_id: str
    subset: str
    n_modalities: int
    target: int
    prediction: int
    confidence: float


@dataclass(frozen=True)
class ClassificationSummary:
    """Accuracy and balanced accuracy of one (model, subset) (scikit-learn's ``accuracy_score`` and
    ``balanced_accuracy_score``).

    Balanced accuracy is the mean recall over the classes present among the subset's targets: a class that
    only appears among predictions does not count, and with a single target class it is that class's recall.
    """

    model: str
    subset: str
    n_modalities: int
    n_cases: int
    accuracy: float
    balanced_accuracy: float


@torch.no_grad()
def class_logits_subsets(network: nn.Module, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(K, n_classes)`` logits of one whole case ``image (1, M, *S)`` under ``masks (K, M)``."""
    k = masks.shape[0]
    if hasattr(network, "decode_subsets"):
        features = network.encode(image, masks.any(0, keepdim=True))
        return network.decode_subsets(features, masks).class_logits
    return network(image.expand(k, *image.shape[1:]), masks)


def evaluate_classification(
    network: nn.Module,
    cases: Sequence,
    *,
    modalities: Sequence[str],
    subsets: Sequence[Sequence[str]] | None = None,
    model_name: str = "model",
) -> list[ClassificationResult]:
    """Predict each cached case's class under every subset of modalities it has (whole-image input).

    Cases without a ``target`` are skipped.
    """
    subsets = [tuple(s) for s in subsets] if subsets is not None else nonempty_subsets(modalities)
    all_masks = subset_masks(modalities, subsets)
    network.eval()
    rows = []
    for case in cases:
        if case.target is None:
            continue
        have = torch.as_tensor(np.asarray(case.available), dtype=torch.bool)
        ok = [k for k in range(len(subsets)) if bool((all_masks[k] <= have).all())]
        if not ok:
            continue
        image = torch.from_numpy(np.array(case.image(), dtype=np.float32))[None]
        prob = class_logits_subsets(network, image, all_masks[ok]).softmax(dim=1)
        for row, k in enumerate(ok):
            rows.append(ClassificationResult(
                model=model_name, case_id=case.case_id, subset=subset_name(subsets[k]),
                n_modalities=len(subsets[k]), target=int(case.target), prediction=int(prob[row].argmax()),
                confidence=float(prob[row].max()),
            ))
    return rows


def summarise_classification(rows: Sequence[ClassificationResult]) -> list[ClassificationSummary]:
    """One row per (model, subset), in first-seen order."""
    groups: dict[tuple[str, str, int], list[ClassificationResult]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.subset, r.n_modalities)].append(r)
    out = []
    for (model, subset, n), rs in groups.items():
        t = [r.target for r in rs]
        p = [r.prediction for r in rs]
        with warnings.catch_warnings():
            # expected in small subsets: a predicted class no case has (scikit-learn leaves it out of the mean,
            # as intended), or a single class in both targets and predictions
            warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
            warnings.filterwarnings("ignore", "A single label was found", UserWarning)
            balanced = balanced_accuracy_score(t, p)
        out.append(ClassificationSummary(
            model=model, subset=subset, n_modalities=n, n_cases=len(rs),
            accuracy=float(accuracy_score(t, p)), balanced_accuracy=float(balanced),
        ))
    return out


def classification_table(summary: Sequence[ClassificationSummary]) -> str:
    """Markdown: subsets as rows, accuracy and balanced accuracy per model as columns."""
    models = list(dict.fromkeys(s.model for s in summary))
    subsets = list(dict.fromkeys(s.subset for s in summary))
    cell = {(s.model, s.subset): s for s in summary}
    head = ["subset"] + [f"{m} {k}" for m in models for k in ("accuracy", "balanced acc.")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sub in subsets:
        vals = []
        for m in models:
            s = cell.get((m, sub))
            vals += ["–", "–"] if s is None else [f"{s.accuracy:.3f}", f"{s.balanced_accuracy:.3f}"]
        lines.append(f"| {sub} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
