"""Image collections: single unlabelled images of any modality, 2D or 3D, each on its own grid (for pretraining).

A collection is listed from a **folder** or a **manifest**:

* folder (:func:`list_folder`): every image under it, recursively (hidden files and folders, and cache folders
  holding a ``collection.json``, are skipped). A file with an ending of
  :data:`~medmodal.data.io.READ_EXTENSIONS` is one image; a folder holding one DICOM series (``.dcm`` files, or
  files without an ending that carry the DICOM ``DICM`` marker) is one image; lone ``.dcm`` files (single-frame
  X-rays, multi-frame volumes) are one image each. The modality tag is the name of the first sub-folder the image
  lies in (``root/CT/case1.nii.gz`` and ``root/CT/patient3/series/`` are ``CT``); images directly in ``root``
  get the ``modality`` argument.
* manifest (:func:`read_collection_manifest`): a CSV with a header or a JSON list of objects (or an object with
  an ``"images"`` list), fields ``image`` (path, relative to the manifest's folder), ``modality``, and optionally
  ``dataset`` (the sampling group, default: the modality) and ``spacing`` (``"0.14,0.14"``: the pixel / voxel
  size in mm of the image's own axes, for pictures that carry none, e.g. an X-ray JPEG).

Every image is read by :func:`read_collection_image` and prepared by :func:`prepare_image` (spec §2.5 of the
pretraining method, "Data"):

0. **Colour** is kept: a PNG/JPEG/TIFF/BMP picture whose channels differ (H&E pathology, fundus photographs) is a
   3-channel RGB image; one whose channels are equal (within the JPEG tolerance of
   :data:`~medmodal.data.xray.JPEG_GREY_TOLERANCE`) is grey, as are volumes and DICOM files. An alpha channel must be
   opaque and is dropped; a transparent pixel (or a 2-channel picture, which Pillow reads as grey + alpha) is an
   error naming the file.
1. 3D images are reoriented to the closest RAS axis order (:func:`~medmodal.data.preprocess.canonical_orientation`,
   a permutation and flips, no interpolation); then the axis with the coarsest spacing is moved last, so that the
   slice (depth) axis of a thick-slice scan is ``Z`` whatever plane it was acquired in. 2D images keep their axes.
2. Intensities are mapped to ``[0, 1]``: ``clip((v - p_0.5) / (p_99.5 - p_0.5), 0, 1)`` with the image's own
   0.5 / 99.5 percentiles, or ``v / 255`` for 8-bit natural pictures (the datasets named in ``natural``). A colour
   image has **one** ``(p_0.5, p_99.5)`` pair, taken over all its channels together, so the mapping is the same
   affine map on R, G and B and keeps the hue (per-channel percentiles would stretch each channel on its own and
   tint the picture).
3. The array is stored as ``(C, X, Y, Z)`` (``C`` = 1 grey or 3 RGB); a 2D image as a one-slice volume
   ``(C, X, Y, 1)``.

The crops (:class:`~medmodal.data.collection_sampler.CollectionCrops`) are converted to the channels a network
takes by :func:`to_channels`: colour to grey by the ITU-R BT.601 weights ``(0.299, 0.587, 0.114)``, grey to RGB by
replication (the PUMIT spec §2.2: "grayscale is replicated to 3 channels").

Each image carries its spacing ``(s_x, s_y, s_z)`` in mm and its degree of anisotropy
``DA = clip(floor(log2(s_z / min(s_x, s_y))), 0, 5)``; a 2D image has DA 5 and the placeholder depth spacing
``s_z = min(s_x, s_y) * 2**5`` (so the formula gives DA 5 from the stored spacing too). The data layer computes
DA itself (:func:`degree_of_anisotropy`; data sits below ``medmodal.layers``), with the same formula as
``medmodal.layers.sac.degree_of_anisotropy``; a test checks that the two agree.

:func:`medmodal.data.collection_cache.build_collection_cache` caches the prepared arrays as memory-mapped ``.npy``
files; :mod:`medmodal.data.collection_sampler` draws batches of crops from them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nibabel.orientations import apply_orientation

from medmodal.atomic import read_csv
from medmodal.data.case import DataError, Volume
from medmodal.data.check import Problem
from medmodal.data.io import READ_EXTENSIONS, DataErrors, read_image
from medmodal.data.preprocess import canonical_orientation
from medmodal.data.xray import BT601_WEIGHTS, PICTURE_EXTENSIONS, XrayVolume, bt601_grey, read_picture

__all__ = [
    "BT601_WEIGHTS",
    "CHANNELS",
    "DEFAULT_PERCENTILES",
    "INDEX_NAME",
    "MAX_DA",
    "ImageRecord",
    "PreparedImage",
    "check_collection",
    "degree_of_anisotropy",
    "list_collection",
    "list_folder",
    "percentile_scale",
    "prepare_image",
    "read_collection_image",
    "read_collection_manifest",
    "to_channels",
]

#: the index file of a collection cache; folders holding one are not scanned for images.
INDEX_NAME = "collection.json"
#: the DA of a 2D image and the upper clip of the degree of anisotropy (at least 32x anisotropic counts as 2D).
MAX_DA = 5
#: the intensity percentiles mapped to 0 and 1.
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)
MANIFEST_FIELDS = ("image", "modality", "dataset", "spacing")
#: the channel counts of a collection image and of the crops a network takes: 1 (grey) or 3 (RGB).
CHANNELS = (1, 3)
_DICOM = ".dcm"


# ------------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ImageRecord:
    """One image of a collection, before it is read.

    The channel count (grey or colour) is a property of the file, known once it is read
    (:attr:`PreparedImage.channels`, :attr:`~medmodal.data.collection_cache.CachedImage.channels`).

    Attributes:
        image_id: a unique name: the path relative to the folder or manifest (posix), or the absolute path.
        path: the image file, or a DICOM series folder.
        modality: the modality tag (``"CT"``, ``"xray"``, ...).
        dataset: the sampling group (default: the modality); sampling weights and ``natural`` name datasets.
        spacing: the voxel size in mm of the image's own axes that replaces the file's (2 values for a 2D image,
            3 for a 3D one), or ``None`` to use the file's.
    """

    image_id: str
    path: Path
    modality: str
    dataset: str = ""
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.dataset:
            object.__setattr__(self, "dataset", self.modality)


def list_collection(source: Path | str, *, modality: str | None = None) -> list[ImageRecord]:
    """The images of a folder (:func:`list_folder`) or of a ``.csv`` / ``.json`` manifest
    (:func:`read_collection_manifest`); ``modality`` is the tag of images that name none.

    Raises:
        DataErrors: every listing problem at once, each naming the file or row.
    """
    source = Path(source)
    if source.is_dir():
        return list_folder(source, modality=modality)
    if source.suffix.lower() in (".csv", ".json"):
        return read_collection_manifest(source, modality=modality)
    if not source.exists():
        raise DataError(f"{source}: not found; give an image folder or a .csv / .json manifest")
    raise DataError(f"{source}: is neither a folder nor a .csv / .json manifest; give an image folder or a manifest")


def list_folder(root: Path | str, *, modality: str | None = None) -> list[ImageRecord]:
    """Every image under ``root``, in sorted path order (see the module docstring for the rules).

    Args:
        root: the folder.
        modality: the tag of images directly in ``root`` (images in sub-folders take the first sub-folder's name).

    Raises:
        DataErrors: a folder with several DICOM series, an image directly in ``root`` without ``modality``, or an
            empty folder; all of them at once.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder; give the folder that holds the images")
    problems: list[tuple[str | None, Path | None, str]] = []
    records: list[ImageRecord] = []
    for path in _scan(root, problems):
        rel = path.relative_to(root)
        tag = rel.parts[0] if len(rel.parts) > 1 else modality
        if not tag:
            problems.append((None, path, f"{path}: lies directly in {root} and has no modality tag; move it into a "
                                         "sub-folder named after its modality or pass a default modality"))
            continue
        records.append(ImageRecord(image_id=rel.as_posix(), path=path, modality=tag))
    if not records and not problems:
        problems.append((None, root, f"{root}: holds no image ({', '.join(READ_EXTENSIONS)} or DICOM series "
                                     "folders); point to the folder of the images"))
    if problems:
        raise DataErrors(problems, where=str(root))
    return records


def _scan(root: Path, problems: list) -> Iterator[Path]:
    """Images under ``root``: picture/volume files, DICOM series folders and lone DICOM files."""
    for folder, subdirs, names in os.walk(root):
        here = Path(folder)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if INDEX_NAME in names:  # a collection cache: its .npy files are not images
            subdirs[:] = []
            continue
        names = sorted(n for n in names if not n.startswith("."))
        dicom = [n for n in names if n.lower().endswith(_DICOM) or (_unknown_ending(n) and _has_dicm(here / n))]
        yield from (here / n for n in names if not n.lower().endswith(_DICOM) and not _unknown_ending(n))
        if dicom:
            yield from _dicom_images(here, dicom, problems)


def _unknown_ending(name: str) -> bool:
    lower = name.lower()
    return not any(lower.endswith(ext) for ext in READ_EXTENSIONS)


def _has_dicm(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _dicom_images(folder: Path, names: list[str], problems: list) -> list[Path]:
    """A folder's DICOM files as images: the folder for a series of several slices, else each ``.dcm`` file."""
    reader = sitk.ImageSeriesReader()
    series = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in reader.GetGDCMSeriesIDs(str(folder))}
    stacks = {uid: files for uid, files in series.items() if len(files) > 1}
    if len(stacks) > 1:
        listed = ", ".join(f"{uid} ({len(files)} files)" for uid, files in stacks.items())
        problems.append((None, folder, f"{folder}: holds {len(stacks)} DICOM series ({listed}); put each series in "
                                       "its own folder"))
        return []
    if stacks:
        uid, files = next(iter(stacks.items()))
        if len(files) < len(names):
            problems.append((None, folder, f"{folder}: holds DICOM series {uid} ({len(files)} slices) and "
                                           f"{len(names) - len(files)} other DICOM file(s); move the series into "
                                           "its own folder"))
            return []
        return [folder]
    lone = [folder / n for n in names if n.lower().endswith(_DICOM)]
    for n in names:
        if not n.lower().endswith(_DICOM):
            problems.append((None, folder / n, f"{folder / n}: is a single DICOM file without the .dcm ending; "
                                               "rename it to end in .dcm"))
    return lone


def read_collection_manifest(path: Path | str, *, modality: str | None = None) -> list[ImageRecord]:
    """The images a CSV or JSON manifest lists (fields :data:`MANIFEST_FIELDS`; see the module docstring).

    Raises:
        DataErrors: every bad row at once: a missing ``image``, an image file that does not exist or has an
            unsupported ending, a missing modality (and no default), a bad ``spacing``, an unknown field, a
            duplicate image.
    """
    path = Path(path)
    rows = _manifest_rows(path)
    base = path.parent
    problems: list[tuple[str | None, Path | None, str]] = []
    records: list[ImageRecord] = []
    seen: dict[Path, int] = {}
    for n, row in enumerate(rows, start=1):
        where = f"{path}: row {n}"
        unknown = sorted(set(row) - set(MANIFEST_FIELDS))
        if unknown:
            problems.append((None, path, f"{where}: unknown field(s) {unknown}; the fields are "
                                         f"{list(MANIFEST_FIELDS)}"))
            continue
        value = str(row.get("image") or "").strip()
        if not value:
            problems.append((None, path, f"{where}: 'image' is empty; give the image's path"))
            continue
        image = Path(value) if Path(value).is_absolute() else base / value
        tag = str(row.get("modality") or "").strip() or modality
        try:
            spacing = _parse_spacing(row.get("spacing"), where=where)
        except DataError as err:
            problems.append((None, path, str(err)))
            continue
        if not tag:
            problems.append((None, image, f"{where}: 'modality' is empty for {value}; give a modality tag or a "
                                          "default modality"))
        elif not image.exists():
            problems.append((None, image, f"{where}: {image} not found; fix the path (relative paths start at "
                                          f"{base})"))
        elif image.is_file() and _unknown_ending(image.name):
            problems.append((None, image, f"{where}: {image} has an unsupported ending; use one of "
                                          f"{', '.join(READ_EXTENSIONS)} or a DICOM series folder"))
        elif image.resolve() in seen:
            problems.append((None, image, f"{where}: {value} is listed again (first in row {seen[image.resolve()]}); "
                                          "list each image once"))
        else:
            seen[image.resolve()] = n
            image_id = image.relative_to(base).as_posix() if image.is_relative_to(base) else image.as_posix()
            dataset = str(row.get("dataset") or "").strip()
            records.append(ImageRecord(image_id=image_id, path=image, modality=tag, dataset=dataset, spacing=spacing))
    if not records and not problems:
        problems.append((None, path, f"{path}: lists no image; add rows with an 'image' field"))
    if problems:
        raise DataErrors(problems, where=str(path))
    return records


def _manifest_rows(path: Path) -> list[Mapping[str, object]]:
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; check the path")
    if path.suffix.lower() == ".csv":
        try:
            rows = read_csv(path)
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot be read ({err}); save it as UTF-8 CSV with a header line") from err
        if rows and "image" not in rows[0]:
            raise DataError(f"{path}: has no 'image' column (columns: {list(rows[0])}); the header names "
                            f"{list(MANIFEST_FIELDS)}")
        return rows
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: is not valid JSON ({err}); fix the file") from err
    if isinstance(data, dict) and set(data) == {"images"}:
        data = data["images"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: must hold a list of objects (or {{\"images\": [...]}}) with the fields "
                        f"{list(MANIFEST_FIELDS)}")
    return data


def _parse_spacing(value: object, *, where: str) -> tuple[float, ...] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        parts = [float(v) for v in (re.split(r"[,\sx]+", value.strip()) if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) not in (2, 3) or not all(math.isfinite(s) and s > 0 for s in parts):
        raise DataError(f"{where}: 'spacing' {value!r} must be 2 or 3 positive numbers in mm, e.g. \"0.14,0.14\"")
    return tuple(parts)


# --------------------------------------------------------------------------------------------------- preparing


def degree_of_anisotropy(spacing: Sequence[float], *, max_da: int = MAX_DA) -> int:
    """The degree of anisotropy ``clip(floor(log2(s_z / min(s_x, s_y))), 0, max_da)`` (PUMIT spec §2.1, validation
    code); ``max_da`` for a 2D spacing ``(s_x, s_y)`` ("at least 32x anisotropic is 2D"). The one implementation:
    ``medmodal.layers.sac`` uses it for the spatially adaptive convolutions.
    ``(0.8, 0.8, 6.5) -> 3``, ``(0.6, 0.6, 1.0) -> 0``, ``(0.14, 0.14) -> 5``.

    Raises:
        ValueError: not 2 or 3 finite positive numbers, or a negative ``max_da``.
    """
    values = tuple(float(s) for s in spacing)
    if max_da < 0:
        raise ValueError(f"max_da must be >= 0, got {max_da}")
    if len(values) not in (2, 3) or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be 2 or 3 finite positive numbers in mm, got {values}")
    if len(values) == 2:
        return max_da
    return min(max(math.floor(math.log2(values[2] / min(values[:2]))), 0), max_da)


def percentile_scale(
    array: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES, *, where: str = "<image>"
) -> np.ndarray:
    """``clip((v - lo) / (hi - lo), 0, 1)`` as float32, ``lo, hi`` the image's ``percentiles`` (0..100) over every
    value of ``array`` (all channels of a ``(C, *S)`` colour image together: one affine map keeps the hue).

    When the percentiles coincide (more than 99 % of the voxels share one value) the minimum and maximum are used.

    Raises:
        DataError: every voxel has the same value (a blank image), naming ``where``.
    """
    values = np.asarray(array, dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise DataError(f"{where}: every voxel has the value {lo:g} (a blank image); leave it out of the collection")
    return np.clip((values - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """A ``(C, *S)`` image with ``C`` in :data:`CHANNELS` as ``channels`` channels: unchanged when they agree,
    RGB -> grey by the BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (:data:`BT601_WEIGHTS`), grey -> RGB by
    replicating the channel (PUMIT spec §2.2). Returns float32 ``(channels, *S)``; a copy unless unchanged.

    Raises:
        ValueError: ``channels`` or ``C`` not 1 or 3.
    """
    if channels not in CHANNELS:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    source = array.shape[0] if array.ndim else 0
    if source not in CHANNELS:
        raise ValueError(f"expected a (C, *S) image with C = 1 or 3, got shape {array.shape}")
    if source == channels:
        return np.asarray(array, dtype=np.float32)
    if channels == 1:
        return bt601_grey(array, axis=0)[None]
    return np.repeat(np.asarray(array, dtype=np.float32), 3, axis=0)


def read_collection_image(path: Path | str) -> Volume:
    """Read one collection image: a picture (:data:`~medmodal.data.xray.PICTURE_EXTENSIONS`) keeping its colour
    (:func:`~medmodal.data.xray.read_picture` with ``colour=True``: an :class:`~medmodal.data.xray.XrayVolume`
    whose ``rgb`` holds the channels), anything else by :func:`~medmodal.data.io.read_image` (grey).

    Raises:
        DataError: naming the file (see those readers).
    """
    path = Path(path)
    if path.is_file() and path.name.lower().endswith(PICTURE_EXTENSIONS) and path.stat().st_size > 0:
        return read_picture(path, colour=True)
    return read_image(path)


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to cache.

    Attributes:
        array: ``(C, X, Y, Z)`` float32 in ``[0, 1]``, ``C`` = 1 (grey) or 3 (RGB), the slice axis last; a 2D image
            is ``(C, X, Y, 1)``.
        spacing: ``(s_x, s_y, s_z)`` in mm (2D: ``s_z = min(s_x, s_y) * 2**max_da``, a placeholder).
        spatial_dims: 2 or 3.
        da: the degree of anisotropy (2D: ``max_da``).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    spatial_dims: int
    da: int

    @property
    def channels(self) -> int:
        """1 (grey) or 3 (RGB)."""
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape ``(X, Y, Z)``."""
        x, y, z = self.array.shape[1:]
        return int(x), int(y), int(z)


def prepare_image(
    volume: Volume,
    *,
    spacing: Sequence[float] | None = None,
    natural: bool = False,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    max_da: int = MAX_DA,
) -> PreparedImage:
    """Reorient, map the intensities and compute the spacing and DA of one image (steps in the module docstring).

    Args:
        volume: the image as read by :func:`read_collection_image` (a colour picture is an
            :class:`~medmodal.data.xray.XrayVolume` with ``rgb``; it keeps its 3 channels) or
            :func:`~medmodal.data.io.read_image` (grey).
        spacing: replaces the voxel size of the image's own axes (one value per axis), or ``None``.
        natural: an 8-bit natural picture: divide by 255 instead of the percentile mapping.
        percentiles: the percentiles mapped to 0 and 1.
        max_da: the DA of a 2D image.

    Returns:
        A :class:`PreparedImage` with a ``(C, X, Y, Z)`` array; one (low, high) percentile pair over all channels.

    Raises:
        DataError: naming the file: an empty image, a spacing override of the wrong length, a zero or NaN spacing,
            a blank image, ``natural`` for an image that is not 8-bit.
    """
    where = volume.where
    array = np.asarray(volume.array)
    dims = array.ndim
    rgb = volume.rgb if isinstance(volume, XrayVolume) else None
    if array.size == 0:
        raise DataError(f"{where}: is empty (shape {array.shape}); leave it out of the collection")
    affine = np.array(volume.affine, dtype=np.float64)
    sp = np.linalg.norm(affine[:3, :dims], axis=0)
    if spacing is not None:
        if len(spacing) != dims:
            raise DataError(f"{where}: the spacing override {tuple(spacing)} has {len(spacing)} values but the image "
                            f"is {dims}D; give {dims} values")
        affine[:3, :dims] = affine[:3, :dims] / np.where(sp > 0, sp, 1.0) * np.asarray(spacing, dtype=np.float64)
        sp = np.asarray(spacing, dtype=np.float64)
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise DataError(f"{where}: has voxel spacing {tuple(sp.round(6).tolist())} mm (zero or NaN); fix the header "
                        "or give a spacing override in a manifest")
    ornt = canonical_orientation(affine, dims, where=where)
    channels = [array] if rgb is None else list(np.asarray(rgb))
    array = np.stack([apply_orientation(c, ornt) for c in channels])  # (C, *S)
    canonical = np.empty(dims)
    canonical[ornt[:, 0].astype(int)] = sp
    if dims == 3:
        thick = int(np.flatnonzero(canonical == canonical.max())[-1])  # ties keep Z last
        order = [a for a in range(3) if a != thick] + [thick]
        array, canonical = array.transpose([0] + [a + 1 for a in order]), canonical[order]
    if natural:
        if array.dtype != np.uint8:
            raise DataError(f"{where}: is {array.dtype}, not an 8-bit picture; the /255 mapping is for 8-bit natural "
                            "pictures only: leave its dataset out of 'natural'")
        scaled = array.astype(np.float32) / np.float32(255.0)
    else:
        scaled = percentile_scale(array, percentiles, where=where)  # one (lo, hi) over every channel: keeps the hue
    da = degree_of_anisotropy(canonical, max_da=max_da)
    if dims == 2:
        scaled = scaled[..., None]
        canonical = np.append(canonical, canonical.min() * 2.0**max_da)
    sx, sy, sz = (float(s) for s in canonical)
    return PreparedImage(array=np.ascontiguousarray(scaled), spacing=(sx, sy, sz), spatial_dims=dims, da=da)


def check_collection(
    source: Path | str | Sequence[ImageRecord],
    *,
    modality: str | None = None,
    natural: Collection[str] = (),
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    max_da: int = MAX_DA,
) -> tuple[list[ImageRecord], list[Problem]]:
    """List and read every image of a collection and collect all problems instead of stopping at the first.

    Problems (each naming the file): listing problems (:func:`list_collection`), unreadable, truncated, empty, 4D
    or multi-channel volumes, pictures with transparent pixels or 2 channels, NaN/inf images, zero/NaN spacing,
    blank images, a spacing override of the wrong length, ``natural`` datasets with images that are not 8-bit.
    Whether an image is smaller than one token depends on the crop settings;
    :class:`~medmodal.data.collection_sampler.CollectionCrops` checks that.

    Returns:
        The records that were listed and the problems (``Problem.case_id`` is the image id).
    """
    if isinstance(source, (str, Path)):
        try:
            records = list_collection(source, modality=modality)
        except DataErrors as err:
            return [], [Problem(c, p, m) for c, p, m in err.problems]
        except DataError as err:
            return [], [Problem(None, Path(source), str(err))]
    else:
        records = list(source)
    problems = []
    for record in records:
        try:
            prepare_image(read_collection_image(record.path), spacing=record.spacing, natural=record.dataset in natural,
                          percentiles=percentiles, max_da=max_da)
        except DataError as err:
            problems.append(Problem(record.image_id, record.path, str(err)))
    return records, problems
