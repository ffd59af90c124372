"""``medmodal experiment medcoss``: the stage x task forgetting matrix (spec §4) on the phantom modalities.

For each variant and seed, the stages of a recipe (``medcoss_tiny``: phantom reports -> 2D chest X-rays -> 3D
brain volumes) are pretrained one after the other; after every stage the encoder is probed on every modality seen
so far (:mod:`.evaluate`: a logistic regression on frozen pooled features, balanced accuracy on held-out items).
Variants: ``medcoss`` (k-means buffer, mixup, distillation), ``sequential`` (the same stages without any buffer:
plain sequential training), ``joint`` (every stage's data in one run; one row), and the ablations
``random_buffer`` (a uniformly drawn buffer of the same size) and ``no_mixup``.

Besides the probes, the **feature drift** of a modality after a later stage is measured on its held-out items: the
mean squared difference of the pooled features of the later encoder and of the encoder that finished that
modality's stage, relative to the mean squared norm of the latter (0 = nothing moved).
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
from medmodal.engine.run import RunError

log = logging.getLogger("medmodal")

VARIANTS: dict[str, dict[str, Any]] = {
    "medcoss": {},
    "sequential": {"method.strategy": "sequential"},
    "joint": {"method.strategy": "joint"},
    "random_buffer": {"method.buffer_selection": "random"},
    "no_mixup": {"method.mixup": False},
}


@dataclass(frozen=True)
class _Job:
    variant: str
    seed: int
    out: Path
    recipe: str
    overrides: dict[str, Any]
    fast: bool


def feature_drift(later: Path, earlier: Path, stage_name: str) -> float:
    """Relative drift of the pooled features of ``stage_name``'s held-out items between two stage runs."""
    from medmodal.data.text import load_text_tokenizer
    from medmodal.engine.runinfo import load_run
    from medmodal.methods.medcoss.plugin import TOKENIZER_FILE, encoder_features
    from medmodal.methods.medcoss.sources import stage_items

    a, b = load_run(later), load_run(earlier)
    m = a.recipe.method
    stage = next(s for s in m.stages if s.name == stage_name)
    tok = load_text_tokenizer(a.dir / TOKENIZER_FILE) if (a.dir / TOKENIZER_FILE).is_file() else None
    _, val = stage_items(stage, tokenizer=tok, method=m, seed=a.recipe.seed)
    fa = encoder_features(a.network(), val, kind=stage.kind, pooling=m.text_pooling)
    fb = encoder_features(b.network(), val, kind=stage.kind, pooling=m.text_pooling)
    return float(np.mean((fa - fb) ** 2) / max(np.mean(fb**2), 1e-12))


def _sequence(job: _Job, *, threads: int | None) -> dict[str, Any]:
    """Pretrain one (variant, seed) and collect its probes after each stage and the feature drift."""
    from medmodal.engine.parallel import worker_setup

    worker_setup(threads)
    from medmodal.methods.medcoss.stages import run_stages

    t = time.perf_counter()
    if not (job.out / "report.md").is_file():
        run_stages(job.out, recipe=job.recipe, overrides={**job.overrides, "seed": job.seed,
                                                          "train.progress": False},
                   fast=job.fast, overwrite=False)
    runs = sorted((p for p in job.out.iterdir() if (p / "run.json").is_file()),
                  key=lambda p: int(p.name.split("_", 1)[0]))
    probes: dict[str, dict[str, float]] = {}
    for run in runs:
        with (run / "eval" / "probes.csv").open(newline="", encoding="utf-8") as f:
            probes[run.name] = {r["stage"]: float(r["balanced_accuracy"]) for r in csv.DictReader(f)
                                if r["balanced_accuracy"] != ""}
    drift: dict[str, dict[str, float]] = {}
    if job.variant != "joint":
        for k, run in enumerate(runs):
            drift[run.name] = {earlier.name.split("_", 1)[1]: feature_drift(run, earlier,
                                                                           earlier.name.split("_", 1)[1])
                               for earlier in runs[:k]}
    return {"runs": [r.name for r in runs], "probes": probes, "drift": drift,
            "seconds": time.perf_counter() - t}


def run_medcoss_experiment(out: Path, *, seeds: Sequence[int], variants: Sequence[str], recipe: str = "medcoss_tiny",
                           fast: bool = False, overwrite: bool = False, overrides: dict[str, Any] | None = None,
                           jobs: int | None = None) -> Path:
    """Pretrain every (variant, seed) and write ``results.csv``, ``forgetting.png`` and ``report.md``."""
    out = Path(out)
    if (out / "report.md").is_file() and not overwrite:
        raise RunError(f"{out}: holds a finished experiment; pass --overwrite or choose another --out")
    if overwrite:
        import shutil

        shutil.rmtree(out / "runs", ignore_errors=True)
    seeds = list(seeds)[:1] if fast else list(seeds)
    todo = [_Job(v, s, out / "runs" / v / f"seed{s}", recipe, {**VARIANTS[v], **(overrides or {})}, fast)
            for v in variants for s in seeds]
    n_jobs = jobs or default_jobs(len(todo))
    threads = None
    if n_jobs > 1:

        from medmodal.engine.recipe import builtin_recipe_path, load_recipe
        from medmodal.methods.medcoss.sources import stage_records

        threads = threads_per_job(n_jobs)
        path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else builtin_recipe_path(recipe)
        for stage in load_recipe(path).method.stages:  # generate the phantoms once, before the workers start
            if stage.data.collection is None:
                stage_records(stage)
    t0 = time.perf_counter()
    results = run_jobs(_sequence, todo, jobs=n_jobs, what="experiment medcoss", threads=threads,
                       describe=lambda j: f"{j.variant}, seed {j.seed}")
    minutes = (time.perf_counter() - t0) / 60
    rows = []
    for job, res in zip(todo, results, strict=True):
        for run, scores in res["probes"].items():
            for task, value in scores.items():
                drift = res["drift"].get(run, {}).get(task, "")
                rows.append([job.variant, job.seed, run, task, f"{value:.4f}",
                             "" if drift == "" else f"{drift:.5f}"])
    write_csv(out / "results.csv", ["variant", "seed", "after_stage", "task", "balanced_accuracy", "feature_drift"],
              rows)
    figure = forgetting_figure(rows, out / "forgetting.png")
    atomic_write_text(out / "report.md", _report(todo, results, rows, fast=fast, minutes=minutes, jobs=n_jobs,
                                                 figure=figure))
    return out / "report.md"


