"""Joint classification + segmentation evaluation: scores per case, their summary and a case figure.

The metrics of joint chest X-ray classification and lung segmentation (Haque et al., ISBI 2021, §4 of its spec):
accuracy, F1 per class and ROC AUC for the classifier (scikit-learn); Dice, Jaccard, precision, recall, SSIM,
average Hausdorff distance and HD95 for the lung masks. The paper states neither its "average Hausdorff" definition
nor its units, so the conventions used here are spelled out in :data:`METRIC_DEFINITIONS`, which reports print under
their tables. Arrays follow medmodal's Volume convention: a 2D image is ``(X, Y)``, the transpose of a picture's
``(rows, cols)``; :func:`multitask_figure` shows it with ``.T`` so it looks upright.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from monai.metrics import SSIMMetric
from monai.metrics.utils import get_mask_edges
from scipy.ndimage import distance_transform_edt
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medmodal.evaluation.metrics import binary_dice, region_metrics
from medmodal.evaluation.report import pyplot, save_figure
from medmodal.evaluation.synthesis import SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW

#: One line per metric; ``f1_<class>`` stands for every class name. Print the lines of the columns a table shows
#: (:func:`metric_notes`).
METRIC_DEFINITIONS: dict[str, str] = {
    "accuracy": "accuracy: fraction of cases whose arg-max class equals the true class.",
    "f1_<class>": "f1_<class>: F1 of that class against the rest, predicted class = arg-max (scikit-learn; 0 when "
                  "the class is neither predicted nor true).",
    "f1_macro": "f1_macro: unweighted mean of the per-class F1 over all classes.",
    "roc_auc": "roc_auc: ROC AUC of the predicted probabilities (binary: of class 1; more classes: mean over the "
               "classes present of the one-vs-rest AUC); NaN when only one class is present.",
    "dice": "dice: 2|P∩T| / (|P| + |T|) of the binary masks; both empty 1, one empty 0.",
    "jaccard": "jaccard: |P∩T| / |P∪T|; both empty 1, one empty 0.",
    "precision": "precision: |P∩T| / |P|; both empty 1, one empty 0.",
    "recall": "recall: |P∩T| / |T|; both empty 1, one empty 0.",
    "ssim": f"ssim: SSIM of the two masks as 0/1 float images (MONAI; Gaussian window {SSIM_WINDOW} px, σ "
            f"{SSIM_SIGMA}, K1 {SSIM_K1}, K2 {SSIM_K2}, data range 1; mean over the positions where the window lies "
            "inside the image; 2D or 3D).",
    "avg_hausdorff_mm": "avg_hausdorff_mm: average Hausdorff distance in mm = (mean over boundary pixels of P of "
                        "the distance to the nearest boundary pixel of T + the same from T to P) / 2; boundary = "
                        "mask minus its erosion by the face-connected cross; both empty 0, one empty NaN.",
    "hd95_mm": "hd95_mm: 95th-percentile Hausdorff distance in mm between the two boundaries (MONAI: the larger of "
               "the two directed 95th percentiles); both empty 0, one empty NaN.",
}

SEGMENTATION_KEYS = ("dice", "jaccard", "precision", "recall", "ssim", "avg_hausdorff_mm", "hd95_mm")

BOUNDARY_COLOURS = {"predicted": "#ff3fd0", "true": "#35e0ff"}  # magenta dashed, cyan solid on grey


# --------------------------------------------------------------------------------------------------- classification


def classification_scores(
    truth: Sequence[int] | np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """Accuracy, F1 per class, macro F1, ROC AUC and counts of a classifier (scikit-learn).

    Args:
        truth: ``(N,)`` true class indices into ``class_names``.
        probabilities: ``(N, K)`` predicted class probabilities (softmax); the predicted class is the arg-max.
        class_names: the ``K`` class names.

    Returns:
        ``{"n": N, "n_<class>": true count of each class, "accuracy", "f1_<class>" for each class, "f1_macro",
        "roc_auc"}`` (definitions in :data:`METRIC_DEFINITIONS`). ``roc_auc`` is NaN when fewer than two classes
        occur in ``truth``.
    """
    y = np.asarray(truth)
    prob = np.asarray(probabilities, dtype=np.float64)
    k = len(class_names)
    if prob.ndim != 2 or prob.shape[1] != k or y.shape != (prob.shape[0],) or prob.shape[0] == 0:
        raise ValueError(
            f"classification_scores: truth {y.shape} and probabilities {prob.shape} must be (N,) and (N, K) with "
            f"N > 0 and K = {k} class names"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise ValueError(f"classification_scores: truth must hold class indices in 0..{k - 1}")
    labels = list(range(k))
    pred = prob.argmax(axis=1)
    f1 = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    out: dict[str, float] = {"n": int(y.size)}
    out.update({f"n_{name}": int((y == c).sum()) for c, name in enumerate(class_names)})
    out["accuracy"] = float(accuracy_score(y, pred))
    out.update({f"f1_{name}": float(f1[c]) for c, name in enumerate(class_names)})
    out["f1_macro"] = float(np.mean(f1))
    present = [c for c in labels if (y == c).any()]
    if len(present) < 2:
        out["roc_auc"] = float("nan")
    elif k == 2:
        out["roc_auc"] = float(roc_auc_score(y, prob[:, 1]))
    else:  # one-vs-rest per class present, macro mean (= scikit-learn's multi_class="ovr" when all are present)
        out["roc_auc"] = float(np.mean([roc_auc_score(y == c, prob[:, c]) for c in present]))
    return out


# --------------------------------------------------------------------------------------------------- segmentation


def _check_masks(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    for name, m in (("pred", pred), ("truth", truth)):
        if not isinstance(m, np.ndarray) or m.dtype != bool or m.ndim not in (2, 3):
            raise ValueError(f"segmentation_scores: {name} must be a bool numpy array of 2 or 3 dimensions")
    if pred.shape != truth.shape:
        raise ValueError(f"segmentation_scores: pred {pred.shape} and truth {truth.shape} differ in shape")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != pred.ndim or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"segmentation_scores: spacing {spacing} must give {pred.ndim} positive sizes in mm")
    if min(pred.shape) < SSIM_WINDOW:
        raise ValueError(f"segmentation_scores: masks of {pred.shape} are smaller than the {SSIM_WINDOW}-pixel "
                         "SSIM window")
    return sp


def boundary(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a bool ``mask``: the mask minus its binary erosion by the face-connected cross
    (MONAI's :func:`~monai.metrics.utils.get_mask_edges`; pixels on the image border count as boundary)."""
    edges, _ = get_mask_edges(mask, mask, crop=False)
    return np.asarray(edges, dtype=bool)


