"""Dataset validation (``medmodal data check``) and conversion between layouts (``medmodal data convert``)."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmodal.data.case import Case, CaseRecord, DataError, DatasetInfo
from medmodal.data.formats import FORMATS, open_dataset, write_dataset, write_manifest
from medmodal.data.formats.completed import SIDECAR, read_synthetic_sidecar
from medmodal.data.formats.manifest import ClassNamesWarning
from medmodal.data.io import DataErrors, inspect_case, read_case

__all__ = ["Problem", "SourceCounts", "check_dataset", "convert_dataset", "label_counts"]

#: destination suffixes that make ``convert_dataset(..., to="manifest")`` write one manifest file
MANIFEST_SUFFIXES = (".csv", ".json")


@dataclass
class Problem:
    """One problem found in a dataset.

    Args:
        case_id: the case it concerns, or ``None`` for the dataset as a whole.
        path: the file it concerns, or ``None``.
        message: what is wrong and what to do; warnings start with ``"warning:"``.
    """

    case_id: str | None
    path: Path | None
    message: str

    @property
    def is_warning(self) -> bool:
        return self.message.startswith("warning:")

    def __str__(self) -> str:
        return self.message


@dataclass
class SourceCounts:
    """What one source (site, scanner) of a dataset holds for each task; from the index, no image is read.

    Args:
        source: the source name, or ``None`` for cases without one.
        images: cases (each has at least one image).
        masks: cases with a segmentation label.
        classes: class name (or index, as text, when the dataset names no classes) → cases with that target.
        unlabelled: cases with neither a mask nor a class label.
    """

    source: str | None
    images: int = 0
    masks: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    unlabelled: int = 0


def label_counts(info: DatasetInfo, records: Sequence[CaseRecord]) -> list[SourceCounts]:
    """Per source (sorted by name; cases without a source last): images, masks, class labels per class and
    unlabelled images. Every class of ``info.class_names`` is listed, with 0 where a source has none."""
    names = list(info.class_names or [])
    names += sorted({str(r.target) for r in records if r.target is not None and not 0 <= r.target < len(names)},
                    key=int)
    counts: dict[str | None, SourceCounts] = {}
    for r in records:
        c = counts.setdefault(r.source, SourceCounts(r.source, classes=dict.fromkeys(names, 0)))
        c.images += 1
        c.masks += r.label is not None
        if r.target is not None:
            c.classes[names[r.target] if 0 <= r.target < len(info.class_names or ()) else str(r.target)] += 1
        c.unlabelled += r.label is None and r.target is None
    return [counts[k] for k in sorted(counts, key=lambda s: (s is None, s or ""))]


def _open(path: Path, format: str) -> tuple[DatasetInfo, list[CaseRecord], list[Problem]]:
    """:func:`open_dataset`, with its :class:`ClassNamesWarning` (class names taken from the rows) as a warning
    problem; other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ClassNamesWarning)
        info, records = open_dataset(path, format)
    notes = []
    for w in caught:
        if issubclass(w.category, ClassNamesWarning):
            notes.append(Problem(None, None, f"warning: {w.message}"))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return info, records, notes


def _progress(records: list[CaseRecord], enabled: bool) -> Iterable[CaseRecord]:
    if not enabled:
        return records
    from rich.progress import track

    return track(records, description="checking cases", total=len(records))


def check_dataset(
    path: Path | str, format: str = "auto", *, progress: bool = False
) -> tuple[DatasetInfo | None, list[CaseRecord], list[Problem]]:
    """Read every case of a dataset and collect all problems instead of stopping at the first.

    Problems: layout errors, duplicate case ids, cases with no modality, unreadable, empty or truncated files,
    colour images, NaN/inf voxels, images (and labels) on different grids (a mask of another size than its
    image), unknown modalities, unknown class names, non-integer or undeclared label values; warnings for label
    maps that hold only background, for class names taken from a manifest's rows (no ``classes`` declared), and
    one that counts the synthesised images a completed data set's ``synthetic.json`` lists. See
    :func:`label_counts` for what each source holds.

    Args:
        path: dataset folder, ``dataset.json`` or manifest file.
        format: one of :data:`~medmodal.data.formats.FORMATS` or ``"auto"``.
        progress: show a progress bar.

    Returns:
        ``(info, records, problems)``; ``info`` is ``None`` (and ``records`` empty) if the layout itself
        could not be read.
    """
    path = Path(path)
    try:
        info, records, notes = _open(path, format)
    except DataErrors as err:
        return None, [], [Problem(case_id, file, message) for case_id, file, message in err.problems]
    except DataError as err:
        return None, [], [Problem(None, path, str(err))]
    problems = notes + [
        Problem(case_id, None, f"case id {case_id!r} appears {n} times; case ids must be unique")
        for case_id, n in Counter(r.case_id for r in records).items()
        if n > 1
    ]
    for record in _progress(records, progress):
        case, errors = inspect_case(record, info)
        problems += [Problem(record.case_id, file, str(err)) for file, err in errors]
        if case is not None and case.label is not None and not np.any(case.label.array):
            problems.append(Problem(record.case_id, record.label, (
                f"warning: case {record.case_id!r}: label {record.label} holds only background (0); "
                "check it is the right file, or drop it to make the case unlabelled"
            )))
    problems += _synthetic_note(path)
    return info, records, problems


