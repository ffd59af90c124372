"""A plain CSV or JSON manifest that lists each case's files.

CSV: a header ``case_id,<modality>...,label,target,report,source``; every column other than the reserved
``case_id``, ``label``, ``target``, ``report`` and ``source`` (in any letter case: ``Label`` is ``label``) is a
modality, named through :func:`~medmodal.data.formats.brats.canonical_modality` (``T1`` is ``t1``, ``T1ce`` is
``t1c``); an empty cell is a missing modality. The dataset's own keys live in a side file ``medmodal.json`` beside
the CSV (optional; every key optional; a ``modalities`` key there is for people, the columns name them)::

    {"name": "chest", "labels": [0, 1], "regions": {"lung": [1]}, "classes": ["normal", "opacity"],
     "synthetic": false, "label_map": {"0": 0, "255": 1}}

JSON: the same keys at the top level, plus the modalities and the cases::

    {"name": "my-data", "modalities": ["t1", "flair"], "labels": [0, 1], "regions": {"lesion": [1]},
     "classes": ["low", "high"], "synthetic": false,
     "cases": [{"case_id": "a", "images": {"t1": "a/t1.nii.gz"}, "label": "a/seg.nii.gz", "target": "high",
                "report": "...", "source": "hospital A"}]}

Only ``modalities`` and ``cases`` (with ``case_id`` and ``images``) are required. Relative paths start at the
manifest's folder. Unlike the folder layouts, a *listed* file that does not exist is an error.

Two tasks with separate label sets fit one manifest: a row may have a mask (``label``), a class label
(``target``), both or neither (an unlabelled image), and a ``source`` (the site or scanner it comes from).

* ``target`` is a class index (``0``, ``1``, ...) or a class name. With ``classes`` declared (the JSON key, or
  the CSV's ``medmodal.json``), a name must be one of them and an index must be in range; without a declaration,
  the class names are the sorted distinct names of the target column (``medmodal data check`` says so with a
  warning, :class:`ClassNamesWarning`).
* ``label_map`` maps the values stored in the mask files to label values, for masks not stored as the labels
  themselves. A lung mask saved as 0/255 (JSRT, Montgomery) reads with ``"labels": [0, 1], "label_map": {"255": 1}``
  (declared labels map to themselves unless listed, so 0 stays 0).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medmodal.atomic import atomic_write_text, csv_text
from medmodal.data.case import BRATS_LABELS, BRATS_REGIONS, Case, CaseRecord, DataError, DatasetInfo
from medmodal.data.formats.brats import canonical_modality, check_case_id
from medmodal.data.io import DataErrors, compact_int_dtype, read_json_object, staged_output_dir, write_image

__all__ = ["MANIFEST_NAMES", "SIDE_FILE", "ClassNamesWarning", "read_manifest", "write_manifest",
           "write_manifest_dataset"]

#: File names :func:`~medmodal.data.formats.detect_format` looks for in a folder.
MANIFEST_NAMES: tuple[str, ...] = ("manifest.csv", "manifest.json")
#: The file beside a CSV manifest that holds the dataset's keys (name, labels, regions, classes, ...).
SIDE_FILE = "medmodal.json"
_RESERVED = ("case_id", "label", "target", "report", "source")
_INDEX = re.compile(r"[+-]?\d+")
_Problem = tuple[str | None, Path | None, str]


class ClassNamesWarning(UserWarning):
    """A manifest gives class names in ``target`` without declaring ``classes``: the sorted distinct names are
    used, in that order (the message lists them and says where to declare them)."""


def _dataset_keys(data: Mapping[str, Any], *, name: str, where: Path) -> dict[str, Any]:
    """:class:`DatasetInfo` keyword arguments from a manifest's (or side file's) ``name``, ``labels``,
    ``regions``, ``classes``, ``synthetic`` and ``label_map``; :class:`DataError` naming ``where`` otherwise."""
    try:
        labels = tuple(int(v) for v in data.get("labels", BRATS_LABELS))
        regions = {str(k): tuple(int(x) for x in v) for k, v in data.get("regions", BRATS_REGIONS).items()}
        classes = data.get("classes")
        if classes is not None:
            if isinstance(classes, str) or not all(isinstance(c, str) and c.strip() for c in classes):
                raise ValueError(f"'classes' must be a list of non-empty names, got {classes!r}")
            classes = tuple(c.strip() for c in classes)
        label_map = data.get("label_map")
        if label_map is not None:
            label_map = {int(k): int(v) for k, v in label_map.items()}
    except (TypeError, ValueError, AttributeError) as err:
        raise DataError(
            f"{where}: 'labels' must be a list of integers, 'regions' an object of integer lists, 'classes' a list of "
            f"names and 'label_map' an object of stored value -> label value, e.g. {{\"255\": 1}} ({err})"
        ) from err
    if classes is not None:
        if len(set(classes)) != len(classes) or not classes:
            raise DataError(f"{where}: 'classes' {list(classes)} must list each class name once")
        numeric = [c for c in classes if _INDEX.fullmatch(c)]
        if numeric:
            raise DataError(f"{where}: class name(s) {numeric} look like class indices; use names such as "
                            "'normal', or leave 'classes' out and give integer targets")
    if label_map is not None:
        wrong = {k: v for k, v in label_map.items() if v not in labels}
        if wrong:
            raise DataError(f"{where}: 'label_map' maps stored value(s) to {sorted(set(wrong.values()))}, which "
                            f"'labels' {list(labels)} does not list; map each stored value to a declared label")
        label_map = {**{v: v for v in labels}, **label_map}  # declared labels stand for themselves
        if all(k == v for k, v in label_map.items()):
            label_map = None
    return {"name": str(data.get("name", name)), "labels": labels, "regions": regions,
            "synthetic": bool(data.get("synthetic", False)), "class_names": classes, "label_map": label_map}


class _Reader:
    """Collects every problem of a manifest, then raises them together."""

    def __init__(self, path: Path, info: DatasetInfo, *, declared_in: Path | None) -> None:
        self.path, self.info = path, info
        self.declared_in = declared_in  # where the classes are declared (None: not declared)
        self.records: dict[str, CaseRecord] = {}
        self.problems: list[_Problem] = []
        self.named: dict[str, tuple[str, str]] = {}  # case id -> (where, class name) while classes are undeclared
        self.indexed: dict[str, str] = {}  # case id -> where, for integer targets

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

    def target(self, value: object, where: str, case_id: str) -> int | None:
        """The class index of a ``target`` entry (an index or a class name); problems are collected."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        classes = self.info.class_names
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.problems.append((case_id, self.path, f"{where}: target {value!r} is neither a class index nor a "
                                  "class name"))
            return None
        text = str(value).strip()
        if _INDEX.fullmatch(text):
            index = int(text)
            if index < 0 or (classes is not None and index >= len(classes)):
                valid = ("a non-negative integer" if classes is None
                         else f"0..{len(classes) - 1} (classes {list(classes)})")
                self.problems.append((case_id, self.path, f"{where}: target {index} is not a class index; give "
                                      f"{valid}"))
                return None
            self.indexed[case_id] = where
            return index
        if classes is None:
            self.named[case_id] = (where, text)  # resolved once every row is read
            return None
        if text not in classes:
            self.problems.append((case_id, self.path, f"{where}: case {case_id!r}: unknown class name {text!r}; "
                                  f"the classes declared in {self.declared_in} are {list(classes)} (fix the row, or "
                                  "add the class to 'classes')"))
            return None
        return classes.index(text)

    def add(self, where: str, case_id: str, images: dict[str, object], row: Mapping[str, object]) -> None:
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
        record.target = self.target(row.get("target"), where, case_id)
        record.report = str(row["report"]) if row.get("report") not in (None, "") else None
        source = row.get("source")
        record.source = (str(source).strip() or None) if source is not None else None
        self.records[case_id] = record

    def _resolve_names(self) -> None:
        """Without declared classes, class names become the sorted distinct names (with a warning)."""
        if not self.named:
            return
        if self.indexed:
            case_id, where = next(iter(self.indexed.items()))
            self.problems.append((case_id, self.path, (
                f"{where}: target is a class index but other rows give class names (e.g. "
                f"{next(iter(self.named.values()))[1]!r}); give names in every row, or declare the classes "
                f"({self._where_to_declare()}) so that indices and names can mix")))
            return
        classes = tuple(sorted({name for _, name in self.named.values()}))
        self.info = dataclasses.replace(self.info, class_names=classes)
        for case_id, (_, name) in self.named.items():
            if case_id in self.records:
                self.records[case_id].target = classes.index(name)
        warnings.warn(
            f"{self.path}: the targets are class names but no classes are declared; using the sorted distinct "
            f"names {list(classes)} as classes 0..{len(classes) - 1}. Declare them ({self._where_to_declare()}) "
            "to fix their order", ClassNamesWarning, stacklevel=4)

    def _where_to_declare(self) -> str:
        if self.path.suffix.lower() == ".csv":
            return f"\"classes\": [...] in {self.path.parent / SIDE_FILE}"
        return f"\"classes\": [...] in {self.path}"

    def result(self) -> tuple[DatasetInfo, list[CaseRecord]]:
        self._resolve_names()
        if self.problems:
            raise DataErrors(self.problems, where=str(self.path))
        if not self.records:
            raise DataError(f"{self.path}: lists no case; add one row (or entry) per case")
        return self.info, list(self.records.values())


