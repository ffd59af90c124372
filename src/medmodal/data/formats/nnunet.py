"""The nnU-Net v2 raw layout: ``dataset.json``, ``imagesTr/<case>_<XXXX>.nii.gz``, ``labelsTr/<case>.nii.gz``,
and optionally ``imagesTs/``.

``dataset.json`` holds ``channel_names`` (``{"0": "T1", ...}``), ``labels`` (``{"background": 0, ...}``; a
list value marks nnU-Net's region-based training), ``numTraining`` and ``file_ending``. Channel names are
lower-cased and mapped through :data:`~medmodal.data.formats.brats.MODALITY_ALIASES`. A case whose channel
file is missing has that modality missing (a medmodal extension: nnU-Net itself needs every channel).

nnU-Net wants consecutive label values, so :func:`write_nnunet` stores the sorted ``info.labels`` as
``0..K-1`` and records the original values (and targets, reports, regions, the synthetic flag) under the
``"medmodal"`` key; :func:`read_nnunet` returns a :class:`DatasetInfo` whose ``label_map`` maps
them back when the label files are read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from medmodal.atomic import atomic_write_text
from medmodal.data.case import BRATS_LABELS, Case, CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.formats.brats import canonical_modality, check_case_id
from medmodal.data.io import compact_int_dtype, read_json_object, staged_output_dir, write_image

__all__ = ["read_nnunet", "write_nnunet"]

DATASET_JSON = "dataset.json"
_BRATS_NAMES = ("background", "necrosis", "edema", "enhancing_tumor")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(
            f"{path}: not found; an nnU-Net v2 raw dataset has dataset.json next to imagesTr/ and labelsTr/ "
            "(see nnU-Net's dataset_format.md), or use a BraTS folder or a CSV/JSON manifest"
        )
    return read_json_object(path, expected="'channel_names', 'labels' and 'file_ending'")


def _channels(meta: dict, path: Path) -> dict[int, str]:
    raw = meta.get("channel_names", meta.get("modality"))  # "modality" is nnU-Net v1's key
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: needs 'channel_names', e.g. {{\"0\": \"T1\", \"1\": \"FLAIR\"}}")
    try:
        channels = {int(k): canonical_modality(str(v)) for k, v in raw.items()}
    except ValueError as err:
        message = f"{path}: 'channel_names' keys must be channel indices \"0\", \"1\", ... ({err})"
        raise DataError(message) from err
    names = list(channels.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: several channels are named {duplicates} (after lower-casing); rename them")
    return dict(sorted(channels.items()))


def _brats_like(names: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
    """BraTS WT/TC/ET regions if the label names read like BraTS (oedema, necrosis, enhancing tumour)."""
    edema, core, enhancing = [], [], []
    for name, values in names.items():
        key = name.lower().replace("_", " ").replace("-", " ")
        if "edema" in key or "oedema" in key or key in ("ed", "snfh"):
            edema += values
        elif ("enhanc" in key and "non" not in key) or key in ("et",):
            enhancing += values
        elif "necro" in key or "non" in key or key in ("ncr", "net", "netc", "ncr/net"):
            core += values
    if not (edema and enhancing):
        return None
    return {"WT": tuple(sorted(edema + core + enhancing)), "TC": tuple(sorted(core + enhancing)),
            "ET": tuple(sorted(enhancing))}


def _labels(meta: dict, path: Path) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]], dict[int, int]]:
    """``(labels, regions, stored value → label value)`` from ``labels`` and the ``medmodal`` extras."""
    raw = meta.get("labels")
    if isinstance(raw, dict) and raw and all(str(k).isdigit() for k in raw):  # v1: {"0": "background"}
        raw = {str(v): int(k) for k, v in raw.items()}
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: needs 'labels', e.g. {{\"background\": 0, \"tumour\": 1}}")
    try:
        named = {str(k): tuple(int(x) for x in (v if isinstance(v, list) else [v])) for k, v in raw.items()}
        extras = meta.get("medmodal") or {}
        stored = sorted({0, *(x for v in named.values() for x in v)})
        label_map = {int(k): int(v) for k, v in (extras.get("label_values") or {}).items()}
        label_map = {s: label_map.get(s, s) for s in stored}
        saved = extras.get("regions")
        regions = {str(k): tuple(int(x) for x in v) for k, v in saved.items()} if saved else None
    except (TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: 'labels' values must be integers or lists of integers ({err})") from err
    foreground = {k: v for k, v in named.items() if v != (0,)}
    if regions is None:
        region_based = any(isinstance(v, list) for v in raw.values())
        regions = (None if region_based else _brats_like(foreground)) or foreground
        regions = {k: tuple(sorted(label_map[x] for x in v)) for k, v in regions.items()}
    return tuple(sorted(set(label_map.values()))), regions, label_map


def _index(folder: Path, ending: str, channels: dict[int, str], labelled: bool) -> dict[str, CaseRecord]:
    records: dict[str, CaseRecord] = {}
    if not folder.is_dir():
        return records
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        match = _CHANNEL_FILE.match(path.name[: -len(ending)])
        if match is None:
            raise DataError(f"{path}: expected a name like <case>_0000{ending} (case id, channel index)")
        channel = int(match["channel"])
        if channel not in channels:
            raise DataError(f"{path}: channel {channel:04d} is not in dataset.json's channels {channels}")
        case_id = match["case"]
        record = records.setdefault(case_id, CaseRecord(case_id=case_id, images={}))
        record.images[channels[channel]] = path
        if labelled and (folder.parent / "labelsTr" / f"{case_id}{ending}").is_file():
            record.label = folder.parent / "labelsTr" / f"{case_id}{ending}"
    return records


def read_nnunet(root: Path | str) -> tuple[DatasetInfo, list[CaseRecord]]:
    """Index an nnU-Net v2 raw dataset (no image is read).

    Args:
        root: the dataset folder (``Dataset001_Name``) or its ``dataset.json``.

    Returns:
        The dataset info (with a ``label_map`` when the stored label values differ from the original
        ones) and the records of ``imagesTr`` (with their ``labelsTr`` file) and ``imagesTs`` (unlabelled).
    """
    root = Path(root)
    root = root.parent if root.name == DATASET_JSON else root
    path = root / DATASET_JSON
    meta = _load_json(path)
    channels = _channels(meta, path)
    ending = str(meta.get("file_ending", ".nii.gz"))
    labels, regions, label_map = _labels(meta, path)
    records = _index(root / "imagesTr", ending, channels, labelled=True)
    for case_id, record in _index(root / "imagesTs", ending, channels, labelled=False).items():
        if case_id in records:
            raise DataError(f"{root}: case {case_id!r} is in both imagesTr/ and imagesTs/; keep one")
        records[case_id] = record
    labels_dir = root / "labelsTr"
    for label in sorted(labels_dir.glob(f"*{ending}")) if labels_dir.is_dir() else []:
        case_id = label.name[: -len(ending)]
        if case_id not in records and not label.name.startswith("."):
            records[case_id] = CaseRecord(case_id=case_id, images={}, label=label)  # reported by read_case
    if not records:
        raise DataError(f"{root}: no images found; expected imagesTr/<case>_0000{ending}")
    extras = meta.get("medmodal") or {}
    for key, attr, convert in (("targets", "target", int), ("reports", "report", str)):
        for case_id, value in (extras.get(key) or {}).items():
            if case_id not in records:
                raise DataError(f"{path}: medmodal.{key} names case {case_id!r}, which has no image files")
            setattr(records[case_id], attr, None if value is None else convert(value))
    kwargs = dict(name=str(meta.get("name", root.name)), modalities=tuple(channels.values()), labels=labels,
                  regions=regions, synthetic=bool(extras.get("synthetic", False)))
    remapped = any(k != v for k, v in label_map.items())
    info = DatasetInfo(**kwargs, label_map=label_map if remapped else None)
    return info, sorted(records.values(), key=lambda r: r.case_id)


def _label_names(values: list[int]) -> dict[str, int]:
    if tuple(values) == BRATS_LABELS:
        return {name: i for i, name in enumerate(_BRATS_NAMES)}
    return {("background" if v == 0 else f"label_{v}"): i for i, v in enumerate(values)}


def write_nnunet(
    cases: Iterable[Case], root: Path | str, info: DatasetInfo, *, overwrite: bool = False
) -> Path:
    """Write ``cases`` in the nnU-Net v2 raw layout: labelled cases to ``imagesTr``/``labelsTr``, unlabelled
    ones to ``imagesTs``; a missing modality has no channel file.

    Label values ``sorted(info.labels)`` are stored as ``0..K-1``; the mapping, targets, reports, regions and
    the synthetic flag go under ``dataset.json["medmodal"]`` so that :func:`read_nnunet` restores them.

    Returns:
        ``root``.
    """
    root = Path(root)
    values = sorted({0, *info.labels})
    lut = {v: i for i, v in enumerate(values)}
    targets: dict[str, int] = {}
    reports: dict[str, str] = {}
    seen: set[str] = set()
    with staged_output_dir(root, overwrite=overwrite) as stage:
        for case in cases:
            case_id = check_case_id(case.case_id)
            if case_id in seen:
                raise DataError(f"case id {case_id!r} appears twice; case ids must be unique")
            seen.add(case_id)
            info.check_modalities(list(case.images), where=f"case {case_id!r}")
            folder = stage / ("imagesTr" if case.label is not None else "imagesTs")
            for channel, name in enumerate(info.modalities):
                if name in case.images:
                    file = folder / f"{case_id}_{channel:04d}.nii.gz"
                    write_image(case.images[name], file, dtype="float32")
            if case.label is not None:
                present = np.unique(case.label.array).astype(int).tolist()
                unknown = sorted(set(present) - set(lut))
                if unknown:
                    raise DataError(f"case {case_id!r}: label values {unknown} are not in labels {values}")
                stored = np.zeros_like(case.label.array, dtype=np.int64)
                for v in present:
                    stored[case.label.array == v] = lut[v]
                write_image(Volume(stored, case.label.affine), stage / "labelsTr" / f"{case_id}.nii.gz",
                            dtype=compact_int_dtype(stored))
            if case.target is not None:
                targets[case_id] = int(case.target)
            if case.report is not None:
                reports[case_id] = case.report
        dataset = {
            "name": info.name,
            "channel_names": {str(i): m for i, m in enumerate(info.modalities)},
            "labels": _label_names(values),
            "numTraining": sum(1 for _ in (stage / "labelsTr").glob("*.nii.gz")),
            "file_ending": ".nii.gz",
            "medmodal": {"targets": targets, "reports": reports, "synthetic": info.synthetic,
                         "label_values": {str(i): v for v, i in lut.items()},
                         "regions": {k: list(v) for k, v in info.regions.items()}},
        }
        atomic_write_text(stage / DATASET_JSON, json.dumps(dataset, indent=2) + "\n")
    return root

