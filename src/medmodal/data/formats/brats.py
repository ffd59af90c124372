"""The BraTS folder layout: ``root/<case>/<case>_<suffix>.nii.gz``.

Suffixes of BraTS 2018-2021 (``t1``, ``t1ce``, ``t2``, ``flair``, ``seg``) and BraTS 2023
(``BraTS-GLI-00000-000-t1n.nii.gz``: ``t1n``, ``t1c``, ``t2w``, ``t2f``, ``seg``, ``-`` separator) are
mapped to medmodal's names :data:`~medmodal.data.case.BRATS_MODALITIES`. A missing modality file is a
missing modality. A file whose name ends in ``_synthetic`` or ``-synthetic`` (``<case>_flair_synthetic.nii.gz``,
written by :func:`~medmodal.data.formats.completed.write_completed_dataset`) is a synthesised image of that
modality: it is read like the acquired file, and :func:`split_case_file` says it is synthetic.

Optional files next to the case folders:

* ``metadata.csv`` with columns ``case_id,target,report`` (either may be empty), and
* ``medmodal.json`` with ``{"name": str, "synthetic": bool}`` (and, when written by medmodal, ``modalities``,
  ``labels`` and ``regions``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from medmodal.atomic import atomic_write_text, write_csv
from medmodal.data.case import BRATS_MODALITIES, Case, CaseRecord, DataError, DatasetInfo
from medmodal.data.io import compact_int_dtype, read_json_object, staged_output_dir, write_image

__all__ = ["MODALITY_ALIASES", "SYNTHETIC_MARKER", "canonical_modality", "check_case_id", "is_brats_case_folder",
           "read_brats", "split_case_file", "write_brats"]

#: Lower-case contrast names used by BraTS releases and nnU-Net datasets → medmodal modality names.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1", "t1n": "t1", "t1w": "t1", "native_t1": "t1",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1-gd": "t1c", "t1_gd": "t1c",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "t2flair": "flair", "t2-flair": "flair", "t2_flair": "flair",
}
_LABEL_SUFFIXES = ("seg",)
_NIFTI = (".nii.gz", ".nii")
#: The name part that marks a synthesised image: ``<case>_<suffix>_synthetic.nii.gz``.
SYNTHETIC_MARKER = "synthetic"
METADATA = "metadata.csv"
SIDECAR = "medmodal.json"


def canonical_modality(name: str) -> str:
    """``name`` stripped, lower-cased and mapped through :data:`MODALITY_ALIASES` (unknown names are kept).

    The one normalisation of modality names: every place a user names a modality (data set files and sidecars,
    manifests, ``data.modalities`` in a recipe, ``--image T1=...``, ``--atlas-modality``) goes through it, so
    ``T1``, ``t1`` and ``T1n`` are the same modality and ``t1ce`` is ``t1c`` everywhere.
    """
    key = name.strip().lower()
    return MODALITY_ALIASES.get(key, key)


def check_case_id(case_id: str) -> str:
    """Raise :class:`DataError` unless ``case_id`` can be used as a file name."""
    if not case_id or case_id.startswith(".") or any(c in case_id for c in '/\\:*?"<>|\0'):
        raise DataError(f"case id {case_id!r} cannot be a file name; use letters, digits, '-' and '_'")
    return case_id


def _split(stem: str, case_id: str) -> str | None:
    """The suffix of ``<case_id>[_-]<suffix>``; for a file named after another case, the text after the last
    separator. ``None`` if there is no separator."""
    if stem.startswith(case_id) and len(stem) > len(case_id) + 1 and stem[len(case_id)] in "_-":
        return stem[len(case_id) + 1 :].lower()
    cut = max(stem.rfind("_"), stem.rfind("-"))
    return stem[cut + 1 :].lower() if cut > 0 else None


def _nifti_stem(path: Path) -> str | None:
    name = path.name
    ext = next((e for e in _NIFTI if name.lower().endswith(e)), None)
    return None if ext is None or name.startswith(".") else name[: -len(ext)]


def split_case_file(path: Path, case_id: str) -> tuple[str, bool] | None:
    """``(suffix, synthetic)`` of a case file ``<case>[_-]<suffix>[[_-]synthetic].nii[.gz]``: the lower-case
    suffix and whether the name carries the :data:`SYNTHETIC_MARKER`. ``None`` for a file that is not NIfTI or
    has no separator."""
    stem = _nifti_stem(path)
    if stem is None:
        return None
    synthetic = len(stem) > len(SYNTHETIC_MARKER) + 1 and stem.lower().endswith(
        ("_" + SYNTHETIC_MARKER, "-" + SYNTHETIC_MARKER))
    suffix = _split(stem[: -len(SYNTHETIC_MARKER) - 1] if synthetic else stem, case_id)
    return None if suffix is None else (suffix, synthetic)


def is_brats_case_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``<case>_<suffix>.nii[.gz]`` file with a BraTS modality or ``seg`` suffix."""
    for path in folder.iterdir():
        parts = split_case_file(path, folder.name)
        if parts is not None and ((parts[0] in _LABEL_SUFFIXES and not parts[1]) or parts[0] in MODALITY_ALIASES):
            return True
    return False


