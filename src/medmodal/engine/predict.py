"""``predict``: segment cases with a trained run, from whichever modalities each case has.

Each case is preprocessed as in training (reorient, resample, crop, normalise), segmented with its
available modalities, mapped back through :func:`~medmodal.data.preprocess.restore_to_input_grid` and written
as NIfTI with the input's own affine, so the result overlays the input exactly (oblique and anisotropic
grids included).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from medmodal.data.case import CaseRecord, DataError, DatasetInfo, Volume
from medmodal.engine.datamodule import resolve_source, select_modalities
from medmodal.engine.recipe import load_recipe
from medmodal.engine.run import load_network
from medmodal.evaluation.inference import predict_subsets
from medmodal.transforms import drop_small_region, regions_to_labels

log = logging.getLogger("medmodal")


def records_from_images(images: Mapping[str, Path], *, case_id: str = "case") -> list[CaseRecord]:
    """One unlabelled case from ``{modality: file}`` (the ``--image t1=a.nii.gz`` form)."""
    missing = [str(p) for p in images.values() if not Path(p).exists()]
    if missing:
        raise DataError(f"input file(s) not found: {', '.join(missing)}")
    return [CaseRecord(case_id=case_id, images={m: Path(p) for m, p in images.items()})]


def predict_run(
    run_dir: Path,
    records: Sequence[CaseRecord],
    out_dir: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Segment every record with ``run_dir``'s network; writes ``out_dir/<case_id>_seg.nii.gz``.

    Returns the written files. Existing outputs are kept unless ``overwrite``; a case that fails to read is
    reported and skipped, and a :class:`DataError` listing the failures is raised at the end.
    """
    from medmodal.data.io import read_case, write_image
    from medmodal.data.preprocess import preprocess_case, restore_to_input_grid

    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    network = load_network(Path(run_dir) / "weights")
    source = resolve_source(recipe.data)
    info: DatasetInfo = source.info
    modalities = source.modalities
    outputs = {rec.case_id: out_dir / f"{rec.case_id}_seg.nii.gz" for rec in records}
    clash = [str(p) for p in outputs.values() if p.exists()]
    if clash and not overwrite:
        raise DataError(f"{len(clash)} output(s) exist, e.g. {clash[0]}; pass --overwrite or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed: list[str] = []
    for rec in track(records, description="predicting", disable=not progress):
        out = outputs[rec.case_id]
        try:
            info.check_modalities(list(rec.images), where=f"case {rec.case_id}")
            case = read_case(replace(select_modalities(rec, modalities), label=None), info)
            image, _, available, geometry = preprocess_case(
                case, modalities, target_spacing=source.target_spacing
            )
        except DataError as err:
            log.error("%s", err)
            failed.append(str(err))
            continue
        if image.ndim - 1 != recipe.spatial_dims:
            failed.append(f"case {rec.case_id}: a {image.ndim - 1}D image, but the model is {recipe.spatial_dims}D")
            continue
        logits = predict_subsets(
            network, torch.from_numpy(np.ascontiguousarray(image))[None],
            torch.from_numpy(np.asarray(available, dtype=bool))[None],
            roi_size=recipe.eval_roi_size, overlap=recipe.eval.overlap, sw_batch_size=recipe.eval.sw_batch_size,
        )
        pred = logits.sigmoid() > 0.5
        if recipe.eval.et_min_voxels and "ET" in info.regions:
            pred = drop_small_region(pred, channel=list(info.regions).index("ET"),
                                     min_voxels=recipe.eval.et_min_voxels)
        label = regions_to_labels(pred, info.regions)[0, 0].numpy().astype(np.uint8)
        restored = restore_to_input_grid(label, geometry, order=0).astype(np.uint8)
        write_image(Volume(restored, affine=geometry.original_affine), out)
        written.append(out)
    if failed:
        raise DataError(f"{len(failed)} case(s) could not be segmented:\n" + "\n".join(failed))
    return written
