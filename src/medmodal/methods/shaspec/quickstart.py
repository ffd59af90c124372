"""``medmodal quickstart``: phantom → train ShaSpec and the zero-fill baseline over several seeds → evaluate
every modality subset → one ``report.md`` with both models side by side.

Each (model, seed) is an ordinary run folder under ``out/runs/``; an interrupted quickstart resumes the run
it stopped in, and finished runs are only re-evaluated.
"""

from __future__ import annotations

import csv
import logging
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch

from medmodal.atomic import atomic_write_text
from medmodal.data.case import BRATS_MODALITIES, BRATS_REGIONS
from medmodal.engine.datamodule import phantom_dir
from medmodal.engine.evaluate import write_evaluation
from medmodal.engine.parallel import default_jobs, run_jobs, threads_per_job, worker_setup
from medmodal.engine.plugin import get_method
from medmodal.engine.recipe import Recipe, builtin_recipe_path, load_recipe
from medmodal.engine.run import RunError
from medmodal.engine.runinfo import load_run
from medmodal.engine.train import train_or_resume
from medmodal.evaluation.compare import collapsed_regions, paired_comparison, paired_markdown
from medmodal.evaluation.report import (
    SYNTHETIC_NOTE,
    SummaryRow,
    markdown_table,
    plot_heatmap,
    plot_training_curves,
    summarise,
    write_rows,
)
from medmodal.evaluation.subsets import SubsetResult

log = logging.getLogger("medmodal")


@dataclass(frozen=True)
class QuickstartModel:
    """One model of the comparison: a display name, a run-folder key and its built-in recipes."""

    name: str
    key: str
    recipe: str
    fast_recipe: str
    overrides: dict = field(default_factory=dict)


MODELS = (
    QuickstartModel("zero-fill U-Net", "zero_fill", "quickstart", "quickstart_fast"),
    QuickstartModel("ShaSpec", "shaspec", "quickstart_shaspec", "quickstart_shaspec_fast"),
)
SEEDS = (0, 1, 2, 3, 4)


def _reference_models(modalities: Sequence[str], weakest: str) -> tuple[QuickstartModel, ...]:
    """Dedicated upper references (ShaSpec paper, Table 2's setting): the baseline network trained for one
    fixed subset, without modality dropout: all modalities, and the weakest single one."""
    return tuple(
        QuickstartModel(f"dedicated U-Net ({'+'.join(sub)})", f"dedicated_{'_'.join(sub)}", "quickstart",
                        "quickstart_fast", {"data.modalities": list(sub), "method.modality_dropout": 0.0})
        for sub in (tuple(modalities), (weakest,))
    )


def summarise_over_seeds(rows: list[SubsetResult]) -> list[SummaryRow]:
    """Mean ± std **over seeds** of the per-seed mean Dice over cases, per (model, subset, region).

    ``rows[i].model`` must be ``"<model>@<seed>"`` (one run per model and seed).
    """
    per_run = summarise(rows)
    groups: dict[tuple[str, str, int, str], list[SummaryRow]] = defaultdict(list)
    for s in per_run:
        groups[(s.model.split("@")[0], s.subset, s.n_modalities, s.region)].append(s)
    out = []
    for (model, subset, n, region), ss in groups.items():
        d = np.array([s.dice_mean for s in ss])
        finite = np.array([s.hd95_median for s in ss if np.isfinite(s.hd95_median)])
        out.append(SummaryRow(
            model=model, subset=subset, n_modalities=n, region=region, n_cases=sum(s.n_cases for s in ss),
            dice_mean=float(d.mean()), dice_std=float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            hd95_median=float(np.median(finite)) if finite.size else float("nan"),
            hd95_undefined=sum(s.hd95_undefined for s in ss),
        ))
    return out


def _mean_over_subsets(rows: Sequence[SubsetResult]) -> dict[str, float]:
    """One run's rows → per region, the mean over subsets of the mean Dice over cases."""
    by_region: dict[str, list[float]] = defaultdict(list)
    for s in summarise(rows):
        by_region[s.region].append(s.dice_mean)
    return {r: float(np.mean(v)) for r, v in by_region.items()}


