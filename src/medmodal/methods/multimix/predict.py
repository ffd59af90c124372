"""``medmodal predict`` on a MultiMix run: per case the mask on the input's grid, the class with its probability,
and the saliency map that explains it.

Writes to ``--out``:

* ``<case>_seg.nii.gz``: the label map (regions → label values) on the input's grid and affine;
* ``<case>_saliency.nii.gz``: |∂ max-class logit / ∂ input| (summed over the modalities), float32, on the same grid;
* for a PNG/JPEG/TIFF/BMP input also ``<case>_seg.png`` (the mask on the input's pixel grid) and
  ``<case>_saliency.png`` (the image with the saliency overlaid and the predicted boundary);
* ``predictions.csv``: case, predicted class, its probability and every class's probability.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.progress import track

from medmodal.atomic import write_csv
from medmodal.data.case import CaseRecord, DataError, Volume
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.multimix.inference import case_input, predict_inputs

log = logging.getLogger("medmodal")

#: inputs that also get PNG outputs on their pixel grid.
RASTER = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _outputs(rec: CaseRecord, out_dir: Path, *, segment: bool, classify: bool) -> dict[str, Path]:
    """The files written for ``rec``, by kind: ``seg`` and ``saliency`` (NIfTI), ``seg_png`` and ``saliency_png``
    for picture inputs."""
    raster = any(p.suffix.lower() in RASTER for p in rec.images.values())
    stem = out_dir / rec.case_id
    files = {}
    if segment:
        files["seg"] = Path(f"{stem}_seg.nii.gz")
        if raster:
            files["seg_png"] = Path(f"{stem}_seg.png")
    if classify:
        files["saliency"] = Path(f"{stem}_saliency.nii.gz")
        if raster:
            files["saliency_png"] = Path(f"{stem}_saliency.png")
    return files


def predict_records(run: LoadedRun, records: Sequence[CaseRecord], out_dir: Path, *, overwrite: bool,
                    progress: bool) -> list[Path]:
    """Apply ``run`` to ``records`` (see the module docstring); returns the written files."""
    from medmodal.data.formats.brats import check_case_id
    from medmodal.data.io import read_case, write_image
    from medmodal.engine.datamodule import select_modalities
    from medmodal.engine.predict import input_info
    from medmodal.methods.multimix.selection import selected_network
    from medmodal.transforms import regions_to_labels

    out_dir = Path(out_dir)
    task, inf = run.info.task, run.info.inference
    modalities = tuple(run.info.modalities)
    network, chosen = selected_network(run.dir, inf.get("model_selection", "last"))
    segment, classify = bool(network.has_decoder), bool(network.has_classifier)
    for rec in records:
        check_case_id(rec.case_id)
    planned = {rec.case_id: _outputs(rec, out_dir, segment=segment, classify=classify) for rec in records}
    table = out_dir / "predictions.csv"
    clash = [str(p) for files in planned.values() for p in files.values() if p.exists()]
    clash += [str(table)] if classify and table.exists() else []
    if clash and not overwrite:
        raise DataError(f"{len(clash)} output(s) exist, e.g. {clash[0]}; pass --overwrite or choose another --out")
    info = input_info(run)
    log.info("predicting with %s weights", chosen)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows: list[list] = []
    failed: list[str] = []
    regions = {k: tuple(v) for k, v in task.regions.items()}
    for rec in track(records, description="predicting", disable=not progress):
        try:
            unknown = [m for m in rec.images if m not in modalities]
            if len(unknown) == len(rec.images):
                raise DataError(f"case {rec.case_id}: it has {sorted(rec.images)}, none of the modalities this "
                                f"model uses {list(modalities)}; give it at least one of them")
            case = read_case(replace(select_modalities(rec, modalities), label=None), info)
            x = case_input(case, run)
        except DataError as err:
            log.error("%s", err)
            failed.append(str(err))
            continue
        (pred,) = predict_inputs(network, [x], inference=inf)
        ref, files = case.reference, planned[rec.case_id]
        if pred.seg_prob is not None:
            import torch

            label = regions_to_labels(torch.from_numpy(pred.seg_prob > 0.5)[None], regions)[0, 0].numpy()
            label = label.astype(np.uint8 if label.max(initial=0) < 256 else np.int32)
            for kind in ("seg", "seg_png"):
                if kind in files:
                    written.append(write_image(Volume(label, affine=ref.affine), files[kind]))
        if pred.saliency is not None:
            written.append(write_image(Volume(pred.saliency.astype(np.float32), affine=ref.affine),
                                       files["saliency"]))
            if "saliency_png" in files:
                mask = None if pred.seg_prob is None else pred.seg_prob[0] > 0.5
                written.append(_saliency_picture(np.asarray(ref.array, dtype=np.float32), pred.saliency, mask,
                                                 files["saliency_png"]))
        if pred.class_prob is not None:
            k = int(np.argmax(pred.class_prob))
            rows.append([rec.case_id, task.class_names[k], f"{float(pred.class_prob[k]):.6f}",
                         *(f"{float(p):.6f}" for p in pred.class_prob)])
    if rows:
        written.append(write_csv(table, ["case_id", "prediction", "probability",
                                         *(f"p_{c}" for c in task.class_names)], rows))
    if failed:
        if created and not written:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise DataError(f"{len(failed)} case(s) could not be processed:\n" + "\n".join(failed))
    return written


def _saliency_picture(image: np.ndarray, saliency: np.ndarray, mask: np.ndarray | None, path: Path) -> Path:
    """The (X, Y) image shown upright with the saliency overlaid and the predicted boundary, as a PNG."""
    from medmodal.evaluation.report import pyplot, save_figure

    plt = pyplot()
    h, w = image.shape[1], image.shape[0]
    fig, ax = plt.subplots(figsize=(6, 6 * h / max(w, 1)))
    ax.imshow(image.T, cmap="gray")
    top = float(np.percentile(saliency, 99.5)) or 1.0
    ax.imshow(np.clip(saliency / top, 0, 1).T, cmap="inferno", alpha=0.45)
    if mask is not None and mask.any():
        ax.contour(mask.T.astype(float), levels=[0.5], colors="red", linewidths=1)
    ax.set_axis_off()
    return save_figure(fig, path)
