"""Paired comparison of two models evaluated on the same held-out cases over several seeds.

Each seed trains both models on the same split, so every (seed, held-out case) gives one **pair** of Dice
scores per modality subset and region. The comparison reports, per subset and region:

* the mean ± std **over seeds** of each model's mean Dice over that seed's held-out cases;
* the paired difference (B − A) per seed, its mean ± std and in how many seeds B was ahead;
* a two-sided **Wilcoxon signed-rank test** over the (seed, case) pairs (:func:`scipy.stats.wilcoxon`;
  pairs with a zero difference are dropped, the test's default ``zero_method="wilcox"``).

The pairs are not independent across subsets or regions (one model, one case), and 15 subsets × 3 regions
are many tests: read the p-values as a screen, not as 45 confirmatory results.

A run that never finds a region (:func:`collapsed_regions`) is not silently averaged in: callers drop its
seed from both models' pairs and report it on its own line.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medmodal.evaluation.subsets import SubsetResult

MEAN_OVER_SUBSETS = "mean over subsets"


def collapsed_regions(rows: Sequence[SubsetResult], *, subset: str) -> list[str]:
    """Regions that a run never finds with the modalities of ``subset`` (normally the full set).

    With the BraTS conventions of :func:`~medmodal.evaluation.metrics.region_metrics`, an empty prediction
    scores exactly 1 on a case without the region and exactly 0 on a case with it. A region is **collapsed**
    when every held-out case scores exactly 0 or 1 and at least one scores 0: the model predicts nothing
    there (or, on a case without the region, only false positives), which is what a run that "ends predicting
    no tumour" gives. A model that has learned anything gets fractional Dice on some case.

    Args:
        rows: per-case rows of **one** run.
        subset: the subset name to judge by (``"t1+t1c+t2+flair"``).

    Returns:
        The collapsed region names, in first-seen order.
    """
    by_region: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.subset == subset:
            by_region[r.region].append(r.dice)
    if not by_region:
        raise ValueError(f"no row for subset {subset!r}; have {sorted({r.subset for r in rows})}")
    out = []
    for region, dice in by_region.items():
        d = np.asarray(dice)
        if np.all((d == 0.0) | (d == 1.0)) and bool((d == 0.0).any()):
            out.append(region)
    return out


@dataclass(frozen=True)
class PairedRow:
    """Model B against model A for one (subset, region), over seeds and (seed, case) pairs."""

    subset: str
    n_modalities: int
    region: str
    n_seeds: int
    n_pairs: int
    a_mean: float
    a_std: float
    b_mean: float
    b_std: float
    diff_mean: float
    diff_std: float
    b_better_seeds: int
    wilcoxon_p: float


def _per_case(rows: Sequence[SubsetResult]) -> dict[tuple[str, int, str], dict[str, float]]:
    out: dict[tuple[str, int, str], dict[str, float]] = defaultdict(dict)
    for r in rows:
        out[(r.subset, r.n_modalities, r.region)][r.case_id] = r.dice
    return out


def wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is zero (nothing to rank)."""
    from scipy.stats import wilcoxon

    if diff.size == 0 or not np.any(diff != 0):
        return 1.0
    with warnings.catch_warnings():  # small samples: scipy notes the normal approximation / ties
        warnings.simplefilter("ignore")
        return float(wilcoxon(diff, alternative="two-sided").pvalue)


def _std(v: np.ndarray) -> float:
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_comparison(
    a: Mapping[int, Sequence[SubsetResult]], b: Mapping[int, Sequence[SubsetResult]]
) -> list[PairedRow]:
    """Compare model B with model A per (subset, region), plus a ``"mean over subsets"`` row per region.

    Args:
        a, b: per seed, the per-case rows of that seed's run of model A / model B. Both must hold the same
            seeds, and for each seed the same (case, subset, region) keys: the models were evaluated on the
            same held-out cases.

    Returns:
        Rows in the order of model A's first seed (subsets, then regions), then one
        :data:`MEAN_OVER_SUBSETS` row per region (each case's Dice averaged over the subsets first).
    """
    seeds = sorted(a)
    if sorted(b) != seeds:
        raise ValueError(f"both models need the same seeds, got {sorted(a)} and {sorted(b)}")
    if not seeds:
        raise ValueError("nothing to compare: no seed")
    per_a = {s: _per_case(a[s]) for s in seeds}
    per_b = {s: _per_case(b[s]) for s in seeds}
    keys = list(per_a[seeds[0]])
    for s in seeds:
        if set(per_a[s]) != set(per_b[s]) or set(per_a[s]) != set(keys):
            raise ValueError(f"seed {s}: the two models were evaluated on different subsets or regions")
        for k in keys:
            if set(per_a[s][k]) != set(per_b[s][k]):
                raise ValueError(f"seed {s}, {k[0]} {k[2]}: the two models were evaluated on different cases")

    def row(subset: str, n_mod: int, region: str, va: dict[int, dict[str, float]],
            vb: dict[int, dict[str, float]]) -> PairedRow:
        ma = np.array([np.mean(list(va[s].values())) for s in seeds])
        mb = np.array([np.mean(list(vb[s].values())) for s in seeds])
        pairs = np.array([vb[s][c] - va[s][c] for s in seeds for c in va[s]])
        return PairedRow(
            subset=subset, n_modalities=n_mod, region=region, n_seeds=len(seeds), n_pairs=int(pairs.size),
            a_mean=float(ma.mean()), a_std=_std(ma), b_mean=float(mb.mean()), b_std=_std(mb),
            diff_mean=float((mb - ma).mean()), diff_std=_std(mb - ma), b_better_seeds=int((mb > ma).sum()),
            wilcoxon_p=wilcoxon_p(pairs),
        )

    out = [row(sub, n, reg, {s: per_a[s][(sub, n, reg)] for s in seeds}, {s: per_b[s][(sub, n, reg)] for s in seeds})
           for sub, n, reg in keys]
    def over_subsets(per: dict, s: int, sub_keys: list) -> dict[str, float]:
        return {c: float(np.mean([per[s][k][c] for k in sub_keys])) for c in per[s][sub_keys[0]]}

    for region in dict.fromkeys(k[2] for k in keys):
        sub_keys = [k for k in keys if k[2] == region]
        out.append(row(MEAN_OVER_SUBSETS, 0, region, {s: over_subsets(per_a, s, sub_keys) for s in seeds},
                       {s: over_subsets(per_b, s, sub_keys) for s in seeds}))
    return out


def paired_markdown(rows: Sequence[PairedRow], *, a: str, b: str) -> str:
    """Markdown table: one line per (subset, region) with both models, the paired difference and p."""
    head = ["subset", "region", f"{a}", f"{b}", f"{b} − {a} (seeds ahead)", "Wilcoxon p (pairs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        subset = f"**{r.subset}**" if r.subset == MEAN_OVER_SUBSETS else r.subset
        lines.append(
            f"| {subset} | {r.region} | {r.a_mean:.3f} ± {r.a_std:.3f} | {r.b_mean:.3f} ± {r.b_std:.3f} | "
            f"{r.diff_mean:+.3f} ± {r.diff_std:.3f} ({r.b_better_seeds}/{r.n_seeds}) | "
            f"{format_p(r.wilcoxon_p)} ({r.n_pairs}) |"
        )
    return "\n".join(lines)


def format_p(p: float) -> str:
    """A p-value for a table: three decimals, "<0.001" below."""
    return "<0.001" if p < 1e-3 else f"{p:.3f}"
