"""``evaluate``: a trained run under every modality subset, written as CSV, Markdown and a heatmap."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from medmodal.engine.datamodule import prepare_cache, resolve_source
from medmodal.engine.recipe import Recipe, load_recipe
from medmodal.engine.run import RunError, atomic_write_text, load_network
from medmodal.evaluation.classification import (
    ClassificationResult,
    classification_table,
    evaluate_classification,
    summarise_classification,
)
from medmodal.evaluation.features import collect_features, plot_feature_picture
from medmodal.evaluation.report import (
    SYNTHETIC_NOTE,
    markdown_table,
    plot_heatmap,
    summarise,
    write_rows,
)
from medmodal.evaluation.subsets import SubsetResult, evaluate_subsets

log = logging.getLogger("medmodal")


def evaluation_cases(run_dir: Path, recipe: Recipe, *, split: str, progress: bool) -> tuple[list, object]:
    """The cached cases of ``split`` (``"val"`` from the run's split.json, or ``"all"``) and the source."""
    source = resolve_source(recipe.data)
    index = prepare_cache(source, progress=progress)
    if split == "all":
        return list(index.cases), source
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise RunError(f"{split_file}: not found; evaluate a finished run or pass --split all")
    ids = json.loads(split_file.read_text(encoding="utf-8"))[split]
    return list(index.subset(ids).cases), source


def default_subsets(recipe: Recipe, modalities: Sequence[str]) -> list[tuple[str, ...]] | None:
    """The subsets a run is evaluated on by default: the dedicated subset, or all (``None``)."""
    dedicated = getattr(recipe.method, "dedicated", None)
    if dedicated:
        return [tuple(m for m in modalities if m in dedicated)]
    phases = getattr(recipe.method, "phases", None)
    if phases and all(p.sampler == "full" for p in phases):
        log.warning(
            "this run was trained with all modalities only; expect poor results on subsets "
            "(the 'only white dots' of billhhh/ShaSpec#2) — add a random-subset phase"
        )
    return None


def evaluate_run(
    run_dir: Path,
    *,
    out_dir: Path | None = None,
    split: str = "val",
    subsets: Sequence[Sequence[str]] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    features: bool = False,
) -> list:
    """Evaluate ``run_dir``'s network on ``split`` under every modality subset; writes ``out_dir``.

    Segmentation outputs: ``subsets.csv`` (case × subset × region: Dice, HD95), ``summary.csv`` (mean ± std
    over cases), ``report.md`` and ``dice_heatmap.png``; classification runs write accuracy per subset instead.
    ``features`` adds ShaSpec's feature picture (``features.png``, ``features.json``). Returns the per-case
    rows. An existing evaluation in ``out_dir`` is replaced only if ``overwrite``.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
    if (out_dir / "report.md").exists() and not overwrite:
        raise RunError(f"{out_dir}: holds an evaluation already; pass --overwrite or choose another --out")
    recipe = load_recipe(run_dir / "recipe.yaml")
    network = load_network(run_dir / "weights")
    if features and not hasattr(network, "encode"):
        raise RunError(f"--features needs a ShaSpec run; {run_dir} trained {recipe.model.name!r}")
    cases, source = evaluation_cases(run_dir, recipe, split=split, progress=progress)
    if recipe.eval.max_cases is not None:
        cases = cases[: recipe.eval.max_cases]
    name = model_name or recipe.model.name
    if subsets is None:
        subsets = default_subsets(recipe, source.modalities)
    details = [f"run: `{run_dir}`", f"split: {split} (local held-out cases of the run, not an online benchmark)"]
    if recipe.eval.et_min_voxels:
        details.append(f"post-processing (ShaSpec*): predicted ET under {recipe.eval.et_min_voxels} voxels → necrosis")
    if getattr(recipe.method, "task", "segmentation") == "classification":
        rows: list = evaluate_classification(network, cases, modalities=source.modalities, subsets=subsets,
                                             model_name=name)
        if not rows:
            raise RunError(f"no case with a class target to evaluate in split {split!r} of {run_dir}")
        write_classification(rows, out_dir, title=f"{recipe.name}: accuracy per modality subset",
                             synthetic=source.info.synthetic, details=details)
    else:
        rows = evaluate_subsets(
            network, cases, modalities=source.modalities, regions=dict(source.info.regions),
            roi_size=recipe.eval_roi_size, overlap=recipe.eval.overlap, sw_batch_size=recipe.eval.sw_batch_size,
            subsets=subsets, model_name=name, progress=progress, et_min_voxels=recipe.eval.et_min_voxels,
        )
        if not rows:
            raise RunError(f"no labelled case to evaluate in split {split!r} of {run_dir}")
        write_evaluation(rows, out_dir, title=f"{recipe.name}: Dice per modality subset",
                         synthetic=source.info.synthetic, details=details)
    if features:
        write_feature_picture(network, cases, out_dir, modalities=source.modalities,
                              roi_size=recipe.eval_roi_size, title=f"{recipe.name}: ShaSpec features")
    return rows


def write_feature_picture(
    network, cases: Sequence, out_dir: Path, *, modalities: Sequence[str], roi_size: Sequence[int], title: str
) -> dict[str, float]:
    """``features.png`` (t-SNE of shared and specific features by modality) and ``features.json`` (silhouettes)."""
    fs = collect_features(network, cases, modalities=modalities, roi_size=roi_size)
    scores = plot_feature_picture(fs, out_dir / "features.png", title=title)
    doc = {"silhouette_by_modality": scores, "n_points": int(len(fs.modality)), "cases": len(set(fs.case_id)),
           "note": "pooled bottleneck features of windows; silhouette near 1 = separated by modality, <= 0 = mixed"}
    atomic_write_text(out_dir / "features.json", json.dumps(doc, indent=2))
    log.info("feature picture: silhouette by modality shared %.3f, specific %.3f", scores["shared"],
             scores["specific"])
    return scores


def _report_head(rows: Sequence, *, title: str, synthetic: bool, details: Sequence[str]) -> list[str]:
    """Markdown lines opening an evaluation report: title, synthetic-data note, details, cases and subsets."""
    text = [f"# {title}", ""] + ([SYNTHETIC_NOTE, ""] if synthetic else [])
    text += [f"- {d}" for d in details]
    n_cases, n_subsets = len({r.case_id for r in rows}), len({r.subset for r in rows})
    return text + [f"- cases: {n_cases}; subsets: {n_subsets}; date: {date.today().isoformat()}"]


def write_classification(
    rows: Sequence[ClassificationResult], out_dir: Path, *, title: str, synthetic: bool, details: Sequence[str] = ()
) -> Path:
    """Write ``subsets.csv``, ``summary.csv`` and ``report.md`` of a classification evaluation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise_classification(rows)
    write_rows(rows, out_dir / "subsets.csv")
    write_rows(summary, out_dir / "summary.csv")
    text = _report_head(rows, title=title, synthetic=synthetic, details=details)
    text += ["", classification_table(summary), ""]
    atomic_write_text(out_dir / "report.md", "\n".join(text))
    return out_dir / "report.md"


def write_evaluation(
    rows: Sequence[SubsetResult], out_dir: Path, *, title: str, synthetic: bool, details: Sequence[str] = ()
) -> Path:
    """Write ``subsets.csv``, ``summary.csv``, ``dice_heatmap.png`` and ``report.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    write_rows(rows, out_dir / "subsets.csv")
    write_rows(summary, out_dir / "summary.csv")
    plot_heatmap(summary, out_dir / "dice_heatmap.png", title=title + (" (synthetic phantom)" if synthetic else ""))
    text = _report_head(rows, title=title, synthetic=synthetic, details=details)
    text += [
        "- Dice: mean ± std over cases; a region empty in both prediction and reference counts as Dice 1.",
        "- HD95 (mm) per case is in `subsets.csv`; medians are in `summary.csv`.",
        "",
        "![Dice per subset and region](dice_heatmap.png)",
        "",
        markdown_table(summary),
        "",
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(text))
    log.info("evaluation written to %s", out_dir)
    return out_dir / "report.md"
