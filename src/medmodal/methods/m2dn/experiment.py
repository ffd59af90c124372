"""``medmodal experiment m2dn``: M2DN against three baselines on the phantom, and what completion does to
segmentation (issue 12, items 4-5; spec ``shared/methods/m2dn.md`` §4).

Per seed, on the same 2D phantom slices and split (the recipe ``m2dn_tiny``):

1. train M2DN and the direct-regression baseline (same network with the mask as input and no timestep, one
   forward pass; same data, steps and optimiser);
2. score both, zero fill and the mean of the available channels on every missing scenario of the held-out cases
   (PSNR/SSIM/MAE, paired Wilcoxon of M2DN against each over (seed, case) pairs);
3. train a ShaSpec and a zero-fill segmenter on the same slices, then on the same held-out cases compare the
   Dice with the missing modalities left missing against the Dice with them completed by M2DN, and by the
   regression baseline. A completed channel is z-scored over the voxels where the given channels are non-zero,
   the voxels the cache z-scored them over: on skull-stripped data (zero background) that is exactly what
   ``synthesize`` then ``predict`` do; on the phantom, whose air holds noise, a file round trip would leave the
   synthesised background at 0 (the foreground mean after ``predict``'s z-score), which docs/m2dn.md measures.

Everything lands in ``OUT/report.md`` with the tables and figures; an interrupted experiment resumes its runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmodal.atomic import atomic_write_text
from medmodal.engine.recipe import Recipe, builtin_recipe_path, load_recipe
from medmodal.engine.run import RunError
from medmodal.engine.runinfo import load_run
from medmodal.engine.train import train_or_resume

log = logging.getLogger("medmodal")

SEEDS = (0, 1, 2)
#: the downstream segmenters: run-folder name → (method, method-section fields). Two cope with missing contrasts
#: (trained with random subsets); ``all4`` is a zero-fill U-Net trained on complete exams only (no modality
#: dropout), the segmenter that needs every contrast and for which completion is meant.
SEGMENTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "shaspec": ("shaspec", {}),
    "zero_fill": ("zero_fill", {}),
    "all4": ("zero_fill", {"modality_dropout": 0.0}),
}


@dataclass
class _Completed:
    """A cached case whose image was replaced (the completed exam), for the segmentation evaluators."""

    case_id: str
    geometry: Any
    available: np.ndarray
    array: np.ndarray
    labels: np.ndarray | None

    def image(self) -> np.ndarray:
        return self.array

    def label(self) -> np.ndarray | None:
        return self.labels


def m2dn_recipe(seed: int, *, fast: bool, overrides: dict[str, Any] | None = None,
                mode: str = "diffusion") -> Recipe:
    """The ``m2dn_tiny`` recipe for ``seed`` (``mode`` regression: the direct-regression baseline)."""
    extra: dict[str, Any] = {"seed": seed, "method.mode": mode, "train.progress": False, **(overrides or {})}
    if fast:
        extra.update({"data.phantom.cases": 24, "train.max_steps": 6, "train.val_every_steps": 6,
                      "method.timesteps": 20, "method.beta_schedule": "cosine", "method.sample_steps": 4,
                      "method.val_steps": 2,
                      "model.kwargs.width": 8, "model.kwargs.channels": [8, 8], "model.kwargs.time_dim": 16,
                      "data.patch_size": [32, 32], "data.phantom.size": 32, "eval.max_cases": 3})
    return load_recipe(builtin_recipe_path("m2dn_tiny"), overrides=extra)


def segmenter_recipe(name: str, base: Recipe, *, fast: bool) -> Recipe:
    """The segmenter ``name`` (:data:`SEGMENTERS`) on exactly ``base``'s data, seed and split (so the held-out
    cases are shared)."""
    method, fields = SEGMENTERS[name]
    steps = 8 if fast else 400
    doc = {
        "name": f"m2dn_downstream_{name}",
        "seed": base.seed,
        "data": base.data.model_dump(mode="json", exclude={"augmentation"}) | {"foreground_fraction": 1 / 3},
        "model": {"name": "shaspec" if method == "shaspec" else "unet",
                  "kwargs": {"channels": [8, 16] if fast else [16, 32, 64, 128]}},
        "method": {"name": method, **fields},
        "train": {"max_steps": steps, "optimizer": "sgd", "lr": 0.01, "momentum": 0.99, "schedule": "poly",
                  "val_every_steps": steps, "checkpoint_every_steps": max(1, steps // 4), "progress": False},
        "eval": {"overlap": 0.0},
    }
    return Recipe.model_validate(doc)


def zscore_in(values: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``values`` z-scored over ``region`` (bool, same shape), 0 outside it; float32."""
    out = np.zeros(values.shape, dtype=np.float32)
    if region.any():
        v = values[region].astype(np.float64)
        out[region] = (v - v.mean()) / max(float(v.std()), 1e-8)
    return out


