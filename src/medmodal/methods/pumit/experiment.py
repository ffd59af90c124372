"""``medmodal experiment pumit``: does PUMIT pretraining pay off with few labels? (issue 14, spec §4 on the phantom)

1. **An unlabelled collection** of phantom images that the fine-tuning never sees (other phantom seeds): 2D slices
   (DA 5), thick-slice volumes at 1 x 1 x 4 mm (DA 2) and isotropic volumes at 1 mm (DA 0), every contrast of
   every case as one image, listed in ``collection/manifest.csv``.
2. **Pretraining** on it (``medmodal pretrain``: the tokenizer, then the ViT by masked image modelling).
3. **Fine-tuning** the same ViT from the pretrained weights and from scratch on a label budget
   (``data.label_fraction`` 10/25/50/100 % of the training cases, nested) and several seeds, for segmentation
   (whole tumour on 2D FLAIR slices, ``pumit_finetune_seg_tiny``) and classification (tumour grade on 2D T1c
   slices, ``pumit_finetune_cls_tiny``). A seed fixes the split, the label subset and the initialisation of
   the new layers, so the pretrained and scratch runs of a seed are paired.
4. **Report**: mean ± std over seeds per budget, the paired difference, a paired test over (case, seed) pairs
   (Wilcoxon signed-rank on the per-case Dice; exact McNemar on per-case correctness) and the label-efficiency
   curves (``label_efficiency.png``).
"""

from __future__ import annotations

import csv
import logging
import time
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

log = logging.getLogger("medmodal")

#: task -> (fine-tuning recipe, the metric tabulated, its column in the evaluation's summary.csv)
TASKS: dict[str, tuple[str, str, str]] = {
    "segmentation": ("pumit_finetune_seg_tiny", "Dice WT", "dice_mean"),
    "classification": ("pumit_finetune_cls_tiny", "balanced accuracy", "balanced_accuracy"),
}
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
INITS = ("pretrained", "scratch")
#: the pretraining collection: name -> phantom settings (seeds the fine-tuning phantom, seed 0, never uses)
COLLECTION: dict[str, dict[str, Any]] = {
    "slices_2d": {"spatial_dims": 2, "cases": 60, "size": 64, "seed": 101},
    "thick_3d": {"spatial_dims": 3, "cases": 12, "size": [64, 64, 16], "spacing": [1.0, 1.0, 4.0], "seed": 102},
    "iso_3d": {"spatial_dims": 3, "cases": 8, "size": [48, 48, 48], "spacing": [1.0, 1.0, 1.0], "seed": 103},
}
FAST_CASES = {"slices_2d": 8, "thick_3d": 3, "iso_3d": 2}


@dataclass(frozen=True)
class _Job:
    task: str
    fraction: float
    seed: int
    init: str
    recipe: Recipe
    run_dir: Path


def write_pretraining_collection(folder: Path, *, fast: bool) -> Path:
    """Generate the phantoms of :data:`COLLECTION` (cached) and list their images in ``folder/manifest.csv``
    (columns ``image, modality, dataset``; no labels: the collection is unlabelled)."""
    from medmodal.engine.datamodule import resolve_source
    from medmodal.engine.recipe import DataConfig, PhantomConfig

    rows = []
    for name, settings in COLLECTION.items():
        cfg = {**settings, "cases": FAST_CASES[name]} if fast else settings
        source = resolve_source(DataConfig(phantom=PhantomConfig(**cfg)))
        _, records = source.records()
        rows += [[str(Path(r.images[m]).resolve()), m, name] for r in records for m in source.modalities]
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "manifest.csv", ["image", "modality", "dataset"], rows)
    return folder / "manifest.csv"


def finetune_recipe(task: str, *, fraction: float, seed: int, vit: dict[str, Any], init_from: Path | None,
                    fast: bool, overrides: dict[str, Any] | None = None) -> Recipe:
    """The recipe of one fine-tuning run: the task's built-in recipe with the pretrained ViT's architecture."""
    name = TASKS[task][0]
    kwargs = {**vit, **({"num_classes": 2} if task == "classification" else {})}
    extra: dict[str, Any] = {"seed": seed, "data.label_fraction": fraction, "model.kwargs": kwargs,
                             "train.progress": False, "train.init_from": None if init_from is None else str(init_from)}
    if fast:
        extra.update({"train.max_steps": 8, "train.val_every_steps": 4, "train.checkpoint_every_steps": 4,
                      "train.warmup_steps": 2, "data.phantom.cases": 24})
    extra.update(overrides or {})
    return load_recipe(builtin_recipe_path(name), overrides=extra)


def pretrained_vit_kwargs(mim_run: Path) -> dict[str, Any]:
    """The architecture of a MIM run's ViT (``run.json``), without what the fine-tuning network sets itself."""
    from medmodal.engine.runinfo import load_run

    kwargs = dict(load_run(mim_run).info.network["kwargs"])
    return {k: v for k, v in kwargs.items() if k not in ("in_channels", "codebook_size", "num_classes",
                                                         "out_channels")}