def _read_case_folder(folder: Path, extra: tuple[str, ...]) -> CaseRecord | None:
    images: dict[str, Path] = {}
    label: Path | None = None
    for path in sorted(folder.iterdir()):
        parts = split_case_file(path, folder.name)
        if parts is None:
            continue
        suffix, synthetic = parts
        if suffix in _LABEL_SUFFIXES:
            if synthetic:
                continue  # a label is never synthesised: not a file of this layout
            if label is not None:
                raise DataError(f"{folder}: two label files ({label.name}, {path.name}); keep one")
            label = path
            continue
        name = suffix if suffix in extra else MODALITY_ALIASES.get(suffix)
        if name is None:
            continue  # not a modality file (e.g. a brain mask): ignored
        if name in images:
            raise DataError(
                f"{folder}: {images[name].name} and {path.name} are both the {name!r} modality; keep one"
            )
        images[name] = path
    if not images and label is None:
        return None
    return CaseRecord(case_id=folder.name, images=images, label=label)


def _read_sidecar(root: Path) -> dict:
    path = root / SIDECAR
    if not path.is_file():
        return {}
    return read_json_object(path, expected="keys like 'name' and 'synthetic' (or delete the file)")


def _info_from_sidecar(meta: dict, root: Path) -> DatasetInfo:
    try:
        info = DatasetInfo(
            name=str(meta.get("name", root.name)),
            modalities=tuple(canonical_modality(str(m)) for m in meta.get("modalities", BRATS_MODALITIES)),
            synthetic=bool(meta.get("synthetic", False)),
        )
        if "labels" in meta:
            info.labels = tuple(int(v) for v in meta["labels"])
        if "regions" in meta:
            info.regions = {str(k): tuple(int(v) for v in vs) for k, vs in meta["regions"].items()}
    except (TypeError, ValueError, AttributeError) as err:
        raise DataError(
            f"{root / SIDECAR}: 'modalities' must be a list of names, 'labels' a list of integers and "
            f"'regions' an object of integer lists ({err})"
        ) from err
    return info


def _read_metadata(root: Path, records: dict[str, CaseRecord]) -> None:
    path = root / METADATA
    if not path.is_file():
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "case_id" not in reader.fieldnames:
            raise DataError(f"{path}: needs a header with a 'case_id' column (and 'target' and/or 'report')")
        for row_number, row in enumerate(reader, start=2):
            case_id = (row.get("case_id") or "").strip()
            if case_id not in records:
                raise DataError(f"{path}, line {row_number}: case {case_id!r} has no folder in {root}")
            target = (row.get("target") or "").strip()
            try:
                records[case_id].target = int(target) if target else None
            except ValueError as err:
                raise DataError(
                    f"{path}, line {row_number}: target {target!r} is not an integer class index"
                ) from err
            records[case_id].report = row.get("report") or None


def read_brats(root: Path | str) -> tuple[DatasetInfo, list[CaseRecord]]:
    """Index a BraTS-layout dataset (no image is read).

    Returns:
        The dataset info (modalities :data:`BRATS_MODALITIES` unless ``medmodal.json`` says otherwise) and one
        record per case folder, sorted by case id, holding only the modalities whose files exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; a BraTS dataset is a folder of case folders")
    meta = _read_sidecar(root)
    modalities = _info_from_sidecar(meta, root).modalities
    extra = tuple(m for m in modalities if m not in MODALITY_ALIASES.values())
    records = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        record = _read_case_folder(folder, extra)
        if record is not None:
            records[record.case_id] = record
    if not records:
        raise DataError(
            f"{root}: no BraTS case folders found; expected {root}/<case>/<case>_t1.nii.gz, _t1ce, _t2, "
            "_flair and _seg (or the BraTS 2023 names -t1n, -t1c, -t2w, -t2f, -seg)"
        )
    _read_metadata(root, records)
    return _info_from_sidecar(meta, root), list(records.values())


def write_brats(
    cases: Iterable[Case], root: Path | str, info: DatasetInfo, *, overwrite: bool = False
) -> Path:
    """Write ``cases`` as ``root/<case>/<case>_<modality>.nii.gz`` (+ ``_seg``), ``metadata.csv`` and
    ``medmodal.json``.

    The dataset appears in ``root`` only once every case is written. ``root`` must be missing or empty unless
    ``overwrite`` (then same-named entries are replaced).

    Returns:
        ``root``.
    """
    root = Path(root)
    with staged_output_dir(root, overwrite=overwrite) as stage:
        rows = []
        for case in cases:
            folder = stage / check_case_id(case.case_id)
            if folder.exists():
                raise DataError(f"case id {case.case_id!r} appears twice; case ids must be unique")
            info.check_modalities(list(case.images), where=f"case {case.case_id!r}")
            for name, volume in case.images.items():
                write_image(volume, folder / f"{case.case_id}_{name}.nii.gz", dtype="float32")
            if case.label is not None:
                label = case.label.array
                write_image(case.label, folder / f"{case.case_id}_seg.nii.gz", dtype=compact_int_dtype(label))
            rows.append((case.case_id, "" if case.target is None else str(case.target), case.report or ""))
        write_csv(stage / METADATA, ["case_id", "target", "report"], rows)
        sidecar = {"name": info.name, "synthetic": info.synthetic, "modalities": list(info.modalities),
                   "labels": list(info.labels), "regions": {k: list(v) for k, v in info.regions.items()}}
        atomic_write_text(stage / SIDECAR, json.dumps(sidecar, indent=2) + "\n")
    return root
