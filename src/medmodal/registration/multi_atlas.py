"""One atlas → target job of multi-atlas label propagation, and the manifest that lists every job.

:func:`run_pair` reads the atlas image and label and the target image (and the target's own label when it has
one), registers the atlas onto the target (:func:`~medmodal.registration.sitk.register_pair`), warps the atlas
label onto the target's grid and writes it. It never raises: a failure becomes a :class:`PairResult` with
``status="failed"`` and the error text, so one bad file does not stop a multi-atlas run.
:func:`medmodal.registration.atlases.register_atlases` runs the jobs in parallel.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from medmodal.atomic import csv_text
from medmodal.data.case import CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.io import compact_int_dtype, read_case, write_image
from medmodal.registration.progress import IterationCallback, Throttle
from medmodal.registration.sitk import RegistrationSettings, register_pair, volume_to_image, warp_label

__all__ = ["MANIFEST_COLUMNS", "PairJob", "PairResult", "init_worker", "manifest_text",
           "read_manifest_rows", "run_pair", "run_pair_reporting"]

#: Columns of ``manifest.csv``, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "target", "atlas", "label", "target_image", "metric", "seconds", "status", "error", "dice_to_reference",
)


@dataclass(frozen=True)
class PairJob:
    """Everything one worker needs to register one atlas onto one target (picklable).

    Attributes:
        atlas, target: the two cases (only ``atlas_modality``/``target_modality`` and the labels are read).
        atlas_info, target_info: their data sets' metadata (label mappings, declared labels).
        atlas_modality, target_modality: the images to register.
        settings: the registration settings.
        label_path: where to write the warped label (``.nii.gz``).
        threads: SimpleITK threads for this job (``None``: SimpleITK's default).
    """

    atlas: CaseRecord
    target: CaseRecord
    atlas_info: DatasetInfo
    target_info: DatasetInfo
    atlas_modality: str
    target_modality: str
    settings: RegistrationSettings
    label_path: Path
    threads: int | None = None


@dataclass(frozen=True)
class PairResult:
    """One row of the manifest.

    Attributes:
        target, atlas: case ids.
        label: the warped atlas label on the target's grid (absolute path), ``None`` if the pair failed.
        target_image: the target image the atlas was registered to (``None`` if the target lacks the modality).
        metric: final Mattes MI (SimpleITK's sign: negative, lower is better), ``None`` if failed.
        seconds: wall time of the job (reading, registration, warping, writing).
        status: ``"ok"`` or ``"failed"``.
        error: one-line error text of a failed pair, else ``""``.
        dice_to_reference: foreground (label > 0) Dice of the warped label against the target's own label, or
            ``None`` when the target has no label.
    """

    target: str
    atlas: str
    label: Path | None
    target_image: Path | None
    metric: float | None
    seconds: float
    status: str
    error: str = ""
    dice_to_reference: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    if not isinstance(err, DataError):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= 400 else text[:397] + "..."


def _read(record: CaseRecord, info: DatasetInfo, modality: str, *, role: str) -> tuple[Volume, Volume | None]:
    """The ``modality`` image and the label of ``record`` (same grid, label values mapped and checked)."""
    if modality not in record.images:
        raise DataError(f"{role} {record.case_id!r} has no {modality} image (it has {sorted(record.images)})")
    reduced = CaseRecord(record.case_id, {modality: record.images[modality]}, label=record.label)
    case = read_case(reduced, info)
    return case.images[modality], case.label


def run_pair(job: PairJob, *, on_iteration: IterationCallback | None = None) -> PairResult:
    """Register ``job.atlas`` onto ``job.target``, write the warped label; never raises (see the module doc).

    ``on_iteration(stage, done, total)`` receives the optimiser's iterations (:mod:`~medmodal.registration.progress`).
    """
    start = time.perf_counter()
    target_image = job.target.images.get(job.target_modality)
    try:
        atlas_image, atlas_label = _read(job.atlas, job.atlas_info, job.atlas_modality, role="atlas")
        if atlas_label is None:
            raise DataError(f"atlas {job.atlas.case_id!r} has no label")
        target, reference = _read(job.target, job.target_info, job.target_modality, role="target")
        if atlas_image.spatial_dims != target.spatial_dims:
            raise DataError(f"atlas {job.atlas.case_id!r} is {atlas_image.spatial_dims}D but target "
                            f"{job.target.case_id!r} is {target.spatial_dims}D")
        fixed = volume_to_image(target)
        result = register_pair(fixed, volume_to_image(atlas_image), settings=job.settings, threads=job.threads,
                               on_iteration=on_iteration)
        label = volume_to_image(atlas_label, pixel_type=sitk.sitkUnknown)
        warped = sitk.GetArrayFromImage(warp_label(label, fixed, result.transform)).transpose()
        write_image(Volume(warped, target.affine), job.label_path, dtype=compact_int_dtype(warped))
        dice = None
        if reference is not None:
            from medmodal.evaluation.metrics import binary_dice  # deferred: MONAI only when there is a reference

            dice = binary_dice(warped > 0, reference.array > 0)
        return PairResult(job.target.case_id, job.atlas.case_id, job.label_path, target_image, result.metric,
                          time.perf_counter() - start, "ok", "", dice)
    except Exception as err:  # a failed pair is reported and skipped, never fatal
        return PairResult(job.target.case_id, job.atlas.case_id, None, target_image, None,
                          time.perf_counter() - start, "failed", _one_line(err), None)


_progress_queue: Any = None  # a worker's queue for iteration progress, set by init_worker


def init_worker(threads: int, progress_queue: Any = None) -> None:
    """Process-pool initialiser: give this worker's SimpleITK filters ``threads`` threads; with a
    ``progress_queue`` (a multiprocessing queue), :func:`run_pair_reporting` puts its progress there."""
    global _progress_queue
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # a failed pair is reported in the manifest, not as ITK text
    _progress_queue = progress_queue


def run_pair_reporting(job: PairJob, index: int, *, interval_s: float = 0.5) -> PairResult:
    """:func:`run_pair` in a pool worker, putting ``(index, stage, done, total)`` on the worker's progress queue
    (throttled to one every ``interval_s`` per stage)."""
    queue = _progress_queue
    if queue is None:
        return run_pair(job)
    return run_pair(job, on_iteration=Throttle(lambda stage, done, total: queue.put((index, stage, done, total)),
                                               interval_s=interval_s))


def _number(value: float | None, digits: int) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def manifest_text(results: list[PairResult], *, root: Path) -> str:
    """``manifest.csv`` text: label paths relative to ``root`` (the output folder), target images absolute."""
    rows = []
    for r in results:
        label = "" if r.label is None else Path(r.label).relative_to(root).as_posix()
        image = "" if r.target_image is None else str(Path(r.target_image).absolute())
        rows.append([r.target, r.atlas, label, image, _number(r.metric, 6),
                     _number(r.seconds, 3), r.status, r.error, _number(r.dice_to_reference, 4)])
    return csv_text(MANIFEST_COLUMNS, rows)


def read_manifest_rows(path: Path | str) -> list[PairResult]:
    """Read a ``manifest.csv`` written by ``medmodal register`` (or a folder holding one).

    Returns:
        One :class:`PairResult` per row, label paths resolved against the manifest's folder.
    """
    path = Path(path)
    path = path / "manifest.csv" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: no registration manifest here; run `medmodal register` first")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: not a registration manifest, missing column(s) {sorted(missing)}")
        rows = list(reader)

    def number(text: str) -> float | None:
        return float(text) if text else None

    return [
        PairResult(
            target=row["target"], atlas=row["atlas"],
            label=(path.parent / row["label"]) if row["label"] else None,
            target_image=Path(row["target_image"]) if row["target_image"] else None, metric=number(row["metric"]),
            seconds=float(row["seconds"] or 0.0), status=row["status"], error=row["error"],
            dice_to_reference=number(row["dice_to_reference"]),
        )
        for row in rows
    ]
