"""``medmodal evaluate`` on a MultiMix run: classification and segmentation, in-source and cross-source.

The held-out cases of a run (``--split val``, the default) are its in-source **test** cases and its
**cross-source** cases (the sources in ``method.cross_sources``, never seen in training); the validation cases
chose the weights and are not scored. ``--split all`` scores every case of the training data, ``--data DIR``
every case of another data set (grouped by source). Masks are compared on each case's own grid (the prediction is
resized back before thresholding), with the case's pixel spacing. Metrics: :mod:`medmodal.evaluation.multitask`
(scikit-learn and MONAI); their definitions are printed under the tables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmodal.atomic import atomic_write_text, write_csv
from medmodal.data.case import CaseRecord, DataError
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.multimix.inference import CasePrediction, case_input, predict_inputs

log = logging.getLogger("medmodal")

_SEG_KEYS = ("dice", "jaccard", "precision", "recall", "ssim", "avg_hausdorff_mm", "hd95_mm")


def evaluation_groups(run: LoadedRun, records: Sequence[CaseRecord], *, split: str,
                      data: Path | None) -> dict[str, list[CaseRecord]]:
    """The groups of cases scored: ``{"in-source test": …, "cross-source": …}`` for ``split="val"``."""
    if data is not None or split == "all":
        by_source: dict[str, list[CaseRecord]] = {}
        for r in records:
            by_source.setdefault(r.source or "all", []).append(r)
        return by_source
    ids = {r.case_id: r for r in records}
    groups = {}
    for name, key in (("in-source test", "test"), ("cross-source", "cross_source")):
        try:
            wanted = run.split(key)
        except KeyError:
            wanted = []
        missing = [c for c in wanted if c not in ids]
        if missing:
            raise DataError(f"{run.dir}: {len(missing)} {key} case(s) of split.json are not in the data set "
                            f"(e.g. {missing[0]}); evaluate on a data set with --data DIR")
        if wanted:
            groups[name] = [ids[c] for c in wanted]
    if not groups:
        groups["validation"] = [ids[c] for c in run.split("val")]
        log.warning("the run has no test or cross-source cases (method.test_fraction 0, no cross_sources); "
                    "scoring its validation cases, which also chose its weights")
    return groups


def _fmt(v: float, digits: int = 3) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def evaluate_run(run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, progress: bool,
                 model_name: str | None = None, max_figure_cases: int = 4) -> Path:
    """Score ``run`` (see the module docstring); writes ``cases.csv``, ``summary.csv``, ``figure.png`` and
    ``report.md`` to ``out_dir`` and returns the report."""
    from medmodal.data.io import read_case
    from medmodal.engine.cases import run_source
    from medmodal.evaluation.multitask import (
        METRIC_DEFINITIONS,
        MultitaskPanel,
        classification_scores,
        multitask_figure,
        segmentation_scores,
        summarise,
    )
    from medmodal.methods.multimix.selection import selected_network

    source = run_source(run, data)
    info, records = source.records()
    groups = evaluation_groups(run, records, split=split, data=data)
    if run.recipe.eval.max_cases is not None:
        groups = {g: rs[: run.recipe.eval.max_cases] for g, rs in groups.items()}
    network, chosen = selected_network(run.dir, run.info.inference.get("model_selection", "last"))
    task = run.info.task
    region_values = {k: tuple(v) for k, v in task.regions.items()}
    regions, classes = list(region_values), list(task.class_names)
    rows: list[dict[str, Any]] = []
    panels: list[Any] = []
    summaries: dict[str, dict[str, Any]] = {}
    chunk = int(run.info.inference.get("batch_size", 16))
    for group, recs in groups.items():
        # a chunk of cases at a time: full-size images and their full-size outputs are never all in memory
        g_rows: list[dict[str, Any]] = []
        labelled: list[tuple[int, np.ndarray]] = []
        shown = 0  # figure panels of this group
        starts: Any = range(0, len(recs), chunk)
        if progress:
            from rich.progress import track

            starts = track(starts, description=f"evaluating {group}", transient=True)
        for start in starts:
            part = recs[start:start + chunk]
            cases = [read_case(r, info) for r in part]
            preds = predict_inputs(network, [case_input(c, run) for c in cases], inference=run.info.inference)
            for rec, case, pred in zip(part, cases, preds, strict=True):
                row = _case_row(group, rec, case, pred, region_values, classes, segmentation_scores)
                g_rows.append(row)
                if row["_true"] is not None and pred.class_prob is not None:
                    labelled.append((row["_true"], pred.class_prob))
                if shown < max_figure_cases:
                    panels.append(_panel(MultitaskPanel, group, rec, case, pred, classes, region_values))
                    shown += 1
        rows += g_rows
        summary: dict[str, Any] = {}
        if labelled:
            summary["classification"] = classification_scores(
                np.array([t for t, _ in labelled]), np.stack([p for _, p in labelled]), classes)
        keys = [f"{k}_{r}" for r in regions for k in _SEG_KEYS]
        seg_rows = [r for r in g_rows if "dice_" + regions[0] in r] if regions else []
        if seg_rows:
            summary["segmentation"] = summarise(seg_rows, keys)
        summaries[group] = summary
    if not rows:
        raise DataError("no case to evaluate")
    out_dir.mkdir(parents=True, exist_ok=True)
    header = [k for k in rows[0] if not k.startswith("_")]
    for r in rows[1:]:
        header += [k for k in r if not k.startswith("_") and k not in header]
    write_csv(out_dir / "cases.csv", header, [[r.get(k, "") for k in header] for r in rows])
    summary_rows = []
    for group, s in summaries.items():
        for k, v in s.get("classification", {}).items():
            if isinstance(v, (int, float)):
                summary_rows.append([group, k, f"{float(v):.6f}", "", len(groups[group])])
        for k, v in s.get("segmentation", {}).items():
            summary_rows.append([group, k, f"{v.mean:.6f}", f"{v.std:.6f}", v.n])
    write_csv(out_dir / "summary.csv", ["group", "metric", "mean", "std", "n"], summary_rows)
    figure = None
    if panels:
        figure = multitask_figure(panels, out_dir / "figure.png",
                                  title=f"{model_name or run.dir.name}: predicted (dashed) vs true (solid) lung "
                                        "boundaries, saliency")
    text = _report(run, model_name=model_name, chosen=chosen, synthetic=bool(info.synthetic), data=data,
                   split=split, groups=groups, summaries=summaries, rows=rows, regions=regions, classes=classes,
                   figure=figure, definitions=METRIC_DEFINITIONS)
    atomic_write_text(out_dir / "report.md", text)
    return out_dir / "report.md"


def _case_row(group: str, rec: CaseRecord, case: Any, pred: CasePrediction, regions: dict[str, tuple[int, ...]],
              classes: list[str], segmentation_scores: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"case_id": rec.case_id, "group": group, "source": rec.source or ""}
    true = case.target
    row["_true"] = true
    if pred.class_prob is not None:
        k = int(np.argmax(pred.class_prob))
        row.update(true_class=classes[true] if true is not None and true < len(classes) else "",
                   predicted_class=classes[k], probability=f"{float(pred.class_prob[k]):.6f}")
        if true is not None:
            row["correct"] = int(k == true)
    if pred.seg_prob is not None and case.label is not None:
        label = np.asarray(case.label.array)
        spacing = case.label.spacing
        for r, (name, values) in enumerate(regions.items()):
            truth = np.isin(label, values)
            scores = segmentation_scores(pred.seg_prob[r] > 0.5, truth, spacing=spacing)
            for k in _SEG_KEYS:
                row[f"{k}_{name}"] = scores[k]
    return row


def _panel(cls: Any, group: str, rec: CaseRecord, case: Any, pred: CasePrediction, classes: list[str],
           regions: dict[str, tuple[int, ...]]) -> Any:
    image = pred.image[0]
    import torch

    from medmodal.methods.multimix.data import resize

    pred_mask = None
    if pred.seg_prob is not None:
        pred_mask = resize(torch.from_numpy(pred.seg_prob[:1]).float(), image.shape)[0].numpy() > 0.5
    true_mask = None
    if case.label is not None and regions:
        first = next(iter(regions.values()))
        t = np.isin(np.asarray(case.label.array), first).astype(np.float32)
        true_mask = resize(torch.from_numpy(t)[None], image.shape)[0].numpy() > 0.5
    k = None if pred.class_prob is None else int(np.argmax(pred.class_prob))

    def mid(a: np.ndarray | None) -> np.ndarray | None:  # a volume is shown by its middle slice (last axis)
        return a if a is None or a.ndim == 2 else a[..., a.shape[-1] // 2]

    return cls(image=mid(image), group=group, title=rec.case_id + (f" ({rec.source})" if rec.source else ""),
               saliency=mid(pred.saliency_model), pred_mask=mid(pred_mask), true_mask=mid(true_mask),
               pred_class=None if k is None else classes[k],
               probability=None if k is None else float(pred.class_prob[k]),
               true_class=None if case.target is None else classes[case.target])


def _report(run: LoadedRun, *, model_name: str | None, chosen: str, synthetic: bool, data: Path | None, split: str,
            groups: dict[str, list], summaries: dict[str, dict], rows: list[dict], regions: list[str],
            classes: list[str], figure: Path | None, definitions: dict[str, str]) -> str:
    m = run.recipe.method
    lines = [f"# MultiMix evaluation: {model_name or run.dir.name}", ""]
    if synthetic:
        lines += ["**Data: synthetic phantom** (procedurally generated images, not patients).", ""]
    lines += [f"- run: `{run.dir}` (variant {m.variant}; budgets: {m.seg_labels} masks, {m.cls_labels} class "
              "labels)",
              f"- weights: {chosen} (method.model_selection {m.model_selection})",
              f"- cases: {', '.join(f'{g} {len(rs)}' for g, rs in groups.items())} "
              f"({'data ' + str(data) if data else 'split ' + split}; split hash {run.split_hash()})", ""]
    cls_keys = ["accuracy", *(f"f1_{c}" for c in classes), "f1_macro", "roc_auc"]
    if any("classification" in s for s in summaries.values()):
        lines += ["## Classification", "", "| group | n | " + " | ".join(cls_keys) + " |",
                  "|---|---|" + "---|" * len(cls_keys)]
        for g, s in summaries.items():
            c = s.get("classification")
            if c:
                lines.append(f"| {g} | {c.get('n', '')} | " + " | ".join(_fmt(c.get(k, float('nan'))) for k in cls_keys)
                             + " |")
        lines.append("")
    if any("segmentation" in s for s in summaries.values()):
        lines += ["## Segmentation (mean ± std over cases, on each case's own grid)", ""]
        for region in regions:
            lines += [f"Region **{region}**:", "", "| group | n | " + " | ".join(_SEG_KEYS) + " |",
                      "|---|---|" + "---|" * len(_SEG_KEYS)]
            for g, s in summaries.items():
                seg = s.get("segmentation")
                if not seg:
                    continue
                cells, n = [], 0
                for k in _SEG_KEYS:
                    v = seg[f"{k}_{region}"]
                    n = max(n, v.n)
                    cells.append(f"{_fmt(v.mean)} ± {_fmt(v.std)}" + (f" ({v.n_nan} undefined)" if v.n_nan else ""))
                lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
            lines.append("")
    if len(rows) <= 24:
        lines += ["## Per case", "", "| case | group | source | true | predicted | p | "
                  + " | ".join(f"dice_{r}" for r in regions) + " |", "|---|---|---|---|---|---|"
                  + "---|" * len(regions)]
        for r in rows:
            lines.append(f"| {r['case_id']} | {r['group']} | {r['source']} | {r.get('true_class', '')} | "
                         f"{r.get('predicted_class', '')} | {r.get('probability', '')} | "
                         + " | ".join(_fmt(r.get(f'dice_{x}', float('nan'))) for x in regions) + " |")
        lines.append("")
    if figure is not None:
        lines += [f"![cases]({figure.name})", ""]
    lines += ["## Definitions", ""] + [f"- {v}" for v in definitions.values()] + [""]
    return "\n".join(lines)
