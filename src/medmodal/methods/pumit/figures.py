"""Figures of a PUMIT tokenizer run: the codebook statistics the spec asks to be "logged and drawn" (issue 14, item 3).

* :func:`code_counts`: how many token positions choose each code (their most likely one), to sum over the images
  an evaluation reconstructs;
* :func:`plot_codebook`: the sorted code frequencies on a log scale (how evenly the codebook is used; codes never
  chosen are counted in the title) beside the validation perplexity ``exp(H(p̄))`` and code usage over training,
  read from the run's ``metrics.csv`` (``val/perplexity``, ``val/code_usage``: per-crop values averaged over the
  validation crops, logged by :class:`~medmodal.methods.pumit.system.PUMITTokenizerSystem`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from medmodal.atomic import read_csv
from medmodal.evaluation.report import pyplot, save_figure

__all__ = ["code_counts", "plot_codebook"]


def code_counts(probs: torch.Tensor) -> np.ndarray:
    """``(K,)`` int64: per code, the token positions of ``probs (B, K, *S)`` whose most likely code it is."""
    k = probs.shape[1]
    return torch.bincount(probs.detach().argmax(1).flatten(), minlength=k).cpu().numpy().astype(np.int64)


def plot_codebook(path: Path, *, counts: np.ndarray | None, metrics_csv: Path | None, title: str) -> Path:
    """Draw the codebook statistics as a PNG at ``path`` (atomically).

    Args:
        counts: ``(K,)`` positions per code (:func:`code_counts` summed over images); ``None`` leaves the left
            panel out.
        metrics_csv: a run's long-format ``metrics.csv``; ``None`` or a file without ``val/perplexity`` leaves the
            right panel out.
        title: the figure's title (the run's name).
    """
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    if metrics_csv is not None and Path(metrics_csv).is_file():
        for row in read_csv(Path(metrics_csv)):
            if row["name"] in ("val/perplexity", "val/code_usage"):
                series[row["name"]].append((int(row["step"]), float(row["value"])))
    panels = [p for p, ok in (("hist", counts is not None), ("curve", bool(series))) if ok]
    if not panels:
        raise ValueError("nothing to draw: give code counts or a metrics.csv with val/perplexity")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False, constrained_layout=True)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "hist":
            c = np.asarray(counts, dtype=np.float64)
            freq = np.sort(c)[::-1] / max(c.sum(), 1.0)
            used = int((freq > 0).sum())
            p = freq[freq > 0]
            perplexity = math.exp(-float((p * np.log(p)).sum())) if used else 0.0
            ax.bar(np.arange(1, used + 1), freq[:used], width=1.0, color="tab:blue")
            ax.set_yscale("log")
            ax.set(xlabel="code rank (most chosen first)", ylabel="share of token positions",
                   xlim=(0.5, len(freq) + 0.5),
                   title=f"{used} of {len(freq)} codes chosen; perplexity of choices {perplexity:.1f}")
            ax.title.set_fontsize(9)
        else:
            if series.get("val/perplexity"):
                steps, values = zip(*sorted(series["val/perplexity"]), strict=True)
                ax.plot(steps, values, "o-", ms=3, lw=1, color="tab:orange", label="perplexity exp(H(p̄))")
            ax.set(xlabel="step", ylabel="validation perplexity (per crop)")
            if series.get("val/code_usage"):
                twin = ax.twinx()
                steps, values = zip(*sorted(series["val/code_usage"]), strict=True)
                twin.plot(steps, values, "s--", ms=3, lw=1, color="tab:green", label="code usage")
                twin.set(ylabel="code usage (share of codes, per crop)", ylim=(0, 1.05))
                twin.legend(loc="lower right", fontsize=8)
            if ax.lines:
                ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
