"""Dataset layouts on disk: BraTS folders, nnU-Net v2 raw datasets and CSV/JSON manifests.

Every format indexes a dataset into a :class:`~medmodal.data.case.DatasetInfo` and a list of
:class:`~medmodal.data.case.CaseRecord` (paths only); :func:`medmodal.data.io.read_case` reads one case.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medmodal.data.case import Case, CaseRecord, DataError, DatasetInfo
from medmodal.data.formats.brats import canonical_modality, is_brats_case_folder, read_brats, write_brats
from medmodal.data.formats.manifest import MANIFEST_NAMES, read_manifest, write_manifest, write_manifest_dataset
from medmodal.data.formats.nnunet import DATASET_JSON, read_nnunet, write_nnunet

__all__ = [
    "FORMATS",
    "canonical_modality",
    "detect_format",
    "open_dataset",
    "read_brats",
    "read_manifest",
    "read_nnunet",
    "write_brats",
    "write_dataset",
    "write_manifest",
    "write_nnunet",
]

#: The dataset layouts medmodal reads and writes.
FORMATS: tuple[str, ...] = ("brats", "nnunet", "manifest")
_SIDE_FILES = ("metadata.csv", "medmodal.json")
_LAYOUTS = (
    "medmodal reads three layouts: a BraTS folder (<root>/<case>/<case>_t1.nii.gz, _t1ce, _t2, _flair, _seg), "
    "an nnU-Net v2 raw folder (<root>/dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz), "
    "or a CSV/JSON manifest listing each case's files (see `medmodal data --help`)"
)


def _manifest_in(folder: Path) -> Path | None:
    """``manifest.csv``/``manifest.json``, else the only other ``.csv``/``.json`` file of ``folder``."""
    for name in MANIFEST_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".json")
                  and p.name not in _SIDE_FILES and not p.name.startswith(".")]
    return candidates[0] if len(candidates) == 1 else None


def detect_format(path: Path | str) -> str:
    """Which of :data:`FORMATS` ``path`` holds: ``dataset.json`` → nnU-Net, a ``.csv``/``.json`` file (or a
    folder with one) → manifest, case folders with ``*_seg``/modality files → BraTS."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: does not exist; give a dataset folder or manifest file. {_LAYOUTS}")
    if path.is_file():
        if path.name == DATASET_JSON:
            return "nnunet"
        if path.suffix.lower() in (".csv", ".json"):
            return "manifest"
        raise DataError(f"{path}: is neither a dataset folder nor a .csv/.json manifest. {_LAYOUTS}")
    if (path / DATASET_JSON).is_file():
        return "nnunet"
    if any((path / name).is_file() for name in MANIFEST_NAMES):
        return "manifest"
    folders = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if any(is_brats_case_folder(folder) for folder in folders):
        return "brats"
    if _manifest_in(path) is not None:
        return "manifest"
    raise DataError(f"{path}: cannot tell the dataset layout. {_LAYOUTS}")


def open_dataset(path: Path | str, format: str = "auto") -> tuple[DatasetInfo, list[CaseRecord]]:
    """Index the dataset at ``path`` (a folder, a ``dataset.json`` or a manifest file); no image is read.

    Args:
        path: the dataset.
        format: one of :data:`FORMATS`, or ``"auto"`` to :func:`detect_format`.
    """
    path = Path(path)
    kind = detect_format(path) if format == "auto" else format
    if kind == "brats":
        return read_brats(path)
    if kind == "nnunet":
        return read_nnunet(path)
    if kind == "manifest":
        manifest = _manifest_in(path) if path.is_dir() else path
        if manifest is None:
            raise DataError(f"{path}: no manifest.csv or manifest.json in this folder; give the manifest file")
        return read_manifest(manifest)
    raise DataError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)} or 'auto'")


def write_dataset(
    cases: Iterable[Case], root: Path | str, info: DatasetInfo, *, format: str, overwrite: bool = False
) -> Path:
    """Write ``cases`` under ``root`` in one of :data:`FORMATS` (a manifest dataset is ``images/``, ``labels/``
    and ``manifest.json``). The dataset appears only once every case is written. Returns ``root``."""
    writers = {"brats": write_brats, "nnunet": write_nnunet, "manifest": write_manifest_dataset}
    if format not in writers:
        raise DataError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    return writers[format](cases, root, info, overwrite=overwrite)