def _per_seed_table(runs: dict[tuple[str, int], list[SubsetResult]], collapsed: dict[tuple[str, int], list[str]],
                    models: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """Markdown: mean Dice over the subsets per model, region and seed; a run that collapsed is marked †."""
    means = {key: _mean_over_subsets(rows) for key, rows in runs.items()}
    regions = list(means[(models[0], seeds[0])])
    head = ["model", "region", *(f"seed {s}" for s in seeds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        for r in regions:
            cells = [f"{means[(m, s)][r]:.3f}" + (" †" if r in collapsed[(m, s)] else "") for s in seeds]
            lines.append(f"| {m} | {r} | " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class _Job:
    model: QuickstartModel
    seed: int
    recipe: Recipe
    run_dir: Path


def _train_and_evaluate(job: _Job, *, overwrite: bool, progress: bool, threads: int | None) -> tuple:
    """Train (or resume) one run and evaluate it; returns ``(rows, training seconds)``. Runs in a worker
    process when the quickstart trains several runs at once."""
    worker_setup(threads)  # a worker process: quiet, and the thread share it was given
    t = time.perf_counter()
    train_or_resume(job.recipe, job.run_dir, overwrite=overwrite)
    seconds = time.perf_counter() - t
    run = load_run(job.run_dir)
    plugin = get_method(run.info.method)
    rows, details, synthetic, _ = plugin.evaluation_rows(run, split="val", progress=progress,
                                                         model_name=f"{job.model.name}@{job.seed}")
    write_evaluation(rows, job.run_dir / "eval", title=f"{run.recipe.name}: Dice per modality subset",
                     synthetic=synthetic, details=details)
    return rows, seconds


def _jobs_for(models: Sequence[QuickstartModel], seeds: Sequence[int], *, out: Path, fast: bool,
              overrides: dict | None, threads: int | None, jobs: int) -> list[_Job]:
    todo = []
    for model in models:
        name = model.fast_recipe if fast else model.recipe
        scaled = _scaled_phases(load_recipe(builtin_recipe_path(name)), overrides or {})
        for seed in seeds:
            extra: dict = {**model.overrides, **scaled, **(overrides or {}), "seed": seed}
            if threads is not None:
                extra["train.threads"] = threads
            recipe = load_recipe(builtin_recipe_path(name), overrides=extra)
            recipe.train.progress = not fast and jobs == 1
            todo.append(_Job(model, seed, recipe, out / "runs" / f"{model.key}_seed{seed}"))
    return todo


def _scaled_phases(recipe: Recipe, overrides: dict) -> dict:
    """``--set train.max_steps=N`` applies to both models; a model whose recipe has training phases (ShaSpec's
    full-modality warm-up) gets them scaled to N in the same proportions, the last phase taking the rest."""
    phases = getattr(recipe.method, "phases", None)
    steps = overrides.get("train.max_steps")
    if not phases or steps is None or "method.phases" in overrides:
        return {}
    total = sum(p.steps for p in phases)
    try:
        steps = int(steps)
    except (TypeError, ValueError):
        return {}  # the recipe's validation names the bad value
    new = [max(1, round(p.steps * steps / total)) for p in phases[:-1]]
    new.append(steps - sum(new))
    if new[-1] < 1:
        return {}  # too few steps for the phases: let the recipe check say so
    return {"method.phases": [{"steps": n, "sampler": p.sampler} for n, p in zip(new, phases, strict=True)]}


def run_quickstart(out: Path, *, fast: bool = False, overwrite: bool = False, jobs: int | None = None,
                   seeds: Sequence[int] | None = None, overrides: dict | None = None,
                   references: bool = False) -> Path:
    """Run the main job into ``out`` and return the path of ``out/report.md``.

    An interrupted quickstart resumes where it stopped (training from its last checkpoint; a finished training
    is only evaluated); a finished quickstart is kept unless ``overwrite``. ``jobs`` runs are trained at once,
    each in its own process with ``cores // jobs`` threads (default :func:`default_jobs`; 1 = one after the
    other in this process, with progress bars).

    Args:
        seeds: the seeds (default :data:`SEEDS`; ``fast``: the first only).
        overrides: recipe overrides applied to **both** models (``{"train.lr": 0.002}``).
        references: also train the dedicated upper references (:func:`_reference_models`) on every seed: a
            model trained for all modalities and one for the single modality the baseline segments worst.
    """
    out = Path(out)
    report = out / "report.md"
    if report.exists() and not overwrite:
        raise RunError(f"{report}: a finished quickstart is there; pass --overwrite or choose another --out")
    seeds = tuple(seeds) if seeds is not None else (SEEDS[:1] if fast else SEEDS)
    if not seeds or len(set(seeds)) != len(seeds):
        raise RunError(f"--seeds must name distinct seeds, got {list(seeds)}")
    n_runs = len(MODELS) * len(seeds)
    jobs = default_jobs(n_runs) if jobs is None else jobs
    if jobs < 1:
        raise RunError(f"--jobs must be at least 1, got {jobs}")
    t0 = time.perf_counter()
    threads = threads_per_job(jobs)
    todo = _jobs_for(MODELS, seeds, out=out, fast=fast, overrides=overrides, threads=threads, jobs=jobs)
    results = _run_jobs(todo, jobs=jobs, overwrite=overwrite, progress=not fast and jobs == 1, threads=threads)
    recipes = {job.model.name: job.recipe for job in todo}
    timings: dict[str, float] = defaultdict(float)
    runs: dict[tuple[str, int], list[SubsetResult]] = {}
    for job, (job_rows, seconds) in zip(todo, results, strict=True):
        runs[(job.model.name, job.seed)] = job_rows
        timings[job.model.name] += seconds
    names = [m.name for m in MODELS]
    full = max((r for rs in runs.values() for r in rs), key=lambda r: r.n_modalities).subset
    collapsed = {key: collapsed_regions(rows, subset=full) for key, rows in runs.items()}
    for (model, seed), regions in collapsed.items():
        if regions:
            log.warning("quickstart: %s, seed %d never finds %s with all modalities (collapsed run); it is left "
                        "out of the paired comparison", model, seed, ", ".join(regions))

    reference_rows: dict[tuple[str, int], list[SubsetResult]] = {}
    weakest = None
    if references:
        weakest = _weakest_single(runs, names[0], collapsed)
        ref_models = _reference_models(full.split("+"), weakest)
        ref_todo = _jobs_for(ref_models, seeds, out=out, fast=fast, overrides=overrides, threads=threads, jobs=jobs)
        for job, (job_rows, seconds) in zip(ref_todo, _run_jobs(ref_todo, jobs=jobs, overwrite=overwrite,
                                                                 progress=not fast and jobs == 1, threads=threads),
                                            strict=True):
            reference_rows[(job.model.name, job.seed)] = job_rows
            timings[job.model.name] += seconds
            recipes[job.model.name] = job.recipe
    t_total = time.perf_counter() - t0

    rows = [r for rs in runs.values() for r in rs]
    summary = summarise_over_seeds(rows)
    write_rows(rows + [r for rs in reference_rows.values() for r in rs], out / "subsets.csv")
    write_rows(summary, out / "summary.csv")
    # Per region, the seeds where neither model's run collapsed in that region.
    regions = list(dict.fromkeys(r.region for r in rows))
    kept = {reg: [s for s in seeds if not any(reg in collapsed[(m, s)] for m in names)] for reg in regions}
    comparison = []
    for reg in regions:
        if kept[reg]:
            comparison += paired_comparison(
                {s: [r for r in runs[(names[0], s)] if r.region == reg] for s in kept[reg]},
                {s: [r for r in runs[(names[1], s)] if r.region == reg] for s in kept[reg]},
            )
    if comparison:
        write_rows(comparison, out / "comparison.csv")
    plot_heatmap(summary, out / "dice_heatmap.png",
                 title=f"mean Dice over {len(seeds)} seed(s), held-out phantom cases (synthetic)")
    figures = []
    for model in MODELS:
        run_dir = out / "runs" / f"{model.key}_seed{seeds[0]}"
        fig = out / f"training_curves_{model.key}.png"
        plot_training_curves(run_dir / "metrics.csv", fig, title=f"{model.name}, seed {seeds[0]}")
        figures.append(f"![{model.name} training]({fig.name})")
    from medmodal.engine.datamodule import prepare_cache, resolve_source
    from medmodal.methods.shaspec.features import write_feature_picture

    shaspec_run = load_run(out / "runs" / f"shaspec_seed{seeds[0]}")
    index = prepare_cache(resolve_source(shaspec_run.recipe.data), progress=False)
    cases = list(index.subset(shaspec_run.split("val")).cases)
    scores = write_feature_picture(shaspec_run.network(), cases, out, modalities=shaspec_run.info.modalities,
                                   roi_size=shaspec_run.info.inference["roi_size"],
                                   title="ShaSpec features of held-out phantom cases (seed 0)")
    costs = {name: _cost(recipe) for name, recipe in recipes.items()}
    text = _report_text(
        recipes, names, summary, figures, scores, seeds=seeds, n_cases=len({r.case_id for r in rows}),
        timings=timings, t_total=t_total, jobs=jobs, runs=runs, collapsed=collapsed, kept=kept,
        comparison=comparison, costs=costs,
        references=_reference_lines(runs, reference_rows, names, weakest, full),
    )
    atomic_write_text(report, text)
    return report


def _cost(recipe: Recipe) -> str:
    """Parameters and FLOPs per training step of ``recipe``'s network (per process batch, training patch)."""
    from medmodal.networks.cost import network_cost
    from medmodal.networks.registry import create_network

    mods = recipe.data.modalities or BRATS_MODALITIES
    net = create_network(recipe.model.name, spatial_dims=len(recipe.data.patch_size), modalities=tuple(mods),
                         out_channels=len(BRATS_REGIONS), **recipe.model.kwargs)
    return network_cost(net, batch=recipe.data.batch_size, modalities=len(mods),
                        patch=recipe.data.patch_size).describe()


def _weakest_single(runs: dict, baseline: str, collapsed: dict) -> str:
    """The single modality whose subset the baseline segments worst (mean Dice over regions, cases and
    the seeds whose run did not collapse)."""
    baseline_runs = [key for key in runs if key[0] == baseline]
    kept = [key for key in baseline_runs if not collapsed[key]] or baseline_runs  # all collapsed: take them all
    scores: dict[str, list[float]] = defaultdict(list)
    for key in kept:
        for r in runs[key]:
            if r.n_modalities == 1:
                scores[r.subset].append(r.dice)
    return min(scores, key=lambda s: float(np.mean(scores[s])))


def _reference_lines(runs, reference_rows, names, weakest, full) -> list[str]:
    """Markdown: each dedicated reference on its own subset next to both models on that subset."""
    if not reference_rows:
        return []
    lines = [
        "## Dedicated upper references",
        "",
        f"Zero-fill U-Nets of the baseline's widths trained (without modality dropout) for one fixed subset only: "
        f"all four modalities, and `{weakest}`, the single modality the baseline segments worst. Each is evaluated "
        "on its own subset of the same held-out cases; mean ± std over seeds of the mean Dice over cases (every "
        "run included, collapsed or not).",
        "",
        "| subset | region | " + " | ".join(names) + " | dedicated |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for subset in (full, weakest):
        ref_name = next(m for (m, _) in reference_rows if m.endswith(f"({subset})"))
        regions = list(dict.fromkeys(r.region for rows in reference_rows.values() for r in rows))
        for region in regions:
            cells = []
            for name in [*names, ref_name]:
                source = reference_rows if name == ref_name else runs
                per_seed = [np.mean([r.dice for r in rows if r.subset == subset and r.region == region])
                            for (m, _), rows in source.items() if m == name]
                per_seed = np.asarray([v for v in per_seed if np.isfinite(v)])
                cells.append(f"{per_seed.mean():.3f} ± {per_seed.std(ddof=1) if per_seed.size > 1 else 0.0:.3f}")
            lines.append(f"| {subset} | {region} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _run_jobs(todo: list[_Job], *, jobs: int, overwrite: bool, progress: bool, threads: int | None) -> list:
    """Results of :func:`_train_and_evaluate` for every job, in order; ``jobs`` at once in worker processes."""
    if jobs > 1:
        # Build the shared phantom and cache once here, so that the workers never race to write them.
        from medmodal.engine.datamodule import prepare_cache, resolve_source

        sources = {}
        for job in todo:
            source = resolve_source(job.recipe.data)
            sources.setdefault(source.cache_dir, source)
        for source in sources.values():
            prepare_cache(source, progress=progress)
    # Longest runs (ShaSpec, about twice the baseline's cost per step) first, so that the pool ends together.
    order = sorted(range(len(todo)), key=lambda i: todo[i].model.key != "shaspec") if jobs > 1 else range(len(todo))
    results = run_jobs(_train_and_evaluate, [todo[i] for i in order], jobs=jobs, what="quickstart",
                       describe=lambda job: f"{job.model.name}, seed {job.seed}", overwrite=overwrite,
                       progress=progress if jobs == 1 else False, threads=None if jobs == 1 else threads)
    out: list = [None] * len(todo)
    for i, result in zip(order, results, strict=True):
        out[i] = result
    return out


def _report_text(recipes, names, summary, figures, scores, *, seeds, n_cases, timings, t_total, jobs, runs,
                 collapsed, kept, comparison, costs, references) -> str:
    base = recipes[names[0]]
    ph, tr = base.data.phantom, base.train
    a, b = names
    lines = [
        "# medmodal quickstart: ShaSpec vs the zero-fill baseline with missing modalities",
        "",
        SYNTHETIC_NOTE,
        "",
        f"Both models train on the same {ph.cases} phantom cases ({ph.spatial_dims}D, {ph.size} voxels per axis, "
        f"cached in `{phantom_dir(ph)}`) with the same budget ({tr.max_steps} steps, batch "
        f"{base.data.batch_size}, patch {'×'.join(map(str, base.data.patch_size))}), the same loss rule and the "
        f"same encoder widths, and are evaluated on the held-out cases of each seed's split under every non-empty "
        f"subset of {{t1, t1c, t2, flair}}.",
        "",
    ]
    for name in recipes:
        r = recipes[name]
        lines.append(f"- **{name}**: `{r.model.name}` {r.model.kwargs}, {costs[name]}; method `{r.method.name}` "
                     f"({_method_summary(r)}); training {timings[name] / 60:.1f} min for {len(seeds)} seed(s) "
                     "(summed over runs)")
    lines += [
        f"- seeds {list(seeds)} (each seed draws its own train/validation split, the same for both models); "
        f"{n_cases} distinct held-out cases over all seeds",
        f"- total time {t_total / 60:.1f} min, {jobs} run(s) at a time with "
        f"{base.train.threads or torch.get_num_threads()} CPU thread(s) each, "
        f"{platform.processor() or platform.machine()}; {date.today().isoformat()}",
        "",
        "## Runs that did not learn",
        "",
    ]
    bad = {key: regions for key, regions in collapsed.items() if regions}
    if bad:
        lines += [f"- **{m}, seed {s}** never finds {', '.join(regions)} with all four modalities (every held-out "
                  "case scores exactly 0, or 1 where the region is absent)" for (m, s), regions in bad.items()]
        lines += ["", "Left out of the paired comparison below, per region (a seed is dropped for both models when "
                  "either run collapsed in that region): "
                  + "; ".join(f"{reg}: {sorted(set(seeds) - set(k)) or 'none'}" for reg, k in kept.items()) + ".", ""]
    else:
        lines += ["None: with all four modalities every run finds every region in some held-out case.", ""]
    lines += [
        "## Mean Dice over the 15 subsets, per seed",
        "",
        "A run that collapsed is marked †. A region empty in both the prediction and the reference counts as "
        "Dice 1 (BraTS convention), so a model that never predicts a region still scores the fraction of held-out "
        "cases without it.",
        "",
        *_per_seed_table(runs, collapsed, names, seeds),
        "",
        f"## {b} against {a}, paired",
        "",
    ]
    if comparison:
        lines += [
            "Per region, over the seeds where neither run collapsed in it: mean ± std over seeds of each model's "
            "mean Dice over held-out cases; the paired difference per seed (in how many seeds ShaSpec was ahead); a "
            "two-sided Wilcoxon signed-rank test over the (seed, case) pairs (zero differences dropped). The "
            "pairs of one case are not independent across subsets and regions, and there are 45 tests: read "
            "the p-values as a screen.",
            "",
            paired_markdown(comparison, a=a, b=b),
            "",
        ]
    else:
        lines += ["No seed where both runs learned: nothing to compare.", ""]
    lines += [
        *references,
        "## Dice per modality subset",
        "",
        "Each cell: mean over all seeds (collapsed runs included) of the mean Dice over held-out cases ± std "
        "over seeds.",
        "",
        "![Dice per subset](dice_heatmap.png)",
        "",
        markdown_table(summary),
        "",
        "## ShaSpec features",
        "",
        f"t-SNE of pooled bottleneck features of held-out windows. Silhouette score by modality: shared "
        f"{scores['shared']:.3f}, specific {scores['specific']:.3f} (the paper's claim: shared features mix, "
        "specific ones separate, i.e. shared well below specific).",
        "",
        "![ShaSpec features](features.png)",
        "",
        "## Training",
        "",
        *figures,
        "",
        "Run folders (recipe, metrics.csv, checkpoints, weights, per-run evaluation) are under `runs/`; "
        "per-case rows in `subsets.csv`, the per-subset means in `summary.csv`, the paired comparison in "
        "`comparison.csv`.",
        "",
    ]
    return "\n".join(lines)


def _method_summary(recipe: Recipe) -> str:
    m = recipe.method
    if m.name == "shaspec":
        phases = ", ".join(f"{p.steps} {p.sampler}" for p in m.phases or []) or "random subsets throughout"
        return f"α={m.alpha}, β={m.beta}, {m.subset_sampler} subsets per {m.sample_per}; phases: {phases}"
    return f"modality dropout {m.modality_dropout}" if hasattr(m, "modality_dropout") else m.name


def read_summary(path: Path) -> list[dict[str, str]]:
    """Rows of a quickstart ``summary.csv`` as dicts (for tests and scripts)."""
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))