def _matrix(rows: Sequence[Sequence[Any]], variant: str, column: int) -> tuple[list[str], list[str],
                                                                               dict[tuple[str, str], list[float]]]:
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    stages: list[str] = []
    tasks: list[str] = []
    for r in rows:
        if r[0] != variant or r[column] == "":
            continue
        cells[(r[2], r[3])].append(float(r[column]))
        stages += [r[2]] if r[2] not in stages else []
        tasks += [r[3]] if r[3] not in tasks else []
    stages.sort(key=lambda s: int(s.split("_", 1)[0]))
    return stages, tasks, cells


def _cell(values: Sequence[float], fmt: str = ".3f") -> str:
    if not values:
        return ""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else f"{v[0]:{fmt}}"


def forgetting_figure(rows: Sequence[Sequence[Any]], path: Path) -> Path:
    """One heatmap per variant: mean balanced accuracy after each stage (rows) on each task (columns)."""
    from medmodal.evaluation.report import pyplot, save_figure

    plt = pyplot()

    variants = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 3.0), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        stages, tasks, cells = _matrix(rows, variant, 4)
        grid = np.full((len(stages), len(tasks)), np.nan)
        for i, s in enumerate(stages):
            for j, t in enumerate(tasks):
                if cells.get((s, t)):
                    grid[i, j] = np.mean(cells[(s, t)])
        ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.8 else "black",
                        fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_yticks(range(len(stages)), [f"after {s}" for s in stages], fontsize=8)
        ax.set_title(variant, fontsize=9)
    fig.suptitle("linear-probe balanced accuracy after each stage (synthetic phantom)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _report(todo: Sequence[_Job], results: Sequence[dict], rows: Sequence[Sequence[Any]], *, fast: bool,
            minutes: float, jobs: int, figure: Path) -> str:
    seeds = sorted({j.seed for j in todo})
    lines = ["# MedCoSS: what each stage remembers", ""]
    if fast:
        lines += ["**FAST smoke version (a few steps per stage): not evidence.**", ""]
    lines += ["**Data: synthetic phantom.** Report text, chest X-rays and brain volumes are procedurally generated; "
              "nothing here is about patients.", "",
              f"- date: {date.today().isoformat()}; recipe `{todo[0].recipe}`; seeds {', '.join(map(str, seeds))}; "
              f"{jobs} sequence(s) at a time; {minutes:.1f} min", ""]
    for variant in dict.fromkeys(j.variant for j in todo):
        stages, tasks, cells = _matrix(rows, variant, 4)
        lines += [f"## {variant}", "", "Linear-probe balanced accuracy (mean ± std over seeds):", "",
                  "| after stage | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for s in stages:
            lines.append(f"| {s} | " + " | ".join(_cell(cells.get((s, t), [])) for t in tasks) + " |")
        if len(stages) > 1:
            final = stages[-1]
            forget = []
            for t in tasks:
                best = [np.mean(cells[(s, t)]) for s in stages[:-1] if cells.get((s, t))]
                if best and cells.get((final, t)):
                    forget.append(f"{t} {max(best) - np.mean(cells[(final, t)]):+.3f}")
            lines += ["", "Forgetting (best earlier minus final, positive = forgotten): " + ", ".join(forget)]
            d_stages, d_tasks, drift = _matrix(rows, variant, 5)
            if drift:
                lines += ["", "Relative feature drift from the encoder that finished each modality (mean ± std):", "",
                          "| after stage | " + " | ".join(d_tasks) + " |", "|---|" + "---|" * len(d_tasks)]
                for s in d_stages:
                    lines.append(f"| {s} | " + " | ".join(_cell(drift.get((s, t), []), ".2e") for t in d_tasks)
                                 + " |")
        lines.append("")
    lines += ["Probes: a logistic regression on the frozen encoder's pooled features of each stage's training items, "
              "scored on its held-out items (balanced accuracy; the phantom's classes: tumour grade for reports and "
              "volumes, opacity for chest X-rays). Drift: mean squared difference of the pooled features of a "
              "modality's held-out items between a later encoder and the one that finished that modality, over the "
              "latter's mean squared norm.", "", f"![forgetting]({figure.name})", ""]
    return "\n".join(lines)
