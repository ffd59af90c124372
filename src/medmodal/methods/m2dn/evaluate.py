"""``medmodal evaluate`` on an M2DN run: every missing scenario of every held-out case, synthesised and scored.

For each case and each availability pattern with at least one given and one missing modality (14 for four
modalities), the run fills the missing ones with its recorded sampler; PSNR, SSIM and MAE of each synthesised
modality against the real one are computed inside the case's foreground on the [0, 1] scale
(:mod:`medmodal.evaluation.synthesis`, definitions printed under every table). Two baselines computed on the same
cases, zero fill and the mean of the available channels, are scored alike, and the report tests the run against
each with a paired Wilcoxon signed-rank test per scenario. A figure per scenario shows one case's middle slice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from medmodal.engine.cases import evaluation_cases
from medmodal.engine.run import RunError
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.m2dn.data import CaseIntensity, to_unit
from medmodal.methods.m2dn.inference import (
    SamplerSettings,
    case_generator,
    case_patterns,
    fill_case,
    inference_device,
    settings_from,
)

log = logging.getLogger("medmodal")


def middle_slice(volume: np.ndarray, spatial_dims: int) -> np.ndarray:
    """``(..., *S)`` → the 2D middle slice along the last axis (a 2D image is returned as is)."""
    return volume if spatial_dims == 2 else volume[..., volume.shape[-1] // 2]


def synthesis_rows(run: LoadedRun, cases: list, *, model_name: str, settings: SamplerSettings | None = None,
                   progress: bool = False, figures_dir: Path | None = None,
                   baselines: bool = True) -> list[Any]:
    """Score ``run`` (and the zero / mean-fill baselines) on cached ``cases`` under every scenario.

    Returns :class:`~medmodal.evaluation.synthesis.SynthesisRow` rows; writes one figure per scenario (the first
    case that has it) to ``figures_dir`` when given.
    """
    from medmodal.evaluation.synthesis import (
        SynthesisRow,
        impute_mean,
        impute_zero,
        scenario_name,
        synthesis_figure,
        synthesis_metrics,
    )
    from medmodal.methods.m2dn import diffusion_of

    device = inference_device()
    network = run.network().to(device)
    inf = run.info.inference
    diffusion = diffusion_of(inf)
    settings = settings or settings_from(inf)
    mods = list(run.info.modalities)
    mode = inf.get("mode", "diffusion")
    net_dims = int(inf.get("model_dims", run.info.spatial_dims))
    how = settings.describe(mode, diffusion.timesteps)
    dims = cases[0].geometry.spatial_dims if cases else run.info.spatial_dims
    rows: list[SynthesisRow] = []
    drawn: set[tuple[bool, ...]] = set()
    total = sum(len(case_patterns(np.asarray(c.available, bool))) for c in cases)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("synthesising every scenario", total=total)
        for case in cases:
            present = np.asarray(case.available, dtype=bool)
            pats = case_patterns(present)
            if not pats:
                log.warning("case %s: has fewer than two modalities; nothing to score", case.case_id)
                continue
            image = np.asarray(case.image(), dtype=np.float32)
            stats = CaseIntensity.of_case(image, present, percentiles=tuple(inf.get("percentiles", (0.5, 99.5))))
            x = torch.from_numpy(stats.to_model(image, present))
            mask = stats.foreground(image, present)
            if not mask.any():
                log.warning("case %s: empty foreground; skipped", case.case_id)
                continue
            avail = torch.tensor(pats)
            gen = case_generator(settings.seed, case.case_id, device)
            filled = fill_case(network, x, avail, model_dims=net_dims, mode=mode, diffusion=diffusion,
                               settings=settings, batch_size=int(inf.get("batch_size", 16)), generator=gen)
            truth = to_unit(x).numpy()
            x_k = x[None].expand(len(pats), *x.shape)
            outputs = {model_name: to_unit(filled).numpy()}
            if baselines:
                outputs["zero fill"] = to_unit(impute_zero(x_k, avail, background=-1.0)).numpy()
                outputs["mean fill"] = to_unit(impute_mean(x_k, avail)).numpy()
            for k, pat in enumerate(pats):
                scen = scenario_name(pat, mods)
                for m in np.flatnonzero(present & ~np.asarray(pat)):
                    for name, out in outputs.items():
                        r = synthesis_metrics(out[k, m], truth[m], mask, spatial_dims=dims)
                        rows.append(SynthesisRow(model=name, scenario=scen, case_id=case.case_id,
                                                 modality=mods[m], psnr=r["psnr"], ssim=r["ssim"], mae=r["mae"]))
                if figures_dir is not None and pat not in drawn and present.all():
                    drawn.add(pat)
                    synthesis_figure(
                        figures_dir / f"scenario_{len(drawn):02d}.png",
                        inputs=middle_slice(truth * np.asarray(pat)[(...,) + (None,) * dims], dims),
                        available=np.asarray(pat), synthesized=middle_slice(outputs[model_name][k], dims),
                        truth=middle_slice(truth, dims), modalities=mods,
                        title=f"{scen} · case {case.case_id} · {how}",
                    )
                bar.advance(task)
    return rows


def model_label(run: LoadedRun) -> str:
    """``m2dn`` for a diffusion run, ``regression`` for the direct-regression baseline."""
    return "m2dn" if run.info.inference.get("mode", "diffusion") == "diffusion" else "regression"


def evaluate_run(run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, progress: bool,
                 model_name: str | None = None, against: LoadedRun | None = None) -> Path:
    """Write ``synthesis.csv``, ``report.md`` and the scenario figures of ``run`` to ``out_dir``; ``against``
    (another M2DN run, e.g. the regression baseline) is scored on the same cases and tested against ``run``."""
    from medmodal.evaluation.synthesis import write_synthesis_report
    from medmodal.methods.m2dn import diffusion_of

    cases, where, synthetic = evaluation_cases(run, split=split, data=data, progress=progress)
    inf = run.info.inference
    name = model_name or model_label(run)
    settings = settings_from(inf)
    rows = synthesis_rows(run, cases, model_name=name, settings=settings, progress=progress,
                          figures_dir=out_dir / "figures")
    other_name = None
    if against is not None:
        other_name = model_label(against)
        if other_name == name:
            other_name = f"{other_name} ({against.dir.name})"
        rows += synthesis_rows(against, cases, model_name=other_name, progress=progress, baselines=False)
    if not rows:
        raise RunError(f"no case with two or more modalities to score ({where}) for {run.dir}")
    details = [f"run: `{run.dir}` (method {run.info.method}, mode {inf.get('mode', 'diffusion')})",
               f"cases: {where}" + (f"; split {run.split_hash()} (SHA-1 of split.json's ids)"
                                    if data is None and split == "val" else ""),
               f"sampler: {settings.describe(inf.get('mode', 'diffusion'), diffusion_of(inf).timesteps)}",
               "baselines computed on the same cases: zero fill, mean of the available channels"
               + (f"; trained: {other_name} (`{against.dir}`, its own sampler)" if against is not None else ""),
               "figures: figures/scenario_NN.png (one case's middle slice per scenario)"]
    return write_synthesis_report(rows, out_dir, reference_model=name, title=f"{run.recipe.name}: synthesis per "
                                  "missing scenario", details=details, synthetic=synthetic)
