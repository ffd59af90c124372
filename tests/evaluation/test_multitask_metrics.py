"""Joint classification + segmentation metrics and the case figure (medmodal.evaluation.multitask), on hand-made
masks and a hand-made confusion matrix whose values are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance
from PIL import Image
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

from medmodal.evaluation.multitask import (
    METRIC_DEFINITIONS,
    SEGMENTATION_KEYS,
    MultitaskPanel,
    _render,
    average_hausdorff,
    boundary,
    classification_scores,
    metric_notes,
    multitask_figure,
    segmentation_scores,
    summarise,
)

SQRT2 = math.sqrt(2.0)


def _offset_squares(shape: tuple[int, ...] = (17, 18)) -> tuple[np.ndarray, np.ndarray]:
    """Two 4×4 squares, the second shifted by 2 px along axis 0: overlap 4×2 = 8 of 16 px each."""
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2:6, 2:6] = True
    b[4:8, 2:6] = True
    return a, b


def _nested() -> tuple[np.ndarray, np.ndarray]:
    """A 5×5 prediction around a 3×3 truth: boundaries of 16 and 8 px."""
    pred, truth = np.zeros((17, 18), bool), np.zeros((17, 18), bool)
    pred[2:7, 2:7] = True
    truth[3:6, 3:6] = True
    return pred, truth


def _brute_force_average_hausdorff(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Independent check: all pairwise boundary distances (cdist), no distance transform."""
    pa = np.argwhere(boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(boundary(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return 0.5 * (d.min(axis=1).mean() + d.min(axis=0).mean())


# --- segmentation -----------------------------------------------------------------------------------------------

def test_offset_squares_by_hand() -> None:
    a, b = _offset_squares()
    s = segmentation_scores(a, b, spacing=(1.0, 1.0))
    assert tuple(s) == SEGMENTATION_KEYS
    assert s["dice"] == 0.5  # 2·8 / (16 + 16)
    assert s["jaccard"] == pytest.approx(1 / 3)  # 8 / 24
    assert s["precision"] == 0.5 and s["recall"] == 0.5
    # boundary of a 4×4 square = 12 px; from A's boundary to B's: rows y=2 and y=5 give 2,1,0,0 each, the
    # column x=2 gives 2,2 and x=5 gives 1,1 → 12 / 12 = 1; B to A is the mirror image → average 1 px
    assert s["avg_hausdorff_mm"] == pytest.approx(1.0)
    # sorted directed distances 0,0,0,0,1,1,1,1,2,2,2,2 → 95th percentile 2 (both directions)
    assert s["hd95_mm"] == pytest.approx(2.0)
    # every nearest boundary point lies along axis 0, so a 0.5 mm spacing there halves both distances
    s2 = segmentation_scores(a, b, spacing=(0.5, 1.0))
    assert s2["avg_hausdorff_mm"] == pytest.approx(0.5)
    assert s2["hd95_mm"] == pytest.approx(1.0)
    assert s2["dice"] == s["dice"]


def test_nested_squares_by_hand_and_not_monai_pooled_assd() -> None:
    pred, truth = _nested()
    s = segmentation_scores(pred, truth, spacing=(1.0, 1.0))
    assert s["dice"] == pytest.approx(9 / 17)  # 2·9 / (25 + 9)
    assert s["jaccard"] == pytest.approx(9 / 25)
    assert s["precision"] == pytest.approx(9 / 25) and s["recall"] == 1.0
    # truth → pred: each of 8 boundary px is 1 away; pred → truth: 12 edge px at 1, 4 corners at √2
    p_to_t = (12 + 4 * SQRT2) / 16
    assert s["avg_hausdorff_mm"] == pytest.approx((1.0 + p_to_t) / 2)
    assert s["hd95_mm"] == pytest.approx(SQRT2, rel=1e-6)
    # MONAI's symmetric ASSD pools the 24 distances (weights the longer boundary more): a different number
    monai = compute_average_surface_distance(torch.from_numpy(pred)[None, None].float(),
                                             torch.from_numpy(truth)[None, None].float(),
                                             include_background=True, symmetric=True).item()
    assert monai == pytest.approx((8 + 12 + 4 * SQRT2) / 24, rel=1e-6)
    assert abs(monai - s["avg_hausdorff_mm"]) > 0.015


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)])
def test_3d_matches_brute_force_distances(spacing: tuple[float, ...]) -> None:
    a, b = _offset_squares((17, 18, 19))
    a[:, :, :] = False
    b[:, :, :] = False
    a[2:6, 2:6, 3:7] = True
    b[4:8, 3:7, 3:8] = True
    s = segmentation_scores(a, b, spacing=spacing)
    tp = 2 * 3 * 4
    assert s["dice"] == pytest.approx(2 * tp / (64 + 80))
    assert s["jaccard"] == pytest.approx(tp / (64 + 80 - tp))
    assert s["precision"] == pytest.approx(tp / 64) and s["recall"] == pytest.approx(tp / 80)
    assert s["avg_hausdorff_mm"] == pytest.approx(_brute_force_average_hausdorff(a, b, spacing))
    assert average_hausdorff(b, a, spacing) == pytest.approx(s["avg_hausdorff_mm"])  # symmetric
    assert 0 < s["ssim"] < 1


