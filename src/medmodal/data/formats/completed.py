"""A *completed* data set: the input's own files plus synthesised images for the modalities each case lacked.

:func:`write_completed_dataset` writes it in the input's layout, so every command that reads the input reads the
output unchanged (``data check``, ``predict``, ``evaluate``, training). It never names a synthesis method: the
caller passes the arrays and whatever provenance it wants recorded.

* Every acquired image and label is **copied byte for byte** under a name the layout reads back (only an input that
  is not a single file the layout can hold, e.g. a DICOM series, is re-encoded as NIfTI).
* Every synthesised image is written as ``float32`` with the **affine of the case's reference image** (its first
  present modality in the data set's order), the grid the caller synthesised on, so it overlays the input exactly.
* The synthetic images are marked three times: in their file names where the layout allows it, in the data set's
  own metadata (``"synthesized_modalities": true`` and ``"synthesized": {case: [modality, ...]}``), and in the
  sidecar ``synthetic.json`` (see :data:`SIDECAR`), which also holds the caller's provenance.

File names per layout (``<sep>`` is the separator the case's files use, ``_`` or BraTS 2023's ``-``):

========== ================================================== ===================================================
layout     acquired files                                     synthesised image
========== ================================================== ===================================================
brats      ``<case>/`` as in the input                        ``<case>/<case><sep><suffix><sep>synthetic.nii.gz``
                                                              (the data set's own suffix, e.g. ``t2f`` or
                                                              ``flair``); read back as that modality
nnunet     ``imagesTr|imagesTs/<case>_XXXX<ending>``,         ``<case>_XXXX<ending>``: the name is fixed by
           ``labelsTr/`` as in the input                      nnU-Net, so the mark lives in ``dataset.json``'s
                                                              ``"medmodal"`` key and the sidecar only
manifest   ``images/<case>_<modality><ending>``,              ``images/<case>_<modality>_synthetic.nii.gz``,
           ``labels/<case><ending>``, ``manifest.json``       listed in ``manifest.json`` like any image
========== ================================================== ===================================================
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmodal.atomic import atomic_write_text, write_csv
from medmodal.data.case import CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.formats.brats import METADATA, SYNTHETIC_MARKER, check_case_id, split_case_file
from medmodal.data.formats.brats import SIDECAR as BRATS_SIDECAR
from medmodal.data.formats.manifest import write_manifest
from medmodal.data.formats.nnunet import DATASET_JSON, _channels
from medmodal.data.io import READ_EXTENSIONS, read_image, read_json_object, staged_output_dir, write_image

__all__ = ["SIDECAR", "CompletedDataset", "read_synthetic_sidecar", "write_completed_dataset"]

#: The sidecar of a completed data set: ``{"synthetic": {case: [modality, ...]}, "complete": [case, ...],
#: "provenance": {...}}``.
SIDECAR = "synthetic.json"
_NIFTI = (".nii.gz", ".nii")
_SINGLE_FILE = (*_NIFTI, ".nrrd", ".mha")  # formats a file copy carries whole (.nhdr/.mhd point to a data file)
_MANIFEST_KEYS = ("name", "modalities", "labels", "regions", "synthetic", "cases")


@dataclass(frozen=True)
class CompletedDataset:
    """What :func:`write_completed_dataset` wrote.

    Attributes:
        root: the output folder.
        format: its layout (one of :data:`~medmodal.data.formats.FORMATS`).
        synthetic: case id → the synthesised modalities the output holds (in the data set's modality order), as in
            the sidecar: those of this call plus any the input's own sidecar listed.
        complete: the cases that had nothing missing (copied unchanged).
        files: case id → modality → file, for the images this call synthesised.
        sidecar: the ``synthetic.json`` file.
    """

    root: Path
    format: str
    synthetic: dict[str, tuple[str, ...]]
    complete: tuple[str, ...]
    files: dict[str, dict[str, Path]]
    sidecar: Path


def _ending(path: Path) -> str:
    name = path.name.lower()
    return next((ext for ext in READ_EXTENSIONS if name.endswith(ext)), path.suffix.lower())


def _copy(src: Path, dst_stem: Path, *, endings: tuple[str, ...]) -> Path:
    """``src`` copied byte for byte to ``dst_stem + its ending`` if it is one file with one of ``endings``; else
    read and re-encoded as ``dst_stem.nii.gz`` (a DICOM series, a two-file format). Returns the new file."""
    ending = _ending(src)
    if src.is_file() and ending in endings:
        dst = dst_stem.with_name(dst_stem.name + ending)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return dst
    return write_image(read_image(src), dst_stem.with_name(dst_stem.name + ".nii.gz"))


def read_synthetic_sidecar(root: Path | str) -> dict[str, Any]:
    """The :data:`SIDECAR` of the data set at ``root`` (a folder, or a file in it such as a manifest); ``{}`` if it
    has none.

    Returns:
        ``{"synthetic": {case: [modality, ...]}, "complete": [case, ...], "provenance": {...}}``.

    Raises:
        DataError: naming the file, if it is not such an object.
    """
    root = Path(root)
    path = (root if root.is_dir() else root.parent) / SIDECAR
    if not path.is_file():
        return {}
    data = read_json_object(path, expected="'synthetic', 'complete' and 'provenance'")
    synthetic, complete = data.get("synthetic", {}), data.get("complete", [])
    if not (isinstance(synthetic, dict) and all(isinstance(v, list) and all(isinstance(m, str) for m in v)
                                                for v in synthetic.values())
            and isinstance(complete, list) and isinstance(data.get("provenance", {}), dict)):
        raise DataError(f"{path}: 'synthetic' must map case ids to lists of modality names, 'complete' be a list "
                        "of case ids and 'provenance' an object; restore the file written with the data set")
    return data


def _checked_arrays(
    record: CaseRecord, info: DatasetInfo, given: Mapping[str, np.ndarray]
) -> tuple[str, dict[str, np.ndarray], Volume | None]:
    """``(reference modality, {modality: float32 array} in the data set's order, reference volume or None)`` after
    checking that ``given`` fills exactly the case's missing modalities, on the reference image's grid."""
    where = f"case {record.case_id!r}"
    info.check_modalities(list(record.images), where=where)
    info.check_modalities(list(given), where=f"{where}, synthesised images")
    present = [m for m in info.modalities if m in record.images]
    if not present:
        raise DataError(f"{where}: no modality is present, nothing to complete it from; give at least one of "
                        f"{list(info.modalities)}")
    replaced = [m for m in given if m in record.images]
    if replaced:
        raise DataError(f"{where}: {replaced} present already ({record.images[replaced[0]]}); a synthesised image "
                        "never replaces an acquired one, synthesise only the missing modalities")
    unfilled = [m for m in info.modalities if m not in record.images and m not in given]
    if unfilled:
        raise DataError(f"{where}: {unfilled} missing and not synthesised; a completed data set has every "
                        f"modality of {list(info.modalities)}")
    if not given:
        return present[0], {}, None
    reference = read_image(record.images[present[0]])
    arrays: dict[str, np.ndarray] = {}
    for m in (m for m in info.modalities if m in given):
        array = np.asarray(given[m])
        if array.shape != reference.shape:
            raise DataError(f"{where}: the synthesised {m!r} has shape {array.shape}, but the case's grid (its "
                            f"{present[0]!r} image {reference.where}) is {reference.shape}; synthesise on the "
                            "input's grid")
        if array.dtype.kind not in "fiu" or not np.isfinite(array).all():
            raise DataError(f"{where}: the synthesised {m!r} holds non-finite or non-numeric values "
                            f"(dtype {array.dtype}); check the synthesis")
        arrays[m] = array.astype(np.float32, copy=False)
    return present[0], arrays, reference


class _Layout:
    """Writes one completed case at a time into ``stage``, then the data set's metadata."""

    def __init__(self, *, stage: Path, source: Path | None, root: Path | None, records: Sequence[CaseRecord],
                 info: DatasetInfo) -> None:
        self.stage, self.records, self.info = stage, records, info
        self.source, self.root = source, root  # as given (a folder or a file in it), and the source's folder

    def add(self, record: CaseRecord, reference: str, arrays: Mapping[str, np.ndarray],
            grid: Volume | None) -> dict[str, Path]:
        """Copy ``record``'s files, write ``arrays`` on ``grid``'s affine; the synthesised files in the stage."""
        raise NotImplementedError

    def finish(self, synthetic: Mapping[str, Sequence[str]]) -> None:
        """Write the data set's metadata, marking the ``synthetic`` images."""
        raise NotImplementedError

    @staticmethod
    def marks(synthetic: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        return {"synthesized_modalities": bool(synthetic), "synthesized": {k: list(v) for k, v in synthetic.items()}}


class _Brats(_Layout):
    """``<case>/<case>_<suffix>.nii.gz``; a synthesised file carries the ``synthetic`` marker in its name."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        counts: dict[str, Counter[str]] = {}
        for record in self.records if self.root is not None else ():
            for m, path in record.images.items():
                parts = split_case_file(path, record.case_id)
                if parts is not None and not parts[1]:
                    counts.setdefault(m, Counter())[parts[0]] += 1
        self.suffixes = {m: c.most_common(1)[0][0] for m, c in counts.items()}  # the data set's own names

    def _keeps_name(self, path: Path, case_id: str) -> bool:
        return self.root is not None and path.parent.name == case_id and _ending(path) in _NIFTI

    def add(self, record: CaseRecord, reference: str, arrays: Mapping[str, np.ndarray],
            grid: Volume | None) -> dict[str, Path]:
        case_id = record.case_id
        folder = self.stage / case_id
        for m, path in record.images.items():
            if self._keeps_name(path, case_id):
                _copy(path, folder / path.name[: -len(_ending(path))], endings=_NIFTI)
            else:
                _copy(path, folder / f"{case_id}_{m}", endings=_NIFTI)
        if record.label is not None:
            keep = self._keeps_name(record.label, case_id)
            _copy(record.label, folder / (record.label.name[: -len(_ending(record.label))] if keep
                                          else f"{case_id}_seg"), endings=_NIFTI)
        ref_path = record.images[reference]
        keep = self._keeps_name(ref_path, case_id)
        sep = "-" if keep and ref_path.name.startswith(case_id + "-") else "_"
        ending = _ending(ref_path) if keep else ".nii.gz"
        files = {}
        for m, array in arrays.items():
            name = f"{case_id}{sep}{self.suffixes.get(m, m)}{sep}{SYNTHETIC_MARKER}{ending}"
            files[m] = write_image(Volume(array, grid.affine), folder / name, dtype="float32")
        return files

    def finish(self, synthetic: Mapping[str, Sequence[str]]) -> None:
        info = self.info
        meta: dict[str, Any] = {}
        if self.root is not None and (self.root / BRATS_SIDECAR).is_file():
            meta = read_json_object(self.root / BRATS_SIDECAR, expected="keys like 'name' and 'synthetic'")
        meta.update({"name": info.name, "synthetic": info.synthetic, "modalities": list(info.modalities),
                     "labels": list(info.labels), "regions": {k: list(v) for k, v in info.regions.items()},
                     **self.marks(synthetic)})
        atomic_write_text(self.stage / BRATS_SIDECAR, json.dumps(meta, indent=2) + "\n")
        ids = {r.case_id for r in self.records}
        source_csv = None if self.root is None else self.root / METADATA
        if source_csv is not None and source_csv.is_file():  # every column kept, the rows of the written cases
            with source_csv.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [[row.get(h) or "" for h in header] for row in reader
                        if (row.get("case_id") or "").strip() in ids]
        else:
            header = ["case_id", "target", "report"]
            rows = [[r.case_id, "" if r.target is None else r.target, r.report or ""] for r in self.records]
        write_csv(self.stage / METADATA, header, rows)


class _Nnunet(_Layout):
    """nnU-Net v2 raw: the synthesised channel file has the name nnU-Net expects; ``dataset.json`` marks it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.root is None or not (self.root / DATASET_JSON).is_file():
            raise DataError("an nnU-Net data set can only be completed from an nnU-Net source (its dataset.json "
                            "and label files are carried over); write a 'brats' or 'manifest' layout instead")
        self.meta = read_json_object(self.root / DATASET_JSON, expected="'channel_names', 'labels'")
        self.channel = {m: i for i, m in _channels(self.meta, self.root / DATASET_JSON).items()}
        self.file_ending = str(self.meta.get("file_ending", ".nii.gz"))

    def add(self, record: CaseRecord, reference: str, arrays: Mapping[str, np.ndarray],
            grid: Volume | None) -> dict[str, Path]:
        for path in record.images.values():
            _copy(path, self.stage / path.parent.name / path.name[: -len(self.file_ending)],
                  endings=(self.file_ending,))
        if record.label is not None:
            _copy(record.label, self.stage / "labelsTr" / record.label.name[: -len(self.file_ending)],
                  endings=(self.file_ending,))
        folder = self.stage / record.images[reference].parent.name
        return {m: write_image(Volume(array, grid.affine),
                               folder / f"{record.case_id}_{self.channel[m]:04d}{self.file_ending}", dtype="float32")
                for m, array in arrays.items()}

    def finish(self, synthetic: Mapping[str, Sequence[str]]) -> None:
        meta = dict(self.meta)
        extras = dict(meta.get("medmodal") or {})
        extras["targets"] = {r.case_id: r.target for r in self.records if r.target is not None}
        extras["reports"] = {r.case_id: r.report for r in self.records if r.report is not None}
        extras.update(self.marks(synthetic))
        meta["numTraining"] = sum(1 for r in self.records if r.label is not None)
        meta["medmodal"] = extras
        atomic_write_text(self.stage / DATASET_JSON, json.dumps(meta, indent=2) + "\n")


class _Manifest(_Layout):
    """``images/``, ``labels/`` and a ``manifest.json`` listing them; synthesised files are named ``*_synthetic``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.written: list[CaseRecord] = []

    def add(self, record: CaseRecord, reference: str, arrays: Mapping[str, np.ndarray],
            grid: Volume | None) -> dict[str, Path]:
        case_id, images = record.case_id, self.stage / "images"
        out = CaseRecord(case_id, {}, target=record.target, report=record.report)
        for m, path in record.images.items():
            out.images[m] = _copy(path, images / f"{case_id}_{m}", endings=_SINGLE_FILE)
        if record.label is not None:
            out.label = _copy(record.label, self.stage / "labels" / case_id, endings=_SINGLE_FILE)
        files = {m: write_image(Volume(array, grid.affine), images / f"{case_id}_{m}_{SYNTHETIC_MARKER}.nii.gz",
                                dtype="float32") for m, array in arrays.items()}
        out.images = {m: out.images.get(m) or files[m] for m in self.info.modalities}
        self.written.append(out)
        return files

    def finish(self, synthetic: Mapping[str, Sequence[str]]) -> None:
        extra: dict[str, Any] = {}
        source = self.root / "manifest.json" if self.source is not None and self.source.is_dir() else self.source
        if source is not None and source.suffix.lower() == ".json" and source.is_file():
            data = read_json_object(source, expected="'modalities' and 'cases'")
            extra = {k: v for k, v in data.items() if k not in _MANIFEST_KEYS}  # the user's own keys
        write_manifest(self.written, self.stage / "manifest.json", self.info, extra={**extra, **self.marks(synthetic)})


_WRITERS: dict[str, type[_Layout]] = {"brats": _Brats, "nnunet": _Nnunet, "manifest": _Manifest}


def _source_root(source: Path | None, out_dir: Path) -> Path | None:
    """The source's folder (a file such as ``dataset.json`` or a manifest stands for its folder), after checking
    that ``out_dir`` neither is, lies inside, nor contains it."""
    if source is None:
        return None
    if not source.exists():
        raise DataError(f"{source}: the source data set does not exist")
    root = source if source.is_dir() else source.parent
    out, src = out_dir.resolve(), root.resolve()
    if out == src or src in out.parents:
        raise DataError(f"{out_dir}: is {'the' if out == src else 'inside the'} source data set {root}; write the "
                        "completed data set to another folder")
    if out in src.parents:
        raise DataError(f"{out_dir}: contains the source data set {root}; write the completed data set to another "
                        "folder")
    return root


def write_completed_dataset(
    *,
    source: Path | str | None,
    format: str,
    records: Sequence[CaseRecord],
    info: DatasetInfo,
    synthesized: Mapping[str, Mapping[str, np.ndarray]],
    out_dir: Path | str,
    provenance: Mapping[str, Any],
    overwrite: bool = False,
) -> CompletedDataset:
    """Write ``records`` with their missing modalities filled from ``synthesized`` as a data set in ``format``.

    The output appears in ``out_dir`` only once every case is written (a failure leaves nothing behind); ``out_dir``
    must be missing or empty unless ``overwrite`` (then same-named entries are replaced, others kept).

    Args:
        source: the data set ``records`` and ``info`` were read from (its folder, ``dataset.json`` or manifest),
            whose metadata is carried over; ``None`` for cases given file by file (``--image``), written as a
            ``"brats"`` (or ``"manifest"``) data set.
        format: the layout to write, the source's own (``"brats"``, ``"nnunet"`` or ``"manifest"``).
        records: the cases, as :func:`~medmodal.data.formats.open_dataset` returns them.
        info: the data set's info; the output has every one of ``info.modalities`` in every case, and keeps
            ``info.synthetic`` (a data set that was synthetic stays so).
        synthesized: case id → modality → ``float32`` array on that case's grid: the shape of its reference image
            (its first present modality in ``info.modalities`` order, as :func:`~medmodal.data.io.read_case`
            returns it, ``(X, Y)`` or ``(X, Y, Z)``). Each case's missing modalities, exactly; a case it leaves out
            has nothing missing. Read once per case in ``records`` order, so it may synthesise lazily.
        out_dir: the output folder; not the source, nor inside or around it.
        provenance: recorded as is in the sidecar (e.g. run folder, sampler, steps, seed, time); JSON, with
            paths and other objects written as strings.
        overwrite: write into a non-empty ``out_dir``.

    Raises:
        DataError: naming the case, modality or path: an unknown format or modality, a case id ``synthesized``
            names that ``records`` lacks, a case with no modality, a synthesised modality already present, a missing
            modality left unfilled, an array whose shape differs from the case's grid or that holds NaN/inf, and
            an ``out_dir`` that is not empty, is the source or lies inside it.
    """
    if format not in _WRITERS:
        raise DataError(f"unknown dataset format {format!r}; use one of {', '.join(_WRITERS)}")
    out_dir = Path(out_dir)
    source_root = _source_root(None if source is None else Path(source), out_dir)
    ids = [check_case_id(r.case_id) for r in records]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise DataError(f"case id(s) {twice} appear twice; case ids must be unique")
    unknown = sorted(set(synthesized) - set(ids))
    if unknown:
        raise DataError(f"synthesised images for case(s) {unknown}, which are not among the {len(ids)} case(s) "
                        "being written")
    prior = read_synthetic_sidecar(source_root).get("synthetic", {}) if source_root is not None else {}
    synthetic: dict[str, tuple[str, ...]] = {}
    complete: list[str] = []
    files: dict[str, dict[str, Path]] = {}
    with staged_output_dir(out_dir, overwrite=overwrite) as stage:
        layout = _WRITERS[format](stage=stage, source=None if source is None else Path(source), root=source_root,
                                  records=records, info=info)
        for record in records:
            given = synthesized.get(record.case_id) or {}
            reference, arrays, grid = _checked_arrays(record, info, given)
            written = layout.add(record, reference, arrays, grid)
            files[record.case_id] = {m: out_dir / p.relative_to(stage) for m, p in written.items()}
            if not arrays:
                complete.append(record.case_id)
            marked = set(arrays) | set(prior.get(record.case_id, ()))
            if marked:
                synthetic[record.case_id] = tuple(m for m in info.modalities if m in marked)
        layout.finish(synthetic)
        sidecar = {"synthetic": {k: list(v) for k, v in synthetic.items()}, "complete": complete,
                   "provenance": dict(provenance)}
        atomic_write_text(stage / SIDECAR, json.dumps(sidecar, indent=2, default=str) + "\n")
    files = {k: v for k, v in files.items() if v}
    return CompletedDataset(root=out_dir, format=format, synthetic=synthetic, complete=tuple(complete), files=files,
                            sidecar=out_dir / SIDECAR)
