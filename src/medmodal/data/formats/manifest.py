"""A plain CSV or JSON manifest that lists each case's files.

CSV: a header ``case_id,<modality>...,label,target,report``; every column other than ``case_id``, ``label``,
``target`` and ``report`` (in any letter case: ``Label`` is ``label``) is a modality, named through
:func:`~medmodal.data.formats.brats.canonical_modality` (``T1`` is ``t1``, ``T1ce`` is ``t1c``); an empty cell is
a missing modality. JSON::

    {"name": "my-data", "modalities": ["t1", "flair"], "labels": [0, 1], "regions": {"lesion": [1]},
     "synthetic": false,
     "cases": [{"case_id": "a", "images": {"t1": "a/t1.nii.gz"}, "label": "a/seg.nii.gz", "target": 1,
                "report": "..."}]}

Only ``modalities`` and ``cases`` (with ``case_id`` and ``images``) are required. Relative paths start at the
manifest's folder. Unlike the folder layouts, a *listed* file that does not exist is an error.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medmodal.atomic import atomic_write_text, csv_text
from medmodal.data.case import BRATS_LABELS, BRATS_REGIONS, Case, CaseRecord, DataError, DatasetInfo
from medmodal.data.formats.brats import canonical_modality, check_case_id
from medmodal.data.io import DataErrors, compact_int_dtype, staged_output_dir, write_image

__all__ = ["MANIFEST_NAMES", "read_manifest", "write_manifest", "write_manifest_dataset"]

#: File names :func:`~medmodal.data.formats.detect_format` looks for in a folder.
MANIFEST_NAMES: tuple[str, ...] = ("manifest.csv", "manifest.json")
_RESERVED = ("case_id", "label", "target", "report")
_Problem = tuple[str | None, Path | None, str]


class _Reader:
    """Collects every problem of a manifest, then raises them together."""

    def __init__(self, path: Path, info: DatasetInfo) -> None:
        self.path, self.info = path, info
        self.records: dict[str, CaseRecord] = {}
        self.problems: list[_Problem] = []

    def file(self, value: object, where: str, case_id: str | None) -> Path | None:
        text = "" if value is None else str(value).strip()
        if not text:
            return None
        path = Path(text).expanduser()
        path = path if path.is_absolute() else Path(os.path.normpath(self.path.parent / path))
        if not path.exists():
            self.problems.append((case_id, path, f"{where}: file {path} does not exist; fix the path in the "
                                  "manifest or remove the entry (an empty entry means a missing modality)"))
            return None
        return path

    def add(self, where: str, case_id: str, images: dict[str, object], row: dict[str, object]) -> None:
        if not case_id:
            self.problems.append((None, self.path, f"{where}: empty case_id; every case needs an id"))
            return
        if case_id in self.records:
            self.problems.append((case_id, self.path, f"{where}: case id {case_id!r} appears twice; ids must "
                                  "be unique"))
            return
        try:
            self.info.check_modalities(list(images), where=f"{where} (case {case_id!r})")
        except DataError as err:
            self.problems.append((case_id, self.path, str(err)))
            return
        listed = {m: v for m, v in images.items() if v is not None and str(v).strip()}
        if not listed:
            self.problems.append((case_id, self.path, f"{where}: case {case_id!r} lists no image; give at "
                                  f"least one of {list(self.info.modalities)}"))
            return
        files = {m: self.file(v, where, case_id) for m, v in listed.items()}
        record = CaseRecord(case_id, {m: p for m, p in files.items() if p is not None})
        record.label = self.file(row.get("label"), where, case_id)
        target = row.get("target")
        if target not in (None, ""):
            try:
                record.target = int(str(target))
            except ValueError:
                self.problems.append((case_id, self.path, f"{where}: target {target!r} is not an integer"))
        record.report = str(row["report"]) if row.get("report") not in (None, "") else None
        self.records[case_id] = record

    def result(self) -> tuple[DatasetInfo, list[CaseRecord]]:
        if self.problems:
            raise DataErrors(self.problems, where=str(self.path))
        if not self.records:
            raise DataError(f"{self.path}: lists no case; add one row (or entry) per case")
        return self.info, list(self.records.values())


def _read_csv(path: Path) -> tuple[DatasetInfo, list[CaseRecord]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        roles = [h.lower() for h in header]  # column roles are matched case-insensitively: Label is label
        twice = sorted({r for r in roles if r in _RESERVED and roles.count(r) > 1})
        if twice:
            raise DataError(f"{path}: the column(s) {twice} appear twice (names are case-insensitive); keep one")
        columns = {h: canonical_modality(h) for h, r in zip(header, roles, strict=True) if r not in _RESERVED}
        if "case_id" not in roles or not columns:
            raise DataError(f"{path}: needs a header 'case_id,<modality>,...[,label,target,report]', got {header}")
        names = list(columns.values())
        if len(set(names)) != len(names):
            raise DataError(f"{path}: two columns name the same modality ({names}); keep one")
        state = _Reader(path, DatasetInfo(name=path.stem, modalities=tuple(names)))
        for row in reader:
            row = {(k or "").strip(): v for k, v in row.items()}
            row.update({r: row.get(h) for h, r in zip(header, roles, strict=True) if r in _RESERVED})
            images = {m: row.get(h) for h, m in columns.items()}
            state.add(f"{path}, line {reader.line_num}", (row.get("case_id") or "").strip(), images, row)
    return state.result()


def _read_json(path: Path) -> tuple[DatasetInfo, list[CaseRecord]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        modalities = tuple(canonical_modality(str(m)) for m in data["modalities"])
        cases = data["cases"]
        info = DatasetInfo(
            name=str(data.get("name", path.stem)), modalities=modalities,
            labels=tuple(int(v) for v in data.get("labels", BRATS_LABELS)),
            regions={str(k): tuple(int(x) for x in v) for k, v in data.get("regions", BRATS_REGIONS).items()},
            synthetic=bool(data.get("synthetic", False)),
        )
        if not isinstance(cases, list):
            raise TypeError("'cases' must be a list")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(
            f"{path}: not a medmodal JSON manifest ({type(err).__name__}: {err}); it needs "
            "{\"modalities\": [...], \"cases\": [{\"case_id\": ..., \"images\": {modality: path}}, ...]}"
        ) from err
    state = _Reader(path, info)
    for i, entry in enumerate(cases):
        where = f"{path}, cases[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("images", {}), dict):
            state.problems.append((None, path, f"{where}: must be an object with 'case_id' and 'images'"))
            continue
        images = {canonical_modality(str(m)): v for m, v in entry.get("images", {}).items()}
        state.add(where, str(entry.get("case_id") or "").strip(), images, entry)
    return state.result()


def read_manifest(path: Path | str) -> tuple[DatasetInfo, list[CaseRecord]]:
    """Index a CSV or JSON manifest (no image is read).

    Raises:
        DataError: unreadable manifest; or :class:`~medmodal.data.io.DataErrors` listing every duplicate id,
            unknown modality, case without an image, bad target and listed file that does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; give the path of a .csv or .json manifest")
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.suffix.lower() == ".json":
        return _read_json(path)
    raise DataError(f"{path}: a manifest must be a .csv or .json file")


