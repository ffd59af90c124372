"""summarise_classification: accuracy and balanced accuracy (scikit-learn) per (model, subset)."""

from __future__ import annotations

import warnings

import pytest

from medmodal.evaluation.classification import ClassificationResult, classification_table, summarise_classification


def _rows(subset: str, pairs: list[tuple[int, int]], model: str = "m") -> list[ClassificationResult]:
    n = subset.count("+") + 1
    return [ClassificationResult(model, f"c{i}", subset, n, t, p, 0.9) for i, (t, p) in enumerate(pairs)]


def test_accuracy_and_balanced_accuracy_by_hand() -> None:
    # targets 0,0,0,1: class 0 recall 2/3, class 1 recall 1/1 -> balanced (2/3 + 1) / 2 = 5/6; accuracy 3/4
    rows = _rows("t1", [(0, 0), (0, 0), (0, 1), (1, 1)])
    # three classes, 2 absent from the predictions: recalls 1, 1/2, 0 -> 0.5; accuracy 2/4
    rows += _rows("t1+flair", [(0, 0), (1, 1), (1, 0), (2, 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # expected scikit-learn warnings are silenced, nothing else is raised
        summary = summarise_classification(rows)
    assert [(s.subset, s.n_modalities, s.n_cases) for s in summary] == [("t1", 1, 4), ("t1+flair", 2, 4)]
    assert summary[0].accuracy == pytest.approx(0.75) and summary[0].balanced_accuracy == pytest.approx(5 / 6)
    assert summary[1].accuracy == pytest.approx(0.5) and summary[1].balanced_accuracy == pytest.approx(0.5)
    assert "| t1 | 0.750 | 0.833 |" in classification_table(summary)


def test_one_class_subsets_do_not_crash() -> None:
    # only class 1 among the targets; a predicted class 0 has no cases and is left out of the mean recall
    rows = _rows("t2", [(1, 1), (1, 0), (1, 1)])
    rows += _rows("flair", [(2, 2), (2, 2)])  # one class in targets and predictions
    rows += _rows("t1", [(0, 1), (0, 1)])  # every prediction wrong
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t2, flair, t1 = summarise_classification(rows)
    assert t2.accuracy == pytest.approx(2 / 3) and t2.balanced_accuracy == pytest.approx(2 / 3)
    assert flair.accuracy == 1.0 and flair.balanced_accuracy == 1.0
    assert t1.accuracy == 0.0 and t1.balanced_accuracy == 0.0
