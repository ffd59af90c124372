"""Tables and figures of all-subset evaluations: CSV, Markdown and a subset × region heatmap."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medmodal.atomic import atomic_path, read_csv, write_csv
from medmodal.evaluation.subsets import SubsetResult

SYNTHETIC_NOTE = (
    "**Data: synthetic phantom.** These numbers come from medmodal's procedural brain-tumour phantom, not from "
    "patients; they show that the pipeline works and how models compare on it, nothing about clinical accuracy."
)


@dataclass(frozen=True)
class SummaryRow:
    """Mean ± std over cases of one (model, subset, region)."""

    model: str
    subset: str
    n_modalities: int
    region: str
    n_cases: int
    dice_mean: float
    dice_std: float
    hd95_median: float
    hd95_undefined: int


def write_rows(rows: Sequence, path: Path) -> Path:
    """Write dataclass rows as CSV (atomically; the :mod:`csv` module quotes commas, quotes and new lines)."""
    if not rows:
        raise ValueError(f"{path}: nothing to write (no evaluated case)")
    fields = list(asdict(rows[0]))
    return write_csv(path, fields, ([_fmt(d[f]) for f in fields] for d in map(asdict, rows)))


def read_rows(path: Path) -> list[SubsetResult]:
    """Read a per-case CSV written by :func:`write_rows`."""
    return [
        SubsetResult(
            model=r["model"], case_id=r["case_id"], subset=r["subset"], n_modalities=int(r["n_modalities"]),
            region=r["region"], dice=float(r["dice"]), hd95=float(r["hd95"]),
        )
        for r in read_csv(path)
    ]


def _fmt(v: object) -> object:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def summarise(rows: Sequence[SubsetResult]) -> list[SummaryRow]:
    """Aggregate per-case rows to one row per (model, subset, region), in first-seen order."""
    groups: dict[tuple[str, str, int, str], list[SubsetResult]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.subset, r.n_modalities, r.region)].append(r)
    out = []
    for (model, subset, n, region), rs in groups.items():
        dice = np.array([r.dice for r in rs])
        hd = np.array([r.hd95 for r in rs])
        finite = hd[np.isfinite(hd)]
        out.append(SummaryRow(
            model=model, subset=subset, n_modalities=n, region=region, n_cases=len(rs),
            dice_mean=float(dice.mean()), dice_std=float(dice.std(ddof=1)) if len(rs) > 1 else 0.0,
            hd95_median=float(np.median(finite)) if finite.size else float("nan"),
            hd95_undefined=int((~np.isfinite(hd)).sum()),
        ))
    return out


def _grid(summary: Sequence[SummaryRow], model: str) -> tuple[list[str], list[str], np.ndarray]:
    rows = [s for s in summary if s.model == model]
    subsets = list(dict.fromkeys(s.subset for s in rows))
    regions = list(dict.fromkeys(s.region for s in rows))
    grid = np.full((len(subsets), len(regions)), np.nan)
    for s in rows:
        grid[subsets.index(s.subset), regions.index(s.region)] = s.dice_mean
    return subsets, regions, grid


def pyplot():  # matplotlib.pyplot, imported lazily with the file-only Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        pyplot().close(fig)
    return path


def plot_heatmap(summary: Sequence[SummaryRow], path: Path, *, title: str) -> Path:
    """Mean Dice per subset (rows) × region (columns), one panel per model, annotated; saved as PNG."""
    plt = pyplot()
    models = list(dict.fromkeys(s.model for s in summary))
    n_sub = len({s.subset for s in summary})
    fig, axes = plt.subplots(1, len(models), figsize=(2.2 + 1.6 * len(models) * 1.6, 1.2 + 0.38 * n_sub),
                             squeeze=False, constrained_layout=True)
    im = None
    for ax, model in zip(axes[0], models, strict=True):
        subsets, regions, grid = _grid(summary, model)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(regions)), regions)
        ax.set_yticks(range(len(subsets)), subsets if ax is axes[0][0] else [""] * len(subsets))
        ax.set_title(model, fontsize=10)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i, j] < 0.6 else "black")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="mean Dice", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_training_curves(metrics_csv: Path, path: Path, *, title: str) -> Path:
    """Training loss and validation Dice against optimiser steps, from a run's long-format ``metrics.csv``."""
    plt = pyplot()
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in read_csv(metrics_csv):
        series[row["name"]].append((int(row["step"]), float(row["value"])))
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    for name, ax in (("train/loss", ax_loss),):
        if series.get(name):
            steps, values = zip(*sorted(series[name]), strict=True)
            ax.plot(steps, values, lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss (Dice + BCE)")
    for name in sorted(k for k in series if k.startswith("val/dice_")):
        steps, values = zip(*sorted(series[name]), strict=True)
        ax_dice.plot(steps, values, marker="o", ms=3, lw=1, label=name.removeprefix("val/dice_"))
    ax_dice.set(xlabel="step", ylabel="validation Dice (all modalities)", ylim=(0, 1))
    if ax_dice.lines:
        ax_dice.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def markdown_table(summary: Sequence[SummaryRow]) -> str:
    """Subsets as rows, ``model region`` as columns, cells ``mean ± std`` Dice."""
    models = list(dict.fromkeys(s.model for s in summary))
    regions = list(dict.fromkeys(s.region for s in summary))
    subsets = list(dict.fromkeys(s.subset for s in summary))
    cell = {(s.model, s.subset, s.region): s for s in summary}
    head = ["subset"] + [f"{m} {r}" if len(models) > 1 else r for m in models for r in regions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sub in subsets:
        vals = []
        for m in models:
            for r in regions:
                s = cell.get((m, sub, r))
                vals.append("–" if s is None else f"{s.dice_mean:.3f} ± {s.dice_std:.3f}")
        lines.append(f"| {sub} | " + " | ".join(vals) + " |")
    means = []
    for m in models:
        for r in regions:
            d = [s.dice_mean for s in summary if s.model == m and s.region == r]
            means.append(f"**{np.mean(d):.3f}**" if d else "–")
    lines.append("| **mean over subsets** | " + " | ".join(means) + " |")
    return "\n".join(lines)
