"""``medmodal experiment multimix``: the paper's comparison (spec §4) on the synthetic chest X-ray phantom.

For each label budget (masks × class labels, the spec's 10/50/all × 100/1000/all scaled to the phantom) and seed,
MultiMix and the baselines of the paper's table are trained on the same data, split and budget (one recipe,
``method.variant`` changed), then scored in-source (held-out images of the training sources) and cross-source
(a source never trained on). The report gives mean ± std over seeds per budget, variant and group.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from medmodal.atomic import atomic_write_text, write_csv
from medmodal.engine.parallel import default_jobs, run_jobs, threads_per_job
from medmodal.engine.recipe import Recipe, builtin_recipe_path, load_recipe
from medmodal.engine.run import RunError
from medmodal.methods.multimix.config import VARIANT_TITLES

log = logging.getLogger("medmodal")

#: label budgets of the experiment: name → (masks, class labels) kept among the phantom's training images.
BUDGETS: dict[str, tuple[int | str, int | str]] = {"few": (5, 20), "more": (20, 80), "all": ("all", "all")}
#: the metrics tabulated (summary.csv names; the first region's segmentation metrics).
CLS_METRICS = ("accuracy", "f1_macro", "roc_auc")
SEG_METRICS = ("dice", "jaccard", "ssim", "avg_hausdorff_mm", "precision", "recall")


@dataclass(frozen=True)
class _Job:
    budget: str
    variant: str
    seed: int
    recipe: Recipe
    run_dir: Path


def experiment_recipe(*, variant: str, budget: str, seed: int, fast: bool,
                      overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe of one run: ``multimix_tiny`` with the variant, budget and seed (and ``--set`` overrides)."""
    seg, cls = BUDGETS[budget]
    extra: dict[str, Any] = {"method.variant": variant, "method.seg_labels": seg, "method.cls_labels": cls,
                             "seed": seed, "train.progress": False}
    if fast:
        extra.update({"train.max_steps": 40, "train.val_every_steps": 20, "train.checkpoint_every_steps": 20,
                      "data.phantom.cases": 120})
    extra.update(overrides or {})
    return load_recipe(builtin_recipe_path("multimix_tiny"), overrides=extra)


def _train_and_evaluate(job: _Job, *, threads: int | None) -> dict[str, Any]:
    """Train (or reuse) one run and evaluate it; returns the summary rows and the training time."""
    from medmodal.engine.parallel import train_and_evaluate, worker_setup
    from medmodal.engine.train import is_finished_run

    worker_setup(threads)
    reused = is_finished_run(job.run_dir)
    seconds = train_and_evaluate(job.recipe, job.run_dir, model_name=f"{job.variant} {job.budget} seed {job.seed}")
    report, summary = job.run_dir / "eval" / "report.md", job.run_dir / "eval" / "summary.csv"
    with summary.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {"rows": rows, "seconds": seconds, "report": str(report), "reused": reused}