def _train_and_evaluate(job: _Job, *, threads: int | None) -> dict[str, Any]:
    """Train (or reuse) one run and evaluate it; returns the tabulated metric and its per-case values."""
    from medmodal.engine.parallel import train_and_evaluate, worker_setup

    worker_setup(threads)
    seconds = train_and_evaluate(job.recipe, job.run_dir, model_name=f"{job.init} {job.fraction:g} seed {job.seed}")
    summary, cases = job.run_dir / "eval" / "summary.csv", job.run_dir / "eval" / "subsets.csv"
    column = TASKS[job.task][2]
    with summary.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("region", "WT") == "WT"]
    with cases.open(newline="", encoding="utf-8") as f:
        per_case = {}
        for r in csv.DictReader(f):
            if job.task == "segmentation" and r["region"] == "WT":
                per_case[r["case_id"]] = float(r["dice"])
            elif job.task == "classification":
                per_case[r["case_id"]] = float(int(r["prediction"]) == int(r["target"]))
    extra = {"accuracy": float(rows[0]["accuracy"])} if job.task == "classification" else {}
    return {"value": float(rows[0][column]), "cases": per_case, "seconds": seconds, **extra}


def run_pumit_experiment(out: Path, *, seeds: Sequence[int], fractions: Sequence[float] = FRACTIONS,
                         tasks: Sequence[str] = tuple(TASKS), fast: bool = False, overwrite: bool = False,
                         overrides: dict[str, Any] | None = None, jobs: int | None = None) -> Path:
    """Pretrain, fine-tune every (task, fraction, seed, init) and write ``results.csv``, the curves and
    ``report.md`` in ``out``; finished runs are reused and interrupted ones resumed."""
    from medmodal.methods.pumit.commands import run_pretrain

    out = Path(out)
    if (out / "report.md").is_file() and not overwrite:
        raise RunError(f"{out}: holds a finished experiment; pass --overwrite or choose another --out")
    if overwrite:
        import shutil

        for sub in ("pretrain", "runs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    seeds = list(seeds)[:1] if fast else list(seeds)
    fractions = [0.25, 1.0] if fast else list(fractions)
    t0 = time.perf_counter()
    manifest = write_pretraining_collection(out / "collection", fast=fast)
    pre = out / "pretrain"
    if not (pre / "report.md").is_file():
        run_pretrain(pre, tokenizer="pumit_tokenizer_tiny", mim="pumit_mim_tiny",
                     overrides={"method.collection": str(manifest.resolve()), "train.progress": False},
                     fast=fast, overwrite=True)
    pretrain_minutes = (time.perf_counter() - t0) / 60
    mim = (pre / "mim").resolve()
    vit = pretrained_vit_kwargs(mim)
    todo = [_Job(task, f, s, init, finetune_recipe(task, fraction=f, seed=s, vit=vit, fast=fast,
                                                   init_from=mim if init == "pretrained" else None,
                                                   overrides=overrides),
                 out / "runs" / task / f"labels{round(100 * f)}" / init / f"seed{s}")
            for task in tasks for f in fractions for s in seeds for init in INITS]
    n_jobs = jobs or default_jobs(len(todo))
    threads = None
    if n_jobs > 1:

        from medmodal.engine.plugin import get_method

        threads = threads_per_job(n_jobs)
        # build the phantom and its caches once here, so that the workers never race to write them
        for task in tasks:
            first = next(j for j in todo if j.task == task)
            get_method(first.recipe.method.name).build(first.recipe).data.prepare_data()
        for job in todo:
            job.recipe.train.threads = threads
    t1 = time.perf_counter()
    results = run_jobs(_train_and_evaluate, todo, jobs=n_jobs, what="experiment pumit", threads=threads,
                       describe=lambda j: f"{j.task}, {j.fraction:g} of the labels, {j.init}, seed {j.seed}")
    minutes = (time.perf_counter() - t1) / 60
    table = [[j.task, j.fraction, j.seed, j.init, f"{r['value']:.4f}", f"{r['seconds']:.1f}"]
             for j, r in zip(todo, results, strict=True)]
    write_csv(out / "results.csv", ["task", "label_fraction", "seed", "init", "value", "seconds"], table)
    figure = label_efficiency_figure(todo, results, out / "label_efficiency.png")
    text = _report(todo, results, pre=pre, fast=fast, pretrain_minutes=pretrain_minutes, minutes=minutes,
                   jobs=n_jobs, figure=figure, vit=vit)
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def _by(todo: Sequence[_Job], results: Sequence[dict], task: str, fraction: float, init: str) -> dict[int, dict]:
    return {j.seed: r for j, r in zip(todo, results, strict=True)
            if j.task == task and j.fraction == fraction and j.init == init}


def _cell(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def paired_test(task: str, pre: dict[int, dict], scratch: dict[int, dict]) -> tuple[int, float]:
    """``(pairs, p)`` over the (case, seed) pairs both runs scored: Wilcoxon signed-rank on per-case Dice
    (segmentation) or the exact McNemar test on per-case correctness (classification); ``p`` is NaN when no pair
    differs."""
    from scipy.stats import binomtest, wilcoxon

    a, b = [], []
    for seed in sorted(set(pre) & set(scratch)):
        for case in sorted(set(pre[seed]["cases"]) & set(scratch[seed]["cases"])):
            a.append(pre[seed]["cases"][case])
            b.append(scratch[seed]["cases"][case])
    x, y = np.asarray(a), np.asarray(b)
    if not len(x) or np.all(x == y):
        return len(x), float("nan")
    if task == "classification":
        wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        return len(x), float(binomtest(wins, wins + losses, 0.5).pvalue)
    return len(x), float(wilcoxon(x, y).pvalue)


def label_efficiency_figure(todo: Sequence[_Job], results: Sequence[dict], path: Path) -> Path:
    """One panel per task: the metric against the share of labels, mean ± std over seeds, per initialisation."""
    from medmodal.evaluation.report import pyplot, save_figure

    plt = pyplot()

    tasks = list(dict.fromkeys(j.task for j in todo))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        fractions = sorted({j.fraction for j in todo if j.task == task})
        for init, colour in zip(INITS, ("tab:blue", "tab:grey"), strict=True):
            values = [[r["value"] for r in _by(todo, results, task, f, init).values()] for f in fractions]
            mean = np.array([np.mean(v) for v in values])
            std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
            ax.plot([100 * f for f in fractions], mean, "o-", color=colour, label=init)
            ax.fill_between([100 * f for f in fractions], mean - std, mean + std, color=colour, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
        ax.set_xlabel("labelled training cases (%)")
        ax.set_ylabel(TASKS[task][1])
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("PUMIT: fine-tuning from the pretrained ViT vs from scratch (synthetic phantom)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _report(todo: Sequence[_Job], results: Sequence[dict], *, pre: Path, fast: bool, pretrain_minutes: float,
            minutes: float, jobs: int, figure: Path, vit: dict[str, Any]) -> str:
    seeds = sorted({j.seed for j in todo})
    lines = ["# PUMIT: does pretraining pay off with few labels?", ""]
    if fast:
        lines += ["**FAST smoke version (tiny data, a few steps): not evidence.**", ""]
    lines += [
        "**Data: synthetic phantom.** Pretraining images and fine-tuning cases are procedurally generated brain "
        "phantoms (different seeds: the fine-tuning cases are never pretrained on); nothing here is about patients.",
        "",
        f"- date: {date.today().isoformat()}; seeds: {', '.join(map(str, seeds))}; {jobs} run(s) at a time; "
        f"pretraining {pretrain_minutes:.1f} min (reused if it existed), fine-tuning {minutes:.1f} min",
        f"- pretraining: `{pre}` (report: `{pre / 'report.md'}`), collection `collection/manifest.csv`: "
        + ", ".join(f"{k} ({v['spatial_dims']}D, {FAST_CASES[k] if fast else v['cases']} cases x 4 contrasts"
                    + (f", {' x '.join(f'{x:g}' for x in v['spacing'])} mm" if "spacing" in v else "") + ")"
                    for k, v in COLLECTION.items()),
        f"- ViT: {', '.join(f'{k} {v}' for k, v in vit.items())}; the same network from the MIM run's weights "
        "(`pretrained`) or from its initialisation (`scratch`), same steps and learning rate",
        "- a seed fixes the split, the nested label subset and the new layers' initialisation: pretrained and "
        "scratch runs of a seed are paired",
        "",
    ]
    for task in dict.fromkeys(j.task for j in todo):
        recipe, metric, _ = TASKS[task]
        lines += [f"## {task}: {metric} (`{recipe}`)", "",
                  "| labels | pretrained | scratch | paired difference | pretrained better | (case, seed) pairs | p |",
                  "|---|---|---|---|---|---|---|"]
        for f in sorted({j.fraction for j in todo if j.task == task}):
            pre_r, scr_r = _by(todo, results, task, f, "pretrained"), _by(todo, results, task, f, "scratch")
            common = sorted(set(pre_r) & set(scr_r))
            diff = [pre_r[s]["value"] - scr_r[s]["value"] for s in common]
            n, p = paired_test(task, pre_r, scr_r)
            better = sum(d > 0 for d in diff)
            lines.append(f"| {100 * f:g} % | {_cell([r['value'] for r in pre_r.values()])} | "
                         f"{_cell([r['value'] for r in scr_r.values()])} | {_cell(diff)} | {better}/{len(diff)} "
                         f"seeds | {n} | {'-' if np.isnan(p) else f'{p:.3g}'} |")
        test = ("Wilcoxon signed-rank test on the per-case whole-tumour Dice" if task == "segmentation" else
                "exact McNemar test (binomial on the discordant cases) of per-case correctness")
        lines += ["", f"Mean ± std over seeds of the validation cases' {metric}; the paired difference is "
                  f"pretrained - scratch per seed; p: {test} over the (case, seed) pairs.", ""]
    lines += [f"![label efficiency]({figure.name})", ""]
    return "\n".join(lines)