def completed_cases(run_dir: Path, cases: Sequence, patterns: Sequence[tuple[bool, ...]]) -> list[list[_Completed]]:
    """Per case, per pattern: the case with the pattern's missing modalities replaced by the run's synthesis
    ([0, 1] inside the foreground, 0 outside), z-scored over the voxels where the given channels are non-zero."""
    from medmodal.methods.m2dn import diffusion_of
    from medmodal.methods.m2dn.data import CaseIntensity, to_unit
    from medmodal.methods.m2dn.inference import case_generator, fill_case, inference_device, settings_from

    run = load_run(run_dir)
    inf = run.info.inference
    device = inference_device()
    network, diffusion, settings = run.network().to(device), diffusion_of(inf), settings_from(inf)
    out = []
    for case in cases:
        image = np.asarray(case.image(), dtype=np.float32)
        present = np.asarray(case.available, dtype=bool)
        stats = CaseIntensity.of_case(image, present, percentiles=tuple(inf["percentiles"]))
        fg = stats.foreground(image, present)
        gen = case_generator(settings.seed, case.case_id, device)
        filled = to_unit(fill_case(network, torch.from_numpy(stats.to_model(image, present)), torch.tensor(patterns),
                                   model_dims=int(inf["model_dims"]), mode=inf["mode"], diffusion=diffusion,
                                   settings=settings, batch_size=int(inf["batch_size"]), generator=gen)).numpy()
        label = case.label()
        row = []
        for k, pat in enumerate(patterns):
            done = image.copy()
            region = (image[np.asarray(pat)] != 0).any(axis=0)
            for m in np.flatnonzero(~np.asarray(pat)):
                done[m] = zscore_in(filled[k, m] * fg, region)
            row.append(_Completed(case.case_id, case.geometry, np.ones_like(present), done,
                                  None if label is None else np.asarray(label)))
        out.append(row)
    return out


def downstream_rows(seg_dir: Path, cases: Sequence, completed: list[list[_Completed]],
                    patterns: Sequence[tuple[bool, ...]]) -> tuple[list, list]:
    """``(left missing, completed)`` per-case Dice rows of one segmentation run, with the same
    (case, subset, region) keys."""
    from medmodal.evaluation.inference import recorded_settings
    from medmodal.evaluation.subsets import evaluate_subsets

    run = load_run(seg_dir)
    network = run.network()
    mods = list(run.info.modalities)
    regions = {k: tuple(v) for k, v in run.info.task.regions.items()}
    window = recorded_settings(run.info.inference, task_kind=run.info.task.kind)
    subsets = [tuple(m for m, a in zip(mods, p, strict=True) if a) for p in patterns]
    kw = dict(modalities=mods, regions=regions, roi_size=window["roi_size"], overlap=window["overlap"],
              blend=window["blend"], sw_batch_size=window["sw_batch_size"], channels_last=window["channels_last"],
              progress=False)
    missing = evaluate_subsets(network, cases, subsets=subsets, model_name="left missing", **kw)
    done = []
    for row in completed:
        for k, case in enumerate(row):
            got = evaluate_subsets(network, [case], subsets=[tuple(mods)], model_name="completed by M2DN", **kw)
            done += [replace(r, subset="+".join(subsets[k]), n_modalities=len(subsets[k])) for r in got]
    return missing, done