def _read_csv(path: Path) -> tuple[DatasetInfo, list[CaseRecord]]:
    side = path.parent / SIDE_FILE
    meta = read_json_object(side, expected="dataset keys such as 'classes' and 'labels'") if side.is_file() else {}
    keys = _dataset_keys(meta, name=path.stem, where=side)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        roles = [h.lower() for h in header]  # column roles are matched case-insensitively: Label is label
        twice = sorted({r for r in roles if r in _RESERVED and roles.count(r) > 1})
        if twice:
            raise DataError(f"{path}: the column(s) {twice} appear twice (names are case-insensitive); keep one")
        columns = {h: canonical_modality(h) for h, r in zip(header, roles, strict=True) if r not in _RESERVED}
        if "case_id" not in roles or not columns:
            raise DataError(f"{path}: needs a header 'case_id,<modality>,...[,label,target,report,source]', got "
                            f"{header}")
        names = list(columns.values())
        if len(set(names)) != len(names):
            raise DataError(f"{path}: two columns name the same modality ({names}); keep one")
        info = DatasetInfo(modalities=tuple(names), **keys)
        state = _Reader(path, info, declared_in=side if keys["class_names"] is not None else None)
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
        if not isinstance(cases, list):
            raise TypeError("'cases' must be a list")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(
            f"{path}: not a medmodal JSON manifest ({type(err).__name__}: {err}); it needs "
            "{\"modalities\": [...], \"cases\": [{\"case_id\": ..., \"images\": {modality: path}}, ...]}"
        ) from err
    keys = _dataset_keys(data, name=path.stem, where=path)
    state = _Reader(path, DatasetInfo(modalities=modalities, **keys),
                    declared_in=path if keys["class_names"] is not None else None)
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

    Warns:
        ClassNamesWarning: the targets are class names and no ``classes`` are declared.

    Raises:
        DataError: unreadable manifest or side file; or :class:`~medmodal.data.io.DataErrors` listing every
            duplicate id, unknown modality, case without an image, bad target (unknown class name, index out of
            range) and listed file that does not exist, each naming its row.
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