def _relative(path: Path | None, folder: Path) -> str:
    if path is None:
        return ""
    try:
        return Path(os.path.relpath(Path(path).resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_posix()


def write_manifest(
    records: Sequence[CaseRecord], path: Path | str, info: DatasetInfo, *, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``records`` as a ``.csv`` or ``.json`` manifest (atomically) with paths relative to its folder.

    A CSV manifest cannot hold the dataset's labels, regions or synthetic flag: when they differ from the
    BraTS defaults, write a ``.json`` manifest. ``extra`` adds top-level keys to a ``.json`` manifest (the
    reader ignores keys it does not know); a CSV manifest cannot hold them.
    """
    path = Path(path)
    folder = path.parent
    kind = path.suffix.lower()
    if kind == ".csv":
        if tuple(info.labels) != BRATS_LABELS or dict(info.regions) != BRATS_REGIONS or info.synthetic or extra:
            raise DataError(
                f"{path}: a CSV manifest cannot record labels {list(info.labels)}, regions, the synthetic "
                "flag or other dataset keys; write a .json manifest instead"
            )
        rows = []
        for r in records:
            images = [_relative(r.images.get(m), folder) for m in info.modalities]
            target = "" if r.target is None else r.target
            rows.append([r.case_id, *images, _relative(r.label, folder), target, r.report or ""])
        text = csv_text(["case_id", *info.modalities, "label", "target", "report"], rows)
    elif kind == ".json":
        cases = []
        for r in records:
            entry: dict[str, object] = {"case_id": r.case_id,
                                        "images": {m: _relative(p, folder) for m, p in r.images.items()}}
            entry.update({k: v for k, v in (("label", _relative(r.label, folder) or None), ("target", r.target),
                                            ("report", r.report)) if v is not None})
            cases.append(entry)
        text = json.dumps({"name": info.name, "modalities": list(info.modalities), "labels": list(info.labels),
                           "regions": {k: list(v) for k, v in info.regions.items()},
                           "synthetic": info.synthetic, **(extra or {}), "cases": cases}, indent=2) + "\n"
    else:
        raise DataError(f"{path}: a manifest must end in .csv or .json")
    return atomic_write_text(path, text)


def write_manifest_dataset(
    cases: Iterable[Case], root: Path | str, info: DatasetInfo, *, overwrite: bool = False
) -> Path:
    """Write ``cases`` as ``root/images/<case>_<modality>.nii.gz``, ``root/labels/<case>.nii.gz`` and a
    ``root/manifest.json`` that lists them with relative paths. Returns ``root``."""
    root = Path(root)
    records: dict[str, CaseRecord] = {}
    with staged_output_dir(root, overwrite=overwrite) as stage:
        for case in cases:
            case_id = check_case_id(case.case_id)
            if case_id in records:
                raise DataError(f"case id {case_id!r} appears twice; case ids must be unique")
            info.check_modalities(list(case.images), where=f"case {case_id!r}")
            record = CaseRecord(case_id, {}, target=case.target, report=case.report)
            for name, volume in case.images.items():
                record.images[name] = write_image(volume, stage / "images" / f"{case_id}_{name}.nii.gz",
                                                  dtype="float32")
            if case.label is not None:
                record.label = write_image(case.label, stage / "labels" / f"{case_id}.nii.gz",
                                           dtype=compact_int_dtype(case.label.array))
            records[case_id] = record
        write_manifest(list(records.values()), stage / "manifest.json", info)  # paths relative to the stage
    return root