def run_m2dn_experiment(out: Path, *, seeds: Sequence[int] = SEEDS, fast: bool = False, overwrite: bool = False,
                        overrides: dict[str, Any] | None = None) -> Path:
    """Train, evaluate and report (see the module docstring); returns ``out/report.md``."""
    from medmodal.engine.cases import evaluation_cases
    from medmodal.evaluation.compare import MEAN_OVER_SUBSETS, paired_comparison, paired_markdown
    from medmodal.evaluation.synthesis import (
        METRIC_DEFINITION,
        all_scenarios,
        write_synthesis_report,
    )
    from medmodal.methods.m2dn.evaluate import synthesis_rows

    out = Path(out)
    report = out / "report.md"
    if report.is_file() and not overwrite:
        raise RunError(f"{report} exists; pass --overwrite to run the experiment again")
    out.mkdir(parents=True, exist_ok=True)
    rows: list = []
    downstream: dict[str, tuple[dict[int, list], dict[int, list]]] = {s: ({}, {}) for s in SEGMENTERS}
    downstream_reg: dict[str, dict[int, list]] = {s: {} for s in SEGMENTERS}
    split_hashes: dict[int, str] = {}
    for seed in seeds:
        recipe = m2dn_recipe(seed, fast=fast, overrides=overrides)
        m2dn_dir = train_or_resume(recipe, out / f"m2dn@{seed}", overwrite=overwrite)
        reg_dir = train_or_resume(m2dn_recipe(seed, fast=fast, overrides=overrides, mode="regression"),
                           out / f"regression@{seed}", overwrite=overwrite)
        m2dn_run, reg_run = load_run(m2dn_dir), load_run(reg_dir)
        split_hashes[seed] = m2dn_run.split_hash()
        cases, _, _ = evaluation_cases(m2dn_run, split="val", data=None, progress=False)
        figures = out / "figures" if seed == seeds[0] else None
        seed_rows = synthesis_rows(m2dn_run, cases, model_name="m2dn", figures_dir=figures)
        seed_rows += synthesis_rows(reg_run, cases, model_name="regression", baselines=False)
        rows += [replace(r, case_id=f"{seed}/{r.case_id}") for r in seed_rows]
        patterns = all_scenarios(len(m2dn_run.info.modalities))
        completed = completed_cases(m2dn_dir, cases, patterns)
        by_regression = completed_cases(reg_dir, cases, patterns)
        for name in SEGMENTERS:
            seg_dir = train_or_resume(segmenter_recipe(name, recipe, fast=fast), out / f"{name}@{seed}",
                               overwrite=overwrite)
            if load_run(seg_dir).split("val") != m2dn_run.split("val"):
                raise RunError(f"{seg_dir} holds out other cases than {m2dn_dir}; remove both and rerun")
            left, done = downstream_rows(seg_dir, cases, completed, patterns)
            downstream[name][0][seed], downstream[name][1][seed] = left, done
            downstream_reg[name][seed] = downstream_rows(seg_dir, cases, by_regression, patterns)[1]
    synth = write_synthesis_report(
        rows, out / "synthesis", reference_model="m2dn", title="M2DN vs baselines: synthesis per missing scenario",
        details=[f"seeds: {', '.join(map(str, seeds))}; cases are (seed, held-out case) pairs; splits (SHA-1 of "
                 f"split.json's ids): {', '.join(f'{s}: {h}' for s, h in split_hashes.items())}",
                 f"M2DN: {m2dn_run.info.inference['sampler'].upper()} "
                 f"{m2dn_run.info.inference['steps'] or m2dn_run.info.inference['timesteps']} steps; regression: "
                 "the same network with the mask as input and no timestep, one pass, same budget"],
        synthetic=True)
    text = [f"# M2DN experiment ({'fast smoke version' if fast else 'recipe m2dn_tiny'})", "",
            "**Data: synthetic phantom** (2D slices; every contrast a function of the anatomy). The numbers show how "
            "the models compare here, nothing about real MRI.", "",
            f"- seeds: {', '.join(map(str, seeds))} (splits: "
            f"{', '.join(f'{s} {h}' for s, h in split_hashes.items())}); runs in this folder (`m2dn@S`, "
            f"`regression@S`, and the segmenters {', '.join(f'`{n}@S`' for n in SEGMENTERS)})",
            f"- synthesis tables (every scenario, PSNR/SSIM/MAE, Wilcoxon): [{synth.relative_to(out)}]"
            f"({synth.relative_to(out)}); figures: `figures/`", "", f"*{METRIC_DEFINITION}*", ""]
    text += _summary_lines(rows)
    text += ["", "## Segmentation with the missing modalities left missing vs completed", "",
             "Dice per subset of given modalities (held-out cases; mean ± std over seeds of the per-seed mean; "
             "difference: completed − left missing; p: Wilcoxon signed-rank over (seed, case) pairs). A completed "
             "channel is z-scored over the voxels where the given channels are non-zero, as the cache z-scored the "
             "given ones. `shaspec` and `zero_fill` were trained with random missing modalities (their own way of "
             "coping); `all4` is a zero-fill U-Net trained on complete exams only, which sees a missing contrast as "
             "a zero channel it never met in training.", ""]
    for name in SEGMENTERS:
        left, done = downstream[name]
        paired = paired_comparison(left, done)
        by_reg = [r for r in paired_comparison(left, downstream_reg[name]) if r.subset == MEAN_OVER_SUBSETS]
        text += [f"### {name}", "", paired_markdown(paired, a="left missing", b="completed by M2DN"), "",
                 "Completed by the regression baseline instead (mean over the 14 subsets):", "",
                 paired_markdown(by_reg, a="left missing", b="completed by regression"), ""]
    atomic_write_text(report, "\n".join(text) + "\n")
    return report


def _summary_lines(rows: Sequence) -> list[str]:
    """A short table: mean PSNR / SSIM / MAE over every (seed, case, scenario, modality) per model."""
    models = list(dict.fromkeys(r.model for r in rows))
    lines = ["## Synthesis, mean over every scenario and synthesised modality", "",
             "| model | PSNR (dB) | SSIM | MAE |", "|---|---|---|---|"]
    for name in models:
        sel = [r for r in rows if r.model == name]
        psnr = np.array([r.psnr for r in sel], dtype=float)
        psnr = psnr[np.isfinite(psnr)]
        lines.append(f"| {name} | {psnr.mean():.2f} | {np.mean([r.ssim for r in sel]):.4f} | "
                     f"{np.mean([r.mae for r in sel]):.4f} |")
    return lines