def directed_average_distance(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Mean over the boundary pixels of mask ``a`` of the Euclidean distance (mm) to the nearest boundary pixel
    of mask ``b`` (scipy's exact distance transform with ``sampling=spacing``); NaN if either is empty."""
    ea, eb = boundary(a), boundary(b)
    if not ea.any() or not eb.any():
        return float("nan")
    return float(distance_transform_edt(~eb, sampling=spacing)[ea].mean())


def average_hausdorff(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Average Hausdorff distance (mm): the mean of the two directed average boundary distances.

    ``(d(P→T) + d(T→P)) / 2`` with :func:`directed_average_distance`. This is **not** MONAI's
    ``compute_average_surface_distance(symmetric=True)``, which averages the pooled distances of both
    directions and so weights each direction by its number of boundary pixels; the two agree only when both
    boundaries have as many pixels.
    """
    return 0.5 * (directed_average_distance(pred, truth, spacing) + directed_average_distance(truth, pred, spacing))


def _ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    metric = SSIMMetric(spatial_dims=pred.ndim, data_range=1.0, win_size=SSIM_WINDOW, kernel_sigma=SSIM_SIGMA,
                        k1=SSIM_K1, k2=SSIM_K2)
    as_image = [torch.from_numpy(m.astype(np.float64))[None, None] for m in (pred, truth)]
    return float(metric(*as_image).item())


def segmentation_scores(pred: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, Jaccard, precision, recall, SSIM, average Hausdorff distance and HD95 of one predicted mask.

    Args:
        pred: predicted bool mask ``(X, Y)`` or ``(X, Y, Z)``, at least 11 pixels along every axis (SSIM window).
        truth: true bool mask of the same shape.
        spacing: pixel size in mm per axis.

    Returns:
        ``{"dice", "jaccard", "precision", "recall", "ssim", "avg_hausdorff_mm", "hd95_mm"}``
        (:data:`SEGMENTATION_KEYS`; definitions and empty-mask conventions in :data:`METRIC_DEFINITIONS`: both
        masks empty → overlaps 1 and distances 0; exactly one empty → overlaps 0 and distances NaN, which
        :func:`summarise` counts).
    """
    sp = _check_masks(pred, truth, spacing)
    p_any, t_any = bool(pred.any()), bool(truth.any())
    if p_any and t_any:
        tp = int(np.count_nonzero(pred & truth))  # exact integer counts (MONAI's confusion matrix is float32)
        n_pred, n_true = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
        overlap = {"jaccard": tp / (n_pred + n_true - tp), "precision": tp / n_pred, "recall": tp / n_true}
        avg_hd = average_hausdorff(pred, truth, sp)
    else:
        both_empty = not p_any and not t_any
        overlap = dict.fromkeys(("jaccard", "precision", "recall"), 1.0 if both_empty else 0.0)
        avg_hd = 0.0 if both_empty else float("nan")
    # HD95 with the same empty-mask conventions (both empty 0, one empty NaN)
    _, hd95 = region_metrics(torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None], spacing=sp)
    return {
        "dice": binary_dice(pred, truth),
        **overlap,
        "ssim": _ssim(pred, truth),
        "avg_hausdorff_mm": avg_hd,
        "hd95_mm": float(hd95[0, 0]),
    }


# --------------------------------------------------------------------------------------------------- summary


class MetricSummary(NamedTuple):
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) over the ``n`` non-NaN values, and the
    number ``n_nan`` of NaN values left out (e.g. distances undefined because one mask was empty)."""

    mean: float
    std: float
    n: int
    n_nan: int


def summarise(rows: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, MetricSummary]:
    """:class:`MetricSummary` of each of ``keys`` over the per-case ``rows`` (NaN ignored and counted).

    A key with no non-NaN value gets mean and std NaN and ``n = 0``.

    Raises:
        ValueError: if a row lacks one of ``keys``.
    """
    out: dict[str, MetricSummary] = {}
    for key in keys:
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise ValueError(f"summarise: row {missing[0]} has no {key!r}")
        values = np.array([float(r[key]) for r in rows], dtype=np.float64)
        nan = np.isnan(values)
        kept = values[~nan]
        n = int(kept.size)
        out[key] = MetricSummary(
            mean=float(kept.mean()) if n else float("nan"),
            std=float(kept.std(ddof=1)) if n > 1 else (0.0 if n == 1 else float("nan")),
            n=n, n_nan=int(nan.sum()),
        )
    return out


def metric_notes(keys: Sequence[str]) -> str:
    """The :data:`METRIC_DEFINITIONS` lines of the metrics named in ``keys`` (``f1_<class>`` once for all per-class
    F1 columns; ``n`` and ``n_<class>`` counts have none), one per line in first-seen order."""
    lines: list[str] = []
    for key in keys:
        name = key if key in METRIC_DEFINITIONS or not key.startswith("f1_") else "f1_<class>"
        line = METRIC_DEFINITIONS.get(name)
        if line is not None and line not in lines:
            lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- figure


@dataclass(frozen=True, kw_only=True)
class MultitaskPanel:
    """One case of :func:`multitask_figure`. Every array is 2D ``(X, Y)`` (medmodal's convention).

    Attributes:
        image: the input image, any intensity range.
        group: the figure row this case goes in (e.g. ``"in-source"``, ``"cross-source"``).
        title: a short case label shown above the class line (e.g. the case id).
        saliency: the saliency map (``>= 0``), drawn as a coloured overlay in the panel's second column.
        pred_mask, true_mask: bool lung masks; their boundaries are drawn (predicted dashed, true solid).
        pred_class, probability, true_class: the predicted class with its probability and the true class.
    """

    image: np.ndarray
    group: str
    title: str = ""
    saliency: np.ndarray | None = None
    pred_mask: np.ndarray | None = None
    true_mask: np.ndarray | None = None
    pred_class: str | None = None
    probability: float | None = None
    true_class: str | None = None

    def __post_init__(self) -> None:
        if np.ndim(self.image) != 2:
            raise ValueError(f"MultitaskPanel {self.title!r}: image must be 2D (X, Y), got {np.shape(self.image)}")
        for name in ("saliency", "pred_mask", "true_mask"):
            a = getattr(self, name)
            if a is not None and np.shape(a) != np.shape(self.image):
                raise ValueError(f"MultitaskPanel {self.title!r}: {name} {np.shape(a)} differs from image "
                                 f"{np.shape(self.image)}")


def _class_line(p: MultitaskPanel) -> str:
    parts = []
    if p.pred_class is not None:
        parts.append(f"pred {p.pred_class}" + (f" {p.probability:.2f}" if p.probability is not None else ""))
    if p.true_class is not None:
        parts.append(f"true {p.true_class}")
    return " · ".join(parts)


def _draw_boundary(ax, mask: np.ndarray | None, *, colour: str, style: str) -> None:
    if mask is None:
        return
    m = np.asarray(mask, dtype=bool)
    if m.any() and not m.all():  # a constant mask has no 0.5 level (and matplotlib would warn)
        ax.contour(m.T.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2, linestyles=style)


def _render(panels: Sequence[MultitaskPanel], *, title: str):
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not panels:
        raise ValueError("multitask_figure: no panel to draw")
    groups: dict[str, list[MultitaskPanel]] = {}
    for p in panels:
        groups.setdefault(p.group, []).append(p)
    per_case = 2 if any(p.saliency is not None for p in panels) else 1
    n_cols = per_case * max(len(g) for g in groups.values())
    fig, axes = plt.subplots(len(groups), n_cols, figsize=(1.9 * n_cols + 0.4, 2.2 * len(groups) + 0.9),
                             squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, (group, cases) in enumerate(groups.items()):
        for i, p in enumerate(cases):
            ax = axes[row, per_case * i]
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(np.asarray(p.image, dtype=np.float32).T, cmap="gray", origin="upper", interpolation="nearest")
            _draw_boundary(ax, p.true_mask, colour=BOUNDARY_COLOURS["true"], style="solid")
            _draw_boundary(ax, p.pred_mask, colour=BOUNDARY_COLOURS["predicted"], style="dashed")
            correct = p.pred_class is not None and p.pred_class == p.true_class
            wrong = p.pred_class is not None and p.true_class is not None and not correct
            ax.set_title("\n".join(s for s in (p.title, _class_line(p)) if s), fontsize=7,
                         color="#b00020" if wrong else "black")
            if i == 0:
                ax.set_ylabel(group, fontsize=9)
            if per_case == 2 and p.saliency is not None:
                sal = np.asarray(p.saliency, dtype=np.float32).T
                top = float(np.percentile(sal, 99.5)) if sal.size else 0.0
                ax2 = axes[row, per_case * i + 1]
                ax2.set_axis_on()
                ax2.set_xticks([])
                ax2.set_yticks([])
                ax2.imshow(np.asarray(p.image, dtype=np.float32).T, cmap="gray", origin="upper",
                           interpolation="nearest")
                level = np.clip(sal / top, 0, 1) if top > 0 else np.zeros_like(sal)
                # opacity grows with the saliency, so the anatomy stays visible where it is low
                ax2.imshow(level, cmap="inferno", alpha=0.85 * level, vmin=0, vmax=1, origin="upper",
                           interpolation="nearest")
                ax2.set_title("saliency", fontsize=7)
    handles = [Line2D([], [], color=BOUNDARY_COLOURS["true"], lw=1.2, ls="solid", label="true lung"),
               Line2D([], [], color=BOUNDARY_COLOURS["predicted"], lw=1.2, ls="dashed", label="predicted lung")]
    if per_case == 2:
        handles.append(Patch(color=plt.get_cmap("inferno")(0.8), label="saliency (1 = its 99.5th percentile)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), n_cols), fontsize=7,
               frameon=False)
    fig.suptitle(title, fontsize=9)
    return fig


def multitask_figure(panels: Sequence[MultitaskPanel], path: Path, *, title: str) -> Path:
    """Draw cases with their lung boundaries, saliency and classes, one row per group; save as PNG.

    Per case: the image (shown as ``image.T``, origin upper, so an ``(X, Y)`` array looks upright) with the true
    lung boundary (cyan, solid) and the predicted one (magenta, dashed) drawn as 0.5-level contours, titled with
    the case label and "pred <class> <probability> · true <class>" (red when they differ); and, when the case has
    a saliency map, a second column with the saliency as an ``inferno`` overlay on the image. Rows are the
    ``group`` values in first-seen order. Written atomically (:func:`medmodal.evaluation.report.save_figure`).
    """
    return save_figure(_render(panels, title=title), Path(path))