def test_boundary_is_mask_minus_erosion() -> None:
    a, _ = _offset_squares()
    edge = boundary(a)
    assert edge.sum() == 12 and not edge[3:5, 3:5].any() and edge[a].sum() == 12 and not edge[~a].any()
    full = np.ones((12, 13), bool)  # pixels on the image border are boundary
    assert boundary(full).sum() == 2 * 12 + 2 * 13 - 4


@pytest.mark.parametrize("shape", [(17, 18), (13, 12, 11)])
def test_identical_masks_score_perfectly_and_ssim_is_one(shape: tuple[int, ...]) -> None:
    m = np.zeros(shape, bool)
    m[3:9, 2:10] = True
    s = segmentation_scores(m, m.copy(), spacing=(1.0,) * len(shape))
    assert s["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert s["dice"] == s["jaccard"] == s["precision"] == s["recall"] == 1.0
    assert s["avg_hausdorff_mm"] == 0.0 and s["hd95_mm"] == 0.0
    other = m.copy()
    other[3:5] = False
    assert segmentation_scores(other, m, spacing=(1.0,) * len(shape))["ssim"] < 0.99


def test_empty_mask_conventions() -> None:
    a, _ = _offset_squares()
    empty = np.zeros_like(a)
    both = segmentation_scores(empty, empty.copy(), spacing=(1.0, 1.0))
    assert both == {"dice": 1.0, "jaccard": 1.0, "precision": 1.0, "recall": 1.0, "ssim": 1.0,
                    "avg_hausdorff_mm": 0.0, "hd95_mm": 0.0}
    for pred, truth in ((empty, a), (a, empty)):
        s = segmentation_scores(pred, truth, spacing=(1.0, 1.0))
        assert s["dice"] == s["jaccard"] == s["precision"] == s["recall"] == 0.0
        assert math.isnan(s["avg_hausdorff_mm"]) and math.isnan(s["hd95_mm"])
        assert 0 < s["ssim"] < 1


def test_segmentation_scores_rejects_bad_input() -> None:
    a, b = _offset_squares()
    with pytest.raises(ValueError, match="bool numpy array"):
        segmentation_scores(a.astype(np.uint8), b, spacing=(1, 1))
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_scores(a, b[:, :-1], spacing=(1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_scores(a, b, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_scores(a, b, spacing=(1, 0))
    with pytest.raises(ValueError, match="SSIM window"):
        segmentation_scores(a[:10], b[:10], spacing=(1, 1))


# --- classification ---------------------------------------------------------------------------------------------

def test_binary_classification_scores_by_hand() -> None:
    # 4 normal (class 0), 6 opacity (class 1); p(opacity):
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.8, 0.4, 0.45, 0.6, 0.7, 0.9, 0.95])
    s = classification_scores(truth, np.stack([1 - p1, p1], axis=1), ("normal", "opacity"))
    # confusion: normal 3 right, 1 → opacity; opacity 4 right, 2 → normal
    assert s["n"] == 10 and s["n_normal"] == 4 and s["n_opacity"] == 6
    assert s["accuracy"] == pytest.approx(0.7)
    assert s["f1_normal"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # tp 3, fp 2, fn 1
    assert s["f1_opacity"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))  # tp 4, fp 1, fn 2
    assert s["f1_macro"] == pytest.approx((2 / 3 + 8 / 11) / 2)
    # of the 24 (opacity, normal) pairs only (0.4, 0.8), (0.45, 0.8), (0.6, 0.8), (0.7, 0.8) are misordered
    assert s["roc_auc"] == pytest.approx(20 / 24)


def test_multiclass_auc_is_one_vs_rest_macro_and_nan_for_one_class() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0, 2])
    prob = rng.dirichlet(np.ones(3), size=truth.size)
    names = ("a", "b", "c")
    s = classification_scores(truth, prob, names)
    assert s["roc_auc"] == pytest.approx(roc_auc_score(truth, prob, multi_class="ovr", average="macro"))
    two = truth[truth != 2]
    s2 = classification_scores(two, prob[truth != 2], names)
    expected = np.mean([roc_auc_score(two == c, prob[truth != 2][:, c]) for c in (0, 1)])
    assert s2["roc_auc"] == pytest.approx(expected)
    assert s2["f1_c"] == 0.0 or s2["f1_c"] == pytest.approx(0.0)  # never true: F1 0 (zero_division)
    one = classification_scores(np.zeros(4, int), prob[:4], names)
    assert math.isnan(one["roc_auc"]) and one["n_a"] == 4


def test_classification_scores_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        classification_scores([0, 1], np.full((2, 3), 1 / 3), ("a", "b"))
    with pytest.raises(ValueError, match="class indices"):
        classification_scores([0, 2], np.full((2, 2), 0.5), ("a", "b"))


