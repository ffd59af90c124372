"""``medmodal synthesize`` with an M2DN run: fill each case's missing modalities, write a complete data set.

Each case is preprocessed as in training (reorient to RAS, resample, crop, z-score), mapped to the model's
intensity space with its own percentiles, completed by the run's sampler (a 2D model goes slice by slice along
the canonical last axis, slices batched), and every synthesised modality is mapped back onto the case's input
grid (shape, affine, orientation) on the [0, 1] scale, zero outside the foreground.
:func:`medmodal.data.formats.completed.write_completed_dataset` writes the data set in the input's layout with
the synthetic files marked in their names and in ``synthetic.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from medmodal.data.case import CaseRecord, DataError, DatasetInfo
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.m2dn.data import CaseIntensity, to_unit
from medmodal.methods.m2dn.inference import case_generator, fill_case, inference_device, settings_from

log = logging.getLogger("medmodal")


def synthesize_records(run: LoadedRun, records: Sequence[CaseRecord], out_dir: Path, *, source: Path | None,
                       source_format: str, source_info: DatasetInfo | None = None, options: dict[str, Any],
                       overwrite: bool, progress: bool) -> Path:
    """Complete every case of ``records`` with ``run`` and write the data set to ``out_dir`` (returned)."""
    from medmodal.data.formats import open_dataset
    from medmodal.data.formats.brats import check_case_id
    from medmodal.data.formats.completed import write_completed_dataset
    from medmodal.data.io import read_case
    from medmodal.data.preprocess import preprocess_case, restore_to_input_grid
    from medmodal.engine.predict import input_info
    from medmodal.methods.m2dn import diffusion_of

    inf = run.info.inference
    if run.info.task.kind != "synthesis":
        raise DataError(f"{run.dir} is not a synthesis run")
    try:
        settings = settings_from(inf, options)
        device = inference_device(options.get("device"))
    except ValueError as err:
        raise DataError(str(err)) from None
    if settings.sampler == "ddpm" and settings.steps is not None and settings.steps != int(inf["timesteps"]):
        raise DataError(f"--steps {settings.steps}: the DDPM sampler runs every one of the {inf['timesteps']} "
                        "timesteps; use --sampler ddim for fewer steps")
    if settings.steps is not None and settings.steps > int(inf["timesteps"]):
        raise DataError(f"--steps {settings.steps}: the run has only {inf['timesteps']} timesteps")
    batch_size = int(options.get("batch_size") or inf.get("batch_size", 16))
    mods = tuple(run.info.modalities)
    for rec in records:
        check_case_id(rec.case_id)
        unknown = sorted(set(rec.images) - set(mods))
        if unknown:
            raise DataError(f"case {rec.case_id}: modality(ies) {unknown} are unknown to the model of {run.dir}, "
                            f"which synthesises {list(mods)}; leave them out (data.modalities) or use a run trained "
                            "with them")
        if not rec.images:
            raise DataError(f"case {rec.case_id}: has no image; M2DN needs at least one of {list(mods)}")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:  # refused before any case is synthesised
        raise DataError(f"--out {out_dir}: folder exists and is not empty; pass --overwrite or pick another folder")
    if source_info is not None:  # the data set as the command read it
        info = source_info
    else:
        info = open_dataset(source)[0] if source is not None else input_info(run)
    network = run.network().to(device)
    diffusion = diffusion_of(inf)
    mode = inf.get("mode", "diffusion")
    net_dims = int(inf.get("model_dims", run.info.spatial_dims))
    synthesized: dict[str, dict[str, np.ndarray]] = {}
    todo = [r for r in records if set(mods) - set(r.images)]
    with Progress(disable=not progress, transient=True) as bar:  # an error then stands alone
        task = bar.add_task(f"synthesising ({settings.describe(mode, diffusion.timesteps)})", total=len(todo))
        for rec in todo:
            case = read_case(replace(rec, label=None), replace(info, modalities=mods))
            image, _, available, geometry = preprocess_case(case, mods, **run.info.preprocessing_options())
            present = np.asarray(available, dtype=bool)
            stats = CaseIntensity.of_case(image, present, percentiles=tuple(inf.get("percentiles", (0.5, 99.5))))
            x = torch.from_numpy(stats.to_model(image, present))
            gen = case_generator(settings.seed, rec.case_id, device)
            try:
                filled = fill_case(network, x, torch.from_numpy(present)[None], model_dims=net_dims, mode=mode,
                                   diffusion=diffusion, settings=settings, batch_size=batch_size,
                                   generator=gen)[0]
            except ValueError as err:
                raise DataError(f"case {rec.case_id}: {err}") from None
            unit = to_unit(filled).numpy() * stats.foreground(image, present)
            synthesized[rec.case_id] = {
                mods[m]: restore_to_input_grid(unit[m].astype(np.float32), geometry, order=1).astype(np.float32)
                for m in np.flatnonzero(~present)
            }
            bar.advance(task)
    complete = [r.case_id for r in records if r.case_id not in synthesized]
    if complete:
        log.info("%d case(s) have every modality and are copied unchanged: %s", len(complete),
                 ", ".join(complete[:10]) + (" ..." if len(complete) > 10 else ""))
    provenance = {"run": str(run.dir), "method": run.info.method, "mode": mode,
                  "sampler": settings.sampler, "steps": settings.steps or diffusion.timesteps, "eta": settings.eta,
                  "seed": settings.seed, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # --image input: a one-case data set in the BraTS folder layout
    result = write_completed_dataset(source=source, format=source_format if source is not None else "brats",
                                     records=records, info=info,
                                     synthesized=synthesized, out_dir=out_dir, provenance=provenance,
                                     overwrite=overwrite)
    return getattr(result, "out_dir", out_dir)
