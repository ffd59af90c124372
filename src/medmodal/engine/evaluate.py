"""``evaluate``: a trained run evaluated by its method's plug-in, and the report writers the plug-ins share
(segmentation under every modality subset as CSV, Markdown and a heatmap; classification per subset)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from medmodal.atomic import atomic_write_text
from medmodal.engine.plugin import get_method
from medmodal.engine.run import RunError
from medmodal.engine.runinfo import load_run
from medmodal.evaluation.classification import (
    ClassificationResult,
    classification_table,
    summarise_classification,
)
from medmodal.evaluation.report import (
    SYNTHETIC_NOTE,
    markdown_table,
    plot_heatmap,
    summarise,
    write_rows,
)
from medmodal.evaluation.subsets import SubsetResult

log = logging.getLogger("medmodal")


def evaluate_run(
    run_dir: Path,
    *,
    out_dir: Path | None = None,
    split: str = "val",
    data: Path | None = None,
    model_name: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    features: bool = False,
    against: Path | None = None,
) -> Path:
    """Evaluate the run in ``run_dir`` with its method's evaluation; returns ``out_dir/report.md``.

    ``against``: another run of the same method and data, scored on the same cases and tested against this one
    (methods with ``evaluates_against``).

    ``split`` is ``"val"`` (the run's held-out cases) or ``"all"``; ``data`` evaluates on every case of another
    labelled data set instead. ``out_dir`` defaults to ``RUN/eval``; an existing evaluation there is replaced
    only if ``overwrite``. What is written depends on the method (segmentation: ``subsets.csv``,
    ``summary.csv``, ``report.md`` and a heatmap; classification: accuracy per subset).
    """
    run = load_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run.dir / "eval"
    if (out_dir / "report.md").exists() and not overwrite:
        raise RunError(f"{out_dir}: holds an evaluation already; pass --overwrite or choose another --out")
    if split not in ("val", "all"):
        raise RunError(f"--split: expected val or all, got {split!r}")
    plugin = get_method(run.info.method)
    if against is None:
        return plugin.evaluate(run, out_dir=out_dir, split=split, data=data, features=features, progress=progress,
                               model_name=model_name)
    if not plugin.evaluates_against:
        raise RunError(f"--against: the evaluation of method {plugin.name!r} does not compare runs; evaluate each "
                       "run on its own")
    other = load_run(against)
    if other.info.method != run.info.method or tuple(other.info.modalities) != tuple(run.info.modalities):
        raise RunError(f"--against {against}: a {other.info.method} run of {list(other.info.modalities)}; it must be "
                       f"a {run.info.method} run of {list(run.info.modalities)} like {run.dir}")
    return plugin.evaluate(run, out_dir=out_dir, split=split, data=data, features=features, progress=progress,
                           model_name=model_name, against=other)


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