# --- summary and definitions ------------------------------------------------------------------------------------

def test_summarise_ignores_and_counts_nan() -> None:
    nan = float("nan")
    rows = [{"dice": 1.0, "hd": nan, "x": nan}, {"dice": 3.0, "hd": 2.0, "x": nan}, {"dice": nan, "hd": 4.0, "x": nan}]
    s = summarise(rows, ["dice", "hd", "x"])
    assert s["dice"].mean == 2.0 and s["dice"].std == pytest.approx(SQRT2) and s["dice"].n == 2
    assert s["dice"].n_nan == 1
    assert s["hd"] == (3.0, pytest.approx(SQRT2), 2, 1)
    assert math.isnan(s["x"].mean) and math.isnan(s["x"].std) and s["x"].n == 0 and s["x"].n_nan == 3
    assert summarise(rows[:1], ["dice"])["dice"] == (1.0, 0.0, 1, 0)
    with pytest.raises(ValueError, match="row 1 has no 'jaccard'"):
        summarise([{"jaccard": 1.0}, {"dice": 1.0}], ["jaccard"])


def test_every_score_has_a_definition_line() -> None:
    keys = [*SEGMENTATION_KEYS, "accuracy", "f1_normal", "f1_opacity", "f1_macro", "roc_auc", "n", "n_normal"]
    notes = metric_notes(keys).splitlines()
    assert len(notes) == len(SEGMENTATION_KEYS) + 4  # f1_<class> once, counts have none
    assert all("\n" not in line for line in METRIC_DEFINITIONS.values())
    assert any(line.startswith("avg_hausdorff_mm:") and "/ 2" in line for line in notes)


# --- figure -----------------------------------------------------------------------------------------------------

def _panels(shift: int) -> list[MultitaskPanel]:
    x, y = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")  # (X, Y) = (40, 30)
    image = (x / 40.0).astype(np.float32)  # brightens to the right
    truth = ((x - 20) / 12.0) ** 2 + ((y - 15) / 9.0) ** 2 <= 1
    pred = ((x - 20 - shift) / 12.0) ** 2 + ((y - 15) / 9.0) ** 2 <= 1
    saliency = np.exp(-((x - 25) ** 2 + (y - 10) ** 2) / 20.0)
    return [
        MultitaskPanel(image=image, group="in-source", title="case-1", saliency=saliency, pred_mask=pred,
                       true_mask=truth, pred_class="opacity", probability=0.93, true_class="opacity"),
        MultitaskPanel(image=image, group="in-source", title="case-2", pred_mask=pred, true_mask=truth,
                       pred_class="normal", probability=0.61, true_class="opacity"),
        MultitaskPanel(image=image.copy(), group="cross-source", title="case-3", saliency=saliency,
                       pred_mask=np.zeros_like(pred), true_mask=truth, pred_class="normal", probability=0.55,
                       true_class="normal"),
    ]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_figure_pixels_change_with_the_boundaries(tmp_path) -> None:
    same1 = multitask_figure(_panels(0), tmp_path / "a.png", title="t")
    same2 = multitask_figure(_panels(0), tmp_path / "b.png", title="t")
    moved = multitask_figure(_panels(6), tmp_path / "c.png", title="t")
    a, b, c = _pixels(same1), _pixels(same2), _pixels(moved)
    assert np.array_equal(a, b)  # deterministic, so the difference below is the boundaries'
    assert a.shape == c.shape
    changed = np.abs(a - c).sum(axis=2) > 30
    assert changed.sum() > 50
    assert not list(tmp_path.glob("*.tmp*"))


def test_figure_layout_is_upright_and_grouped() -> None:
    fig = _render(_panels(0), title="t")
    try:
        axes = np.array(fig.axes[: 2 * 2 * 2]).reshape(2, 4)  # 2 groups × (2 cases × 2 columns)
        shown = axes[0, 0].images[0].get_array()
        assert shown.shape == (30, 40)  # (Y, X): X runs left to right
        assert np.array_equal(np.asarray(shown), _panels(0)[0].image.T)
        assert axes[0, 0].yaxis_inverted()  # origin upper: y = 0 at the top
        assert axes[0, 0].get_ylabel() == "in-source" and axes[1, 0].get_ylabel() == "cross-source"
        assert "pred opacity 0.93" in axes[0, 0].get_title() and "true opacity" in axes[0, 0].get_title()
        assert axes[0, 1].get_title() == "saliency" and len(axes[0, 1].images) == 2
        assert len(axes[0, 0].collections) == 2  # true and predicted boundary contours
        assert len(axes[1, 0].collections) == 1  # an empty prediction draws no contour
        assert not axes[1, 2].axison  # the cross-source row has one case
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_panel_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="pred_mask"):
        MultitaskPanel(image=np.zeros((5, 6)), group="g", pred_mask=np.zeros((6, 5), bool))
    with pytest.raises(ValueError, match="2D"):
        MultitaskPanel(image=np.zeros((5, 6, 7)), group="g")
    with pytest.raises(ValueError, match="no panel"):
        _render([], title="t")