def _dataset_dict(info: DatasetInfo) -> dict[str, Any]:
    """The dataset's keys as written to a JSON manifest or a CSV's side file."""
    out: dict[str, Any] = {"name": info.name, "labels": list(info.labels),
                           "regions": {k: list(v) for k, v in info.regions.items()}, "synthetic": info.synthetic}
    if info.class_names is not None:
        out["classes"] = list(info.class_names)
    if info.label_map and any(k != v for k, v in info.label_map.items()):
        out["label_map"] = {str(k): v for k, v in sorted(info.label_map.items())}
    return out


def _target_text(record: CaseRecord, info: DatasetInfo) -> str | int:
    if record.target is None:
        return ""
    names = info.class_names
    return names[record.target] if names is not None and 0 <= record.target < len(names) else record.target


def write_manifest(
    records: Sequence[CaseRecord],
    path: Path | str,
    info: DatasetInfo,
    *,
    extra: Mapping[str, Any] | None = None,
    side_file: bool = False,
) -> Path:
    """Write ``records`` as a ``.csv`` or ``.json`` manifest (atomically) with paths relative to its folder.

    Targets are written as class names when ``info.class_names`` is set, else as indices; ``source`` (and
    ``report``) are written when some record has one. A CSV manifest by itself cannot hold the dataset's labels,
    regions, classes, label mapping or synthetic flag: when they differ from the defaults, pass ``side_file=True``
    to write them to ``medmodal.json`` beside the CSV (replacing one there), or write a ``.json`` manifest.
    ``extra`` adds top-level keys to a ``.json`` manifest (the reader ignores keys it does not know).
    """
    path = Path(path)
    folder = path.parent
    kind = path.suffix.lower()
    if kind == ".csv":
        plain = (tuple(info.labels) == BRATS_LABELS and dict(info.regions) == BRATS_REGIONS and not info.synthetic
                 and info.class_names is None and "label_map" not in _dataset_dict(info))
        if extra or (not plain and not side_file):
            raise DataError(
                f"{path}: a CSV manifest cannot record labels {list(info.labels)}, regions, classes, a label map, "
                "the synthetic flag or other dataset keys; write a .json manifest instead"
            )
        optional = [k for k in ("report", "source") if any(getattr(r, k) is not None for r in records)]
        rows = []
        for r in records:
            images = [_relative(r.images.get(m), folder) for m in info.modalities]
            rest = [getattr(r, k) or "" for k in optional]
            rows.append([r.case_id, *images, _relative(r.label, folder), _target_text(r, info), *rest])
        text = csv_text(["case_id", *info.modalities, "label", "target", *optional], rows)
        if side_file and not plain:
            keys = _dataset_dict(info)
            keys = {"name": keys.pop("name"), "modalities": list(info.modalities), **keys}  # modalities: for people
            atomic_write_text(folder / SIDE_FILE, json.dumps(keys, indent=2) + "\n")
    elif kind == ".json":
        cases = []
        for r in records:
            entry: dict[str, object] = {"case_id": r.case_id,
                                        "images": {m: _relative(p, folder) for m, p in r.images.items()}}
            target = _target_text(r, info)
            entry.update({k: v for k, v in (("label", _relative(r.label, folder) or None),
                                            ("target", None if target == "" else target),
                                            ("report", r.report), ("source", r.source)) if v is not None})
            cases.append(entry)
        keys = _dataset_dict(info)
        text = json.dumps({"name": keys.pop("name"), "modalities": list(info.modalities), **keys, **(extra or {}),
                           "cases": cases}, indent=2) + "\n"
    else:
        raise DataError(f"{path}: a manifest must end in .csv or .json")
    return atomic_write_text(path, text)


