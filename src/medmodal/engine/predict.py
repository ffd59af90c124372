"""``predict``: apply a trained run to new cases, from whichever modalities each case has.

Only the run folder is needed (``run.json``: modalities, task, preprocessing, network, inference settings), not
the data the run was trained on. Each case is preprocessed as in training (reorient, resample, crop, normalise)
and the model is applied with its available modalities. Segmentations are mapped back through
:func:`~medmodal.data.preprocess.restore_to_input_grid` and written with the input's own affine, so they overlay
the input exactly (oblique and anisotropic grids included); classifications go to ``predictions.csv``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from medmodal.atomic import write_csv
from medmodal.data.case import CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.formats.brats import check_case_id
from medmodal.engine.datamodule import select_modalities
from medmodal.engine.runinfo import LoadedRun
from medmodal.evaluation.inference import predict_subsets, recorded_settings
from medmodal.transforms import regions_to_labels

log = logging.getLogger("medmodal")


def records_from_images(images: Mapping[str, Path], *, case_id: str = "case") -> list[CaseRecord]:
    """One unlabelled case from ``{modality: file}`` (the ``--image t1=a.nii.gz`` form)."""
    missing = [str(p) for p in images.values() if not Path(p).exists()]
    if missing:
        raise DataError(f"input file(s) not found: {', '.join(missing)}")
    return [CaseRecord(case_id=case_id, images={m: Path(p) for m, p in images.items()})]


def input_info(run: LoadedRun) -> DatasetInfo:
    """How to read cases given by file for ``run``: its modalities; every label value accepted."""
    task = run.info.task
    labels = sorted({0, *task.label_names, *task.label_values, *(v for vs in task.regions.values() for v in vs)})
    return DatasetInfo(name="input", modalities=tuple(run.info.modalities), labels=tuple(labels),
                       regions={k: tuple(v) for k, v in task.regions.items()})


def decode_segmentation(logits: torch.Tensor, run: LoadedRun,
                        postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """The label map ``(*S) uint8/int`` of one case's ``logits (1, C, *S)`` for the run's task."""
    task = run.info.task
    if task.kind == "regions":
        pred = logits.sigmoid() > 0.5
        if postprocess is not None:
            pred = postprocess(pred)
        label = regions_to_labels(pred, {k: tuple(v) for k, v in task.regions.items()})[0, 0].numpy()
    elif task.kind == "labels":
        values = np.asarray(task.label_values)
        label = values[logits[0].argmax(0).numpy()]
    else:
        raise ValueError(f"not a segmentation task: {task.kind}")
    return label.astype(np.uint8 if label.max(initial=0) < 256 else np.int32)


def predict_cases(
    run: LoadedRun,
    records: Sequence[CaseRecord],
    out_dir: Path,
    *,
    info: DatasetInfo | None = None,
    overwrite: bool = False,
    progress: bool = True,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[Path]:
    """Apply ``run``'s network to every record; returns the written files.

    Segmentation tasks write ``out_dir/<case_id>_seg.nii.gz`` per case; classification writes
    ``out_dir/predictions.csv`` (case, modalities used, predicted class, one probability per class). Existing
    outputs are kept unless ``overwrite``; modalities the model was not trained on are ignored (with a
    warning; a case with none it knows fails); a case that fails to read is reported and skipped, and a
    :class:`DataError` listing the failures is raised at the end. When every case fails, an ``out_dir`` this call
    created is removed again. A case id that is not a plain file name is refused before anything is written.
    """
    from medmodal.data.io import read_case, write_image
    from medmodal.data.preprocess import preprocess_case, restore_to_input_grid

    out_dir = Path(out_dir)
    network = run.network()
    info = info or input_info(run)
    modalities = tuple(run.info.modalities)
    task, inf = run.info.task, run.info.inference
    classification = task.kind == "classification"
    if classification:
        outputs = {"*": out_dir / "predictions.csv"}
    else:
        outputs = {rec.case_id: out_dir / f"{rec.case_id}_seg.nii.gz" for rec in records}
    for rec in records:  # outputs are named after the case ids: none may leave out_dir
        check_case_id(rec.case_id)
    usable = [rec for rec in records if any(m in modalities for m in rec.images)]
    if records and not usable:
        found = sorted({m for rec in records for m in rec.images})
        raise DataError(f"no case has a modality the model reads: the cases have {found}, the model was trained on "
                        f"{list(modalities)}")
    clash = [str(p) for p in outputs.values() if p.exists()]
    if clash and not overwrite:
        raise DataError(f"{len(clash)} output(s) exist, e.g. {clash[0]}; pass --overwrite or choose another --out")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed: list[str] = []
    rows: list[list] = []
    for rec in track(records, description="predicting", disable=not progress):
        try:
            unknown = [m for m in rec.images if m not in modalities]
            if unknown and len(unknown) == len(rec.images):
                raise DataError(f"case {rec.case_id}: it has {sorted(rec.images)}, none of the modalities this "
                                f"model uses {list(modalities)}; give it at least one of them")
            if unknown:  # e.g. a 4-modality data set given to a model of one modality: use what it knows
                log.warning("case %s: ignoring modality(ies) %s; the model was trained on %s", rec.case_id, unknown,
                            list(modalities))
            case = read_case(replace(select_modalities(rec, modalities), label=None), info)
            image, _, available, geometry = preprocess_case(case, modalities, **run.info.preprocessing_options())
        except DataError as err:
            log.error("%s", err)
            failed.append(str(err))
            continue
        if image.ndim - 1 != run.info.spatial_dims:
            failed.append(f"case {rec.case_id}: a {image.ndim - 1}D image, but the model is "
                          f"{run.info.spatial_dims}D")
            continue
        x = torch.from_numpy(np.ascontiguousarray(image))[None]
        mask = torch.from_numpy(np.asarray(available, dtype=bool))[None]
        used = "+".join(m for m, a in zip(modalities, available, strict=True) if a)
        if classification:
            with torch.no_grad():
                prob = network(x, mask).softmax(1)[0]
            rows.append([rec.case_id, used, task.class_names[int(prob.argmax())],
                         *(f"{float(p):.6f}" for p in prob)])
            continue
        logits = predict_subsets(network, x, mask, **recorded_settings(inf, task_kind=task.kind))
        label = decode_segmentation(logits, run, postprocess)
        restored = restore_to_input_grid(label, geometry, order=0).astype(label.dtype)
        out = outputs[rec.case_id]
        write_image(Volume(restored, affine=geometry.original_affine), out)
        written.append(out)
    if classification and rows:
        header = ["case_id", "modalities", "prediction", *(f"p_{c}" for c in task.class_names)]
        written.append(write_csv(outputs["*"], header, rows))
    if failed:
        if created and not written:  # every case failed: leave no empty folder behind
            with contextlib.suppress(OSError):  # rmdir removes only an empty folder
                out_dir.rmdir()
        raise DataError(f"{len(failed)} case(s) could not be processed:\n" + "\n".join(failed))
    return written
