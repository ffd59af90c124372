"""Paired model comparison over seeds: values, the Wilcoxon test, and collapse detection."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wilcoxon

from medmodal.evaluation.compare import MEAN_OVER_SUBSETS, collapsed_regions, paired_comparison, paired_markdown
from medmodal.evaluation.subsets import SubsetResult

FULL = "t1+t2"


def _rows(model: str, dice: dict[tuple[str, str, str], float]) -> list[SubsetResult]:
    return [SubsetResult(model=model, case_id=c, subset=s, n_modalities=s.count("+") + 1, region=r, dice=d,
                         hd95=float("nan") if d == 0 else 1.0)
            for (c, s, r), d in dice.items()]


def test_collapsed_regions_flags_a_run_that_finds_nothing():
    # WT: case a has it (missed: 0), case b has none (empty both: 1) -> collapsed; TC: one fractional score.
    rows = _rows("m", {("a", FULL, "WT"): 0.0, ("b", FULL, "WT"): 1.0, ("a", FULL, "TC"): 0.4,
                       ("b", FULL, "TC"): 0.0, ("a", "t1", "TC"): 0.0, ("b", "t1", "TC"): 0.0})
    assert collapsed_regions(rows, subset=FULL) == ["WT"]
    assert collapsed_regions(rows, subset="t1") == ["TC"]
    # every case without the region and predicted empty: perfect, not collapsed
    assert collapsed_regions(_rows("m", {("a", FULL, "ET"): 1.0, ("b", FULL, "ET"): 1.0}), subset=FULL) == []
    with pytest.raises(ValueError, match="no row for subset"):
        collapsed_regions(rows, subset="flair")


def test_paired_comparison_values_and_wilcoxon():
    rng = np.random.default_rng(0)
    a, b = {}, {}
    diffs = []
    for seed in (0, 1, 2):
        da, db = {}, {}
        for case in ("c1", "c2", "c3", "c4"):
            for sub in ("t1", FULL):
                x = float(rng.uniform(0.2, 0.8))
                y = x + float(rng.uniform(0.0, 0.1)) * (1 if sub == FULL else -1)
                da[(case, sub, "WT")], db[(case, sub, "WT")] = x, y
                if sub == FULL:
                    diffs.append(y - x)
        a[seed], b[seed] = _rows("A", da), _rows("B", db)
    rows = paired_comparison(a, b)
    full = next(r for r in rows if r.subset == FULL)
    per_seed_a = [np.mean([d.dice for d in a[s] if d.subset == FULL]) for s in (0, 1, 2)]
    per_seed_b = [np.mean([d.dice for d in b[s] if d.subset == FULL]) for s in (0, 1, 2)]
    assert full.n_seeds == 3 and full.n_pairs == 12
    assert full.a_mean == pytest.approx(np.mean(per_seed_a))
    assert full.a_std == pytest.approx(np.std(per_seed_a, ddof=1))
    assert full.diff_mean == pytest.approx(np.mean(per_seed_b) - np.mean(per_seed_a))
    assert full.b_better_seeds == 3
    assert full.wilcoxon_p == pytest.approx(wilcoxon(np.array(diffs)).pvalue)
    assert full.wilcoxon_p < 0.01  # 12 positive differences out of 12
    t1 = next(r for r in rows if r.subset == "t1")
    assert t1.diff_mean < 0 and t1.b_better_seeds == 0
    # the mean over subsets averages each case over subsets first: the +/- differences partly cancel
    mean = next(r for r in rows if r.subset == MEAN_OVER_SUBSETS)
    assert mean.diff_mean == pytest.approx((full.diff_mean + t1.diff_mean) / 2)
    text = paired_markdown(rows, a="A", b="B")
    full_line = next(line for line in text.splitlines() if line.startswith(f"| {FULL} | WT |"))
    assert "(3/3)" in full_line and "<0.001 (12)" in full_line  # exact p = 2 / 2**12


def test_identical_models_give_p_one_and_zero_difference():
    d = {("a", FULL, "WT"): 0.5, ("b", FULL, "WT"): 0.7}
    rows = paired_comparison({0: _rows("A", d)}, {0: _rows("B", d)})
    assert rows[0].wilcoxon_p == 1.0 and rows[0].diff_mean == 0.0 and rows[0].b_better_seeds == 0


def test_paired_comparison_refuses_unpaired_inputs():
    d = {("a", FULL, "WT"): 0.5}
    with pytest.raises(ValueError, match="same seeds"):
        paired_comparison({0: _rows("A", d)}, {1: _rows("B", d)})
    with pytest.raises(ValueError, match="different cases"):
        paired_comparison({0: _rows("A", d)}, {0: _rows("B", {("z", FULL, "WT"): 0.5})})