def _synthetic_note(path: Path) -> list[Problem]:
    """A warning counting the synthesised images of a completed data set (see :mod:`.formats.completed`)."""
    folder = path if path.is_dir() else path.parent
    try:
        synthetic = read_synthetic_sidecar(folder).get("synthetic", {})
    except DataError as err:
        return [Problem(None, folder / SIDECAR, str(err))]
    images = sum(len(v) for v in synthetic.values())
    if not images:
        return []
    return [Problem(None, folder / SIDECAR, f"warning: {images} synthesised image(s) in {len(synthetic)} case(s), "
                    f"listed in {folder / SIDECAR}: model outputs, not acquired images")]


def _read_all(records: list[CaseRecord], info: DatasetInfo) -> Iterator[Case]:
    for record in records:
        yield read_case(record, info)


def convert_dataset(
    src: Path | str, dst: Path | str, *, to: str, src_format: str = "auto", overwrite: bool = False
) -> Path:
    """Read every case of ``src`` and write it to ``dst`` in the layout ``to`` (one of ``FORMATS``).

    Cases are streamed one at a time; ``dst`` only appears once every case has been read and written, so a
    bad case leaves nothing behind. Run :func:`check_dataset` first to see every problem at once.

    With ``to="manifest"`` and a ``dst`` ending in ``.csv`` or ``.json``, ``dst`` is one manifest file (written
    atomically) that lists ``src``'s own image and label files, with paths relative to ``dst``'s folder; nothing
    is copied. Otherwise ``dst`` is a folder (``images/``, ``labels/``, ``manifest.json`` for a manifest).

    Returns:
        ``dst``.
    """
    if to not in FORMATS:
        raise DataError(f"unknown target format {to!r}; use one of {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or (src.is_file() and dst.resolve() == src.parent.resolve()):
        raise DataError(f"{dst}: is the source dataset; write the converted dataset to another folder")
    if dst.suffix.lower() in MANIFEST_SUFFIXES:
        if to != "manifest":
            raise DataError(f"{dst}: a {dst.suffix} destination is a manifest file; use --to manifest, or give a "
                            f"folder for --to brats or --to nnunet")
        return _write_manifest_file(src, dst, src_format=src_format, overwrite=overwrite)
    info, records = open_dataset(src, src_format)
    return write_dataset(_read_all(records, info), dst, info, format=to, overwrite=overwrite)


def _write_manifest_file(src: Path, dst: Path, *, src_format: str, overwrite: bool) -> Path:
    """``dst`` (``.csv``/``.json``): a manifest that lists ``src``'s own files, paths relative to ``dst``'s
    folder (absolute where no relative path exists, e.g. another drive); no image is copied or read."""
    if dst.exists() and not overwrite:
        raise DataError(f"{dst}: exists already; pass --overwrite to replace it")
    if dst.is_dir():
        raise DataError(f"{dst}: is a folder; give a manifest file name ending in .csv or .json")
    info, records = open_dataset(src, src_format)
    if info.label_map and any(k != v for k, v in info.label_map.items()) and dst.suffix.lower() != ".json":
        raise DataError(f"{src}: stores label values {sorted(info.label_map)} for labels "
                        f"{sorted(info.label_map.values())}, which a CSV manifest cannot record; write a .json "
                        "manifest, or convert to a folder (--to manifest with a folder as destination copies the "
                        "images and labels)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(records, dst, info)
