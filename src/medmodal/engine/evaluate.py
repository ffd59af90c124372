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


def evaluate_run(
    run_dir: Path,
    *,
    out_dir: Path | None = None,
    split: str = "val",
    subsets: Sequence[Sequence[str]] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> list[SubsetResult]:
    """Evaluate ``run_dir``'s network on ``split`` under every modality subset; writes ``out_dir``.

    Outputs: ``subsets.csv`` (case × subset × region: Dice, HD95), ``summary.csv`` (mean ± std over cases),
    ``report.md`` and ``dice_heatmap.png``. Returns the per-case rows. An existing evaluation in ``out_dir`` is
    replaced only if ``overwrite``.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
    if (out_dir / "report.md").exists() and not overwrite:
        raise RunError(f"{out_dir}: holds an evaluation already; pass --overwrite or choose another --out")
    recipe = load_recipe(run_dir / "recipe.yaml")
    network = load_network(run_dir / "weights")
    cases, source = evaluation_cases(run_dir, recipe, split=split, progress=progress)
    if recipe.eval.max_cases is not None:
        cases = cases[: recipe.eval.max_cases]
    name = model_name or recipe.model.name
    rows = evaluate_subsets(
        network, cases, modalities=source.modalities, regions=dict(source.info.regions),
        roi_size=recipe.eval_roi_size, overlap=recipe.eval.overlap, sw_batch_size=recipe.eval.sw_batch_size,
        subsets=subsets, model_name=name, progress=progress,
    )
    if not rows:
        raise RunError(f"no labelled case to evaluate in split {split!r} of {run_dir}")
    write_evaluation(rows, out_dir, title=f"{recipe.name}: Dice per modality subset",
                     synthetic=source.info.synthetic, details=[f"run: `{run_dir}`", f"split: {split}"])
    return rows


def write_evaluation(
    rows: Sequence[SubsetResult], out_dir: Path, *, title: str, synthetic: bool, details: Sequence[str] = ()
) -> Path:
    """Write ``subsets.csv``, ``summary.csv``, ``dice_heatmap.png`` and ``report.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    write_rows(rows, out_dir / "subsets.csv")
    write_rows(summary, out_dir / "summary.csv")
    plot_heatmap(summary, out_dir / "dice_heatmap.png", title=title + (" (synthetic phantom)" if synthetic else ""))
    n_cases = len({r.case_id for r in rows})
    text = [f"# {title}", ""]
    if synthetic:
        text += [SYNTHETIC_NOTE, ""]
    text += [f"- {d}" for d in details]
    text += [
        f"- cases: {n_cases}; subsets: {len({r.subset for r in rows})}; date: {date.today().isoformat()}",
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