def write_manifest_dataset(
    cases: Iterable[Case], root: Path | str, info: DatasetInfo, *, overwrite: bool = False
) -> Path:
    """Write ``cases`` as ``root/images/<case>_<modality>.nii.gz``, ``root/labels/<case>.nii.gz`` and a
    ``root/manifest.json`` that lists them with relative paths. Returns ``root``.

    The label files hold label values (as :func:`~medmodal.data.io.read_case` returns them), so the manifest
    records no ``label_map``."""
    root = Path(root)
    records: dict[str, CaseRecord] = {}
    with staged_output_dir(root, overwrite=overwrite) as stage:
        for case in cases:
            case_id = check_case_id(case.case_id)
            if case_id in records:
                raise DataError(f"case id {case_id!r} appears twice; case ids must be unique")
            info.check_modalities(list(case.images), where=f"case {case_id!r}")
            record = CaseRecord(case_id, {}, target=case.target, report=case.report, source=case.source)
            for name, volume in case.images.items():
                record.images[name] = write_image(volume, stage / "images" / f"{case_id}_{name}.nii.gz",
                                                  dtype="float32")
            if case.label is not None:
                record.label = write_image(case.label, stage / "labels" / f"{case_id}.nii.gz",
                                           dtype=compact_int_dtype(case.label.array))
            records[case_id] = record
        # paths relative to the stage
        write_manifest(list(records.values()), stage / "manifest.json", dataclasses.replace(info, label_map=None))
    return root