def run_multimix_experiment(out: Path, *, seeds: Sequence[int], variants: Sequence[str], fast: bool = False,
                            overwrite: bool = False, overrides: dict[str, Any] | None = None,
                            budgets: Sequence[str] | None = None, jobs: int | None = None) -> Path:
    """Train and score every (budget, variant, seed); write ``results.csv`` and ``report.md`` in ``out``."""
    out = Path(out)
    if (out / "report.md").is_file() and not overwrite:
        raise RunError(f"{out}: holds a finished experiment; pass --overwrite or choose another --out")
    budgets = list(budgets or (["few"] if fast else list(BUDGETS)))
    seeds = list(seeds)[:1] if fast else list(seeds)
    todo = [_Job(b, v, s, experiment_recipe(variant=v, budget=b, seed=s, fast=fast, overrides=overrides),
                 out / "runs" / b / v / f"seed{s}") for b in budgets for v in variants for s in seeds]
    if overwrite:
        import shutil

        for job in todo:
            shutil.rmtree(job.run_dir, ignore_errors=True)
    n_jobs = jobs or default_jobs(len(todo))
    threads = None
    if n_jobs > 1:

        threads = threads_per_job(n_jobs)
        # build the phantom and its cache once here, so that the workers never race to write them
        from medmodal.methods.multimix import MultiMixPlugin

        MultiMixPlugin().build(todo[0].recipe).data.prepare_data()
        for job in todo:
            job.recipe.train.threads = threads
    t0 = time.perf_counter()
    results = run_jobs(_train_and_evaluate, todo, jobs=n_jobs, what="experiment multimix", threads=threads,
                       describe=lambda j: f"{j.variant}, budget {j.budget}, seed {j.seed}")
    minutes = (time.perf_counter() - t0) / 60
    table = []
    for job, res in zip(todo, results, strict=True):
        for row in res["rows"]:
            table.append([job.budget, job.variant, job.seed, row["group"], row["metric"], row["mean"]])
    write_csv(out / "results.csv", ["budget", "variant", "seed", "group", "metric", "value"], table)
    figure = budget_figure(table, out / "budgets.png")
    text = _report(todo, results, table, fast=fast, minutes=minutes, jobs=n_jobs, figure=figure)
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def _cell(values: list[float]) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def budget_figure(table: Sequence[Sequence[Any]], path: Path) -> Path:
    """Accuracy and Dice (first region) per budget and model, in-source and cross-source: bars = mean over seeds,
    error bars = std, dots = the seeds."""
    from medmodal.evaluation.report import pyplot, save_figure

    plt = pyplot()
    budgets = list(dict.fromkeys(str(r[0]) for r in table))
    variants = list(dict.fromkeys(str(r[1]) for r in table))
    groups = list(dict.fromkeys(str(r[3]) for r in table))
    dice = next((str(r[4]) for r in table if str(r[4]).startswith("dice_")), "dice")
    metrics = [("accuracy", "accuracy"), (dice, f"Dice ({dice.removeprefix('dice_')})")]
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(5.5 * len(groups), 3.4 * len(metrics)),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(variants))
    for i, (metric, label) in enumerate(metrics):
        for j, group in enumerate(groups):
            ax = axes[i][j]
            for k, variant in enumerate(variants):
                for b, budget in enumerate(budgets):
                    v = np.array([float(r[5]) for r in table if (r[0], r[1], r[3], r[4]) ==
                                  (budget, variant, group, metric)], dtype=float)
                    v = v[np.isfinite(v)]
                    if not len(v):
                        continue
                    x = b + (k - (len(variants) - 1) / 2) * width
                    ax.bar(x, v.mean(), width, yerr=v.std(ddof=1) if len(v) > 1 else 0, color=colours(k),
                           label=VARIANT_TITLES[variant] if b == 0 else None, capsize=2)
                    ax.plot(np.full(len(v), x), v, "k.", ms=3)
            ax.set_xticks(range(len(budgets)), budgets)
            ax.set_xlim(-0.5, len(budgets) - 0.5)
            ax.set_title(f"{label}, {group}")
            ax.set_ylim(0, 1)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("MultiMix vs the paper's baselines on the synthetic chest phantom (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return save_figure(fig, path)


def _report(todo: Sequence[_Job], results: Sequence[dict], table: list[list], *, fast: bool, minutes: float,
            jobs: int, figure: Path | None = None) -> str:
    values: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    region = None
    for budget, variant, _seed, group, metric, value in table:
        values[(budget, variant, group, metric)].append(float(value))
        if region is None and metric.startswith("dice_"):
            region = metric.removeprefix("dice_")
    recipe = todo[0].recipe
    new = [r for r in results if not r.get("reused")]
    trained = len(new)
    train_min = float(np.mean([r["seconds"] for r in new])) / 60 if new else 0.0
    ph = recipe.data.phantom
    m = recipe.method
    seeds = sorted({j.seed for j in todo})
    lines = ["# MultiMix experiment: label budgets × the paper's baselines", "",
             "**Data: synthetic phantom** (procedural chest X-rays: lungs = the mask, class 1 = an opacity inside a "
             f"lung), {ph.cases} images of {ph.size}² (source A) from {ph.sources} sources; trained on the sources "
             f"other than {m.cross_sources}, which are the cross-source test.", "",
             f"- {date.today().isoformat()}, seeds {seeds} (each: its own split, budget draw and initialisation), "
             f"{recipe.train.max_steps} steps of 5 streams × {recipe.data.batch_size} images; {len(todo)} runs: "
             f"{trained} trained by this call in {minutes:.1f} min ({jobs} at a time, {train_min:.1f} min of training "
             f"per run on average), {len(todo) - trained} reused from an earlier call"
             f"{' — FAST smoke version, not evidence' if fast else ''}",
             "- budgets (masks / class labels kept among the training images; the rest is unlabelled): "
             + ", ".join(f"{b} = {BUDGETS[b][0]} / {BUDGETS[b][1]}" for b in dict.fromkeys(j.budget for j in todo)),
             "- every cell: mean ± std over seeds of the per-run value (classification over the group's images; "
             f"segmentation: mean over images of region {region!r})", ""]
    groups = list(dict.fromkeys(str(r[3]) for r in table))
    for group in groups:
        lines += [f"## {group}", "", "| budget | model | " + " | ".join(CLS_METRICS + SEG_METRICS) + " |",
                  "|---|---|" + "---|" * (len(CLS_METRICS) + len(SEG_METRICS))]
        for budget in dict.fromkeys(j.budget for j in todo):
            for variant in dict.fromkeys(j.variant for j in todo):
                cells = [_cell(values.get((budget, variant, group, k), [])) for k in CLS_METRICS]
                cells += [_cell(values.get((budget, variant, group, f"{k}_{region}"), [])) for k in SEG_METRICS]
                lines.append(f"| {budget} | {VARIANT_TITLES[variant]} | " + " | ".join(cells) + " |")
        lines.append("")
    if figure is not None:
        lines += [f"![budgets]({figure.name})", ""]
    example = next((r["report"] for j, r in zip(todo, results, strict=True) if j.variant == "multimix"), None)
    if example:
        lines += [f"Figures of images, saliency and boundaries: each run's `eval/figure.png` (e.g. `{example}`).", ""]
    lines += ["Definitions: accuracy, F1 and ROC AUC from scikit-learn; Dice, Jaccard, precision, recall on the "
              "binary masks on each image's own grid; SSIM of the two masks (MONAI); average Hausdorff = mean of "
              "the two directed average boundary distances, in mm (see any run's eval/report.md).", ""]
    return "\n".join(lines)
