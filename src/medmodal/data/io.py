"""Reading and writing images and cases: NIfTI (nibabel), NRRD / MetaImage / DICOM series (SimpleITK), 2D X-rays
(PNG / JPEG / TIFF / BMP and single-frame DICOM files, :mod:`medmodal.data.xray`).

Every :class:`~medmodal.data.case.Volume` returned here follows nibabel's convention: the array axes are the
voxel axes of a RAS+ ``affine`` (``(X, Y, Z)`` for 3D, ``(X, Y)`` for 2D). SimpleITK images (LPS+, numpy axes
``(Z, Y, X)``) are converted on the way in and out. Every problem is a :class:`~medmodal.data.case.DataError`
whose message names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from numpy.typing import DTypeLike

from medmodal.data import xray
from medmodal.data.case import Case, CaseRecord, DataError, DatasetInfo, Volume

__all__ = [
    "READ_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "DataErrors",
    "DicomGeometryWarning",
    "check_same_grid",
    "compact_int_dtype",
    "inspect_case",
    "read_case",
    "read_image",
    "staged_output_dir",
    "write_image",
]

_NIFTI = (".nii.gz", ".nii")
_SITK = (".nrrd", ".nhdr", ".mha", ".mhd")
#: File endings :func:`read_image` accepts (a folder is read as a DICOM series).
READ_EXTENSIONS: tuple[str, ...] = (*_NIFTI, *_SITK, ".dcm", *xray.PICTURE_EXTENSIONS)
#: File endings :func:`write_image` can write (``.png``: 2D integer label maps 0..65535 only).
WRITE_EXTENSIONS: tuple[str, ...] = (*_NIFTI, *_SITK, ".png")
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, RuntimeError, ImageFileError, HeaderDataError)


class DataErrors(DataError):
    """Several problems found at once (e.g. every bad row of a manifest).

    Args:
        problems: ``(case id or None, file or None, message)`` per problem.
        where: what was being read, for the summary line.
    """

    def __init__(self, problems: list[tuple[str | None, Path | None, str]], *, where: str) -> None:
        self.problems = list(problems)
        lines = [message for _, _, message in self.problems]
        text = lines[0] if len(lines) == 1 else f"{where}: {len(lines)} problems:\n" + "\n".join(
            f"  - {line}" for line in lines
        )
        super().__init__(text)


def read_json_object(path: Path, *, expected: str) -> dict:
    """Read a JSON file that must hold an object; :class:`DataError` naming the file otherwise.

    Args:
        path: the file.
        expected: what the object should contain, for the error message (e.g. ``"'channel_names' and 'labels'"``).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: is not valid JSON ({err}); fix the file") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: must hold a JSON object with {expected}")
    return data


def _extension(path: Path) -> str:
    name = path.name.lower()
    return next((ext for ext in READ_EXTENSIONS if name.endswith(ext)), path.suffix.lower())


def _sitk_to_volume(image: sitk.Image, path: Path) -> Volume:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector "
            "image); medmodal needs one scalar image per modality: save each channel as its own file"
        )
    dims = image.GetDimension()
    array = sitk.GetArrayFromImage(image).transpose()  # numpy (Z, Y, X) -> (X, Y, Z)
    d = min(dims, 3)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dims, dims)[:d, :d]
    lps = np.eye(4)
    lps[:d, :d] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[:d]
    lps[:d, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)[:d]
    return _to_volume(array, _LPS @ lps, path)


def _volume_to_sitk(volume: Volume) -> sitk.Image:
    array = volume.array[..., None] if volume.array.ndim == 2 else volume.array  # 2D -> one-slice 3D
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose()))
    lps = _LPS @ volume.affine
    matrix = lps[:3, :3].copy()
    spacing = np.linalg.norm(matrix, axis=0)
    if spacing[2] == 0 and volume.array.ndim == 2:  # a degenerate slice axis: make it orthogonal, 1 mm
        matrix[:, 2] = np.cross(matrix[:, 0], matrix[:, 1]) / (spacing[0] * spacing[1])
        spacing[2] = 1.0
    if np.any(spacing == 0):
        raise DataError(f"{volume.where}: the affine has a zero-length voxel axis; cannot write it")
    image.SetSpacing(spacing.tolist())
    image.SetDirection((matrix / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def _to_volume(array: np.ndarray, affine: np.ndarray, path: Path) -> Volume:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise DataError(
            f"{path}: is a {array.ndim}D image of shape {array.shape} (a time series or several channels); "
            "medmodal reads one 2D or 3D image per modality: split it into one file per channel"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # a one-slice volume is a 2D image; the affine keeps the slice position
    if array.ndim < 2:
        raise DataError(f"{path}: has shape {array.shape}; expected a 2D or 3D image")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_inf = int(array.size - finite.sum()) - n_nan
            raise DataError(
                f"{path}: contains {n_nan} NaN and {n_inf} infinite voxel(s); replace them (e.g. with 0) "
                "in the tool that produced the file"
            )
    return Volume(array=array, affine=affine, path=path)


class DicomGeometryWarning(UserWarning):
    """A DICOM series was resampled onto a regular grid (``dicom_resample=True``); the message says why."""


#: A DICOM series' slices must be evenly spaced: every gap between consecutive slice positions (projected on the
#: slice normal) may differ from the median gap by at most ``max(DICOM_SPACING_RTOL × median, DICOM_SPACING_ATOL_MM)``
#: (1 % or 0.01 mm), and the slices may drift sideways (off the normal) by no more than the same amount.
DICOM_SPACING_RTOL = 0.01
DICOM_SPACING_ATOL_MM = 0.01
#: Largest difference between two slices' direction cosines (ImageOrientationPatient) of one series.
DICOM_ORIENTATION_ATOL = 1e-4

_TAG_POSITION, _TAG_ORIENTATION = "0020|0032", "0020|0037"


def _dicom_vector(reader: sitk.ImageFileReader, tag: str, size: int, file: str) -> np.ndarray:
    name = {_TAG_POSITION: "ImagePositionPatient (0020,0032)", _TAG_ORIENTATION: "ImageOrientationPatient (0020,0037)"}
    try:
        values = np.array([float(v) for v in reader.GetMetaData(tag).split("\\")], dtype=np.float64)
    except (RuntimeError, ValueError):
        values = np.empty(0)
    if values.shape != (size,) or not np.isfinite(values).all():
        raise DataError(f"{file}: has no valid {name[tag]}; the slices of a DICOM series cannot be placed without it: "
                        "re-export the series with its geometry tags")
    return values


def _dicom_geometry(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each slice file's ImagePositionPatient ``(N, 3)`` and ImageOrientationPatient ``(N, 6)`` (headers only)."""
    reader = sitk.ImageFileReader()
    positions, orientations = np.empty((len(files), 3)), np.empty((len(files), 6))
    for i, file in enumerate(files):
        reader.SetFileName(file)
        reader.ReadImageInformation()
        positions[i] = _dicom_vector(reader, _TAG_POSITION, 3, file)
        orientations[i] = _dicom_vector(reader, _TAG_ORIENTATION, 6, file)
    return positions, orientations


def _dicom_stack(folder: Path, uid: str, files: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Check a series' slices form one stack of parallel slices; sort them along the normal.

    Returns:
        The files sorted by position, their positions ``z (N,)`` along the unit normal, the ``(3, 3)`` direction
        (columns: row, column and normal directions, LPS) and the spacing problems found (empty when the slices
        are evenly spaced within the tolerance).

    Raises:
        DataError: missing geometry tags, mixed orientations, two slices at one position, or slices that drift
            sideways (a tilted gantry), each naming the series and the slice files.
    """
    where = f"{folder}: DICOM series {uid}"
    positions, orientations = _dicom_geometry(files)
    off = np.abs(orientations - orientations[0]).max(axis=1) > DICOM_ORIENTATION_ATOL
    if off.any():
        first_off = int(np.argmax(off))
        raise DataError(
            f"{where}: mixes slice orientations: {Path(files[0]).name} has ImageOrientationPatient "
            f"{np.round(orientations[0], 4).tolist()}, {Path(files[first_off]).name} has "
            f"{np.round(orientations[first_off], 4).tolist()} ({int(off.sum())} of {len(files)} slice(s) differ). A "
            "series must be one stack of parallel slices: export each orientation as its own series and folder"
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    z = positions @ normal
    order = np.argsort(z, kind="stable")
    files, z, positions = [files[i] for i in order], z[order], positions[order]
    names = [Path(f).name for f in files]
    gaps = np.diff(z)
    if gaps.size == 0:
        return files, z, np.column_stack([row, col, normal]), []
    same = np.flatnonzero(gaps <= DICOM_SPACING_ATOL_MM)
    if same.size:
        i = int(same[0])
        raise DataError(f"{where}: slices {names[i]} and {names[i + 1]} are at the same position (z = {z[i]:.3f} mm "
                        f"along the slice normal); remove the duplicate file ({same.size} such pair(s))")
    spacing = float(np.median(gaps))
    tolerance = max(DICOM_SPACING_RTOL * spacing, DICOM_SPACING_ATOL_MM)
    sideways = positions - z[:, None] * normal
    drift = np.linalg.norm(sideways - sideways[0], axis=1)
    if drift.max() > tolerance:
        i = int(np.argmax(drift))
        raise DataError(
            f"{where}: slice {names[i]} is shifted {drift[i]:.3g} mm sideways from {names[0]} (off the slice normal: "
            "a tilted gantry or a sheared stack); correct the tilt when converting (e.g. dcm2niix does) and read the "
            "corrected image"
        )
    problems = []
    for i in np.flatnonzero(np.abs(gaps - spacing) > tolerance)[:3].tolist():
        ratio = gaps[i] / spacing
        missing = round(ratio) - 1 if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.1 else 0
        problems.append(
            f"{gaps[i]:.4g} mm between slices {i + 1} and {i + 2} of {len(files)} ({names[i]} at z = {z[i]:.2f} mm, "
            f"{names[i + 1]} at z = {z[i + 1]:.2f} mm)" + (f", {missing} slice(s) missing" if missing else "")
        )
    n_uneven = int((np.abs(gaps - spacing) > tolerance).sum())
    if n_uneven > len(problems):
        problems.append(f"{n_uneven - len(problems)} more uneven gap(s)")
    if problems:
        problems.insert(0, f"expected {spacing:.4g} mm between slices (the median; tolerance {tolerance:.3g} mm)")
    return files, z, np.column_stack([row, col, normal]), problems


def _resample_slices(files: list[str], z: np.ndarray, direction: np.ndarray) -> sitk.Image:
    """Stack the slice files (sorted by ``z``) and interpolate them linearly onto evenly spaced positions.

    The first and last slices keep their positions, so the physical extent is unchanged; the new spacing is the
    median gap adjusted to divide that extent into a whole number of steps. Returns a float32 image.
    """
    slices = [sitk.ReadImage(f) for f in files]
    first = slices[0]
    array = np.stack([sitk.GetArrayFromImage(s).reshape(sitk.GetArrayFromImage(s).shape[-2:]) for s in slices])
    steps = max(1, round((z[-1] - z[0]) / float(np.median(np.diff(z)))))
    target = z[0] + (z[-1] - z[0]) * np.arange(steps + 1) / steps
    below = np.clip(np.searchsorted(z, target, side="right") - 1, 0, len(z) - 2)
    t = ((target - z[below]) / (z[below + 1] - z[below])).astype(np.float32)[:, None, None]
    resampled = (1 - t) * array[below].astype(np.float32) + t * array[below + 1].astype(np.float32)
    image = sitk.GetImageFromArray(resampled)
    image.SetSpacing((*first.GetSpacing()[:2], (z[-1] - z[0]) / steps))
    image.SetOrigin(first.GetOrigin()[:3] if first.GetDimension() == 3 else (*first.GetOrigin(), 0.0))
    image.SetDirection(direction.ravel().tolist())
    return image


def _read_dicom_series(folder: Path, *, resample: bool) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{folder}: is a folder without a DICOM series; point to an image file instead")
    if len(series) > 1:
        listed = ", ".join(f"{uid} ({len(reader.GetGDCMSeriesFileNames(str(folder), uid))} files)" for uid in series)
        raise DataError(
            f"{folder}: holds {len(series)} DICOM series (SeriesInstanceUID {listed}); put each in its own folder "
            "and point to the folder of the one to read"
        )
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    files, z, direction, problems = _dicom_stack(folder, series[0], files)
    if problems:
        text = f"{folder}: DICOM series {series[0]} has uneven slice spacing: {'; '.join(problems)}"
        if not resample:
            raise DataError(f"{text}. Re-export the complete series; if interpolating the gap is acceptable, "
                            "convert it once with medmodal.data.io.read_image(folder, dicom_resample=True) "
                            "(docs/troubleshooting.md)")
        image = _resample_slices(files, z, direction)
        warnings.warn(f"{text}; resampled onto {image.GetSize()[2]} evenly spaced slices of "
                      f"{image.GetSpacing()[2]:.4g} mm (linear interpolation)", DicomGeometryWarning, stacklevel=4)
        return image
    reader.SetFileNames(files)
    return reader.Execute()


def read_image(path: Path | str, *, dicom_resample: bool = False) -> Volume:
    """Read one image or label map, eagerly, with its affine.

    A DICOM series folder is checked before it is read: one series (SeriesInstanceUID) per folder, every slice with
    its position and orientation tags, one orientation, no two slices at one position, no sideways drift, and even
    slice spacing (each gap within 1 % or 0.01 mm of the median, see :data:`DICOM_SPACING_RTOL`). A missing slice
    or uneven spacing is an error naming the series and the slices around the gap, unless ``dicom_resample``.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) or
            DICOM (``.dcm``) file, or a folder holding one DICOM series, or a 2D picture (``.png``, ``.jpg``,
            ``.jpeg``, ``.tif``, ``.tiff``, ``.bmp``). Pictures and single-frame DICOM files are read by
            :func:`medmodal.data.xray.read_xray` (an :class:`~medmodal.data.xray.XrayVolume`: modality LUT
            applied, MONOCHROME1 inverted, ``spacing_source`` set); multi-frame DICOM files and series folders by
            SimpleITK.
        dicom_resample: resample an unevenly spaced DICOM series onto evenly spaced slices between its first and
            last slice (linear interpolation, float32) with a :class:`DicomGeometryWarning`, instead of refusing it.

    Returns:
        A :class:`Volume` with an ``(X, Y, Z)`` or ``(X, Y)`` array in the file's dtype (after NIfTI
        scaling) and a RAS+ affine. A one-slice volume ``(X, Y, 1)`` is returned as ``(X, Y)`` with the
        same affine.

    Raises:
        DataError: missing, unsupported, unreadable or truncated file; multi-channel or 4D image;
            NaN/inf voxels; a DICOM folder with several series, mixed orientations or (without ``dicom_resample``)
            uneven slice spacing.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path")
    ext = _extension(path)
    if not path.is_dir() and ext not in READ_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {ext!r}; convert it to one of {', '.join(READ_EXTENSIONS)} "
            "or a DICOM series folder"
        )
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: is empty (0 bytes); re-export it or download it again")
    if ext in xray.PICTURE_EXTENSIONS or (ext == ".dcm" and path.is_file() and xray.is_single_frame_dicom(path)):
        return xray.read_xray(path)
    try:
        if ext in _NIFTI and not path.is_dir():
            img = nib.load(path, mmap=False)
            array = np.asanyarray(img.dataobj)
            return _to_volume(np.asarray(array), np.asarray(img.affine, dtype=np.float64), path)
        image = _read_dicom_series(path, resample=dicom_resample) if path.is_dir() else sitk.ReadImage(str(path))
        return _sitk_to_volume(image, path)
    except DataError:
        raise
    except _READ_ERRORS as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{path}: cannot be read, the file is corrupt or truncated ({reason}); "
            "re-export it or download it again"
        ) from err


def _storable(array: np.ndarray, dtype: DTypeLike | None) -> np.ndarray:
    if dtype is not None:
        return array.astype(dtype, copy=False)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        return array.astype(compact_int_dtype(array))
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def compact_int_dtype(array: np.ndarray) -> np.dtype:
    """The smallest of ``uint8``, ``int16``, ``int32`` that holds every value of the integer ``array``."""
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    raise DataError(f"label values {lo}..{hi} do not fit in int32")


@contextmanager
def staged_output_dir(root: Path | str, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder next to ``root``; on success move its entries into ``root``.

    Nothing is left in ``root`` if the body raises. ``root`` must be missing or empty unless ``overwrite``;
    with ``overwrite``, entries of the same name in ``root`` are replaced and other entries are kept.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder; pick a folder to write the dataset to")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise DataError(
            f"{root}: folder exists and is not empty; pass --overwrite (overwrite=True) or pick another "
            "folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.staging-", dir=root.parent))
    try:
        yield stage
        root.mkdir(exist_ok=True)
        for entry in sorted(stage.iterdir()):
            target = root / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_image(volume: Volume, path: Path | str, *, dtype: DTypeLike | None = None) -> Path:
    """Write ``volume`` atomically (a temporary file in the same folder, then a rename); make parent folders.

    Args:
        volume: the ``(X, Y[, Z])`` array and its RAS+ affine.
        path: destination; the ending picks the format (one of :data:`WRITE_EXTENSIONS`). A ``.png`` holds a 2D
            integer label map with values 0..65535 (``uint8`` when they fit, else ``uint16``) and no geometry:
            it is on the grid of a picture read by :func:`read_image` (1 mm pixels), not the volume's affine.
        dtype: on-disk dtype; by default the array's (``int64`` is narrowed, ``bool`` becomes ``uint8``).

    Returns:
        ``path``. A failed write leaves no file behind (and an existing file untouched).
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise DataError(f"{path}: cannot write {ext!r} files; use one of {', '.join(WRITE_EXTENSIONS)}")
    array = _storable(np.asarray(volume.array), dtype)
    if ext == ".png":
        xray.png_label_map(array, path)  # refuse what a PNG cannot hold before staging anything
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private folder keeps two-file formats (.nhdr/.mhd + data file) consistent under their final names.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        staged = tmp / path.name
        if ext in _NIFTI:
            img = nib.Nifti1Image(array, volume.affine)
            img.set_qform(volume.affine, code=1)
            img.set_sform(volume.affine, code=1)
            img.header.set_xyzt_units("mm")
            nib.save(img, staged)
        elif ext == ".png":
            xray.write_png(array, staged)
        else:
            sitk.WriteImage(_volume_to_sitk(Volume(array, volume.affine, volume.path)), str(staged), True)
        written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # the header last
        for file in written:
            os.replace(file, path.parent / file.name)
    except DataError:
        raise
    except (OSError, RuntimeError, ValueError, HeaderDataError) as err:
        message = f"{path}: could not be written ({err}); check the folder is writable and has space"
        raise DataError(message) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _grid_differences(a: Volume, b: Volume, *, atol_mm: float, rtol: float) -> list[str]:
    if a.shape != b.shape:
        return [f"shape {a.shape} vs {b.shape}"]
    diffs = []
    k = a.spatial_dims  # a 2D image's third affine column only places the slice: compare in-plane axes
    ma, mb = a.affine[:3, :k], b.affine[:3, :k]
    sa, sb = np.linalg.norm(ma, axis=0), np.linalg.norm(mb, axis=0)
    if not np.allclose(sa, sb, rtol=rtol, atol=0.0):
        diffs.append(f"spacing {tuple(np.round(sa, 4).tolist())} vs {tuple(np.round(sb, 4).tolist())} mm")
    cosines = np.abs(ma / sa - mb / sb).max()
    if cosines > rtol:
        diffs.append(f"orientation (direction cosines differ by up to {cosines:.3g})")
    oa, ob = a.affine[:3, 3], b.affine[:3, 3]
    if not np.allclose(oa, ob, rtol=0.0, atol=atol_mm):
        diffs.append(f"origin {tuple(np.round(oa, 3).tolist())} vs {tuple(np.round(ob, 3).tolist())} mm")
    return diffs


def _grid_errors(
    volumes: Mapping[str, Volume], *, case_id: str, atol_mm: float, rtol: float
) -> list[tuple[Path | None, DataError]]:
    items = list(volumes.items())
    errors = []
    for name, vol in items[1:]:
        ref_name, ref = items[0]  # every volume is compared with the first
        diffs = _grid_differences(ref, vol, atol_mm=atol_mm, rtol=rtol)
        if diffs:
            errors.append((vol.path, DataError(
                f"case {case_id!r}: {name} ({vol.where}) and {ref_name} ({ref.where}) are not on the same "
                f"grid: {'; '.join(diffs)}. Resample {name} onto {ref_name}'s grid (e.g. with SimpleITK's "
                "ResampleImageFilter), then run `medmodal data check` on the dataset again"
            )))
    return errors


def check_same_grid(
    volumes: Mapping[str, Volume], *, case_id: str, atol_mm: float = 1e-2, rtol: float = 1e-3
) -> None:
    """Raise :class:`DataError` naming both files unless all ``volumes`` share one voxel grid.

    Args:
        volumes: name (modality or ``"label"``) → volume; each is compared with the first.
        case_id: named in the message.
        atol_mm: tolerance on the origin, in mm.
        rtol: relative tolerance on the spacing, and absolute tolerance on the direction cosines.
    """
    errors = _grid_errors(volumes, case_id=case_id, atol_mm=atol_mm, rtol=rtol)
    if errors:
        raise errors[0][1]


def _as_label(volume: Volume, info: DatasetInfo, case_id: str) -> Volume:
    array = volume.array
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise DataError(
                f"case {case_id!r}: label {volume.where} has non-integer values (a probability map or an "
                "image?); a label map must hold integer class values"
            )
    elif array.dtype.kind not in "iub":
        raise DataError(f"case {case_id!r}: label {volume.where} has unsupported dtype {array.dtype}")
    values = np.unique(array).astype(np.int64)
    if info.label_map:
        unmapped = sorted(set(values.tolist()) - set(info.label_map))
        if unmapped:
            raise DataError(
                f"case {case_id!r}: label {volume.where} stores value(s) {unmapped} that the dataset's label "
                f"mapping {info.label_map} does not list; relabel the file or fix the dataset's metadata"
            )
        stored = np.array(sorted(info.label_map), dtype=np.int64)
        mapped = np.array([info.label_map[int(v)] for v in stored], dtype=np.int64)
        array = mapped[np.searchsorted(stored, array.astype(np.int64))]
        values = np.unique(mapped[np.searchsorted(stored, values)])
    unknown = sorted(set(values.tolist()) - set(info.labels))
    if unknown:
        raise DataError(
            f"case {case_id!r}: label {volume.where} has value(s) {unknown} that the dataset does not "
            f"declare (labels {list(info.labels)}); relabel the file or declare the labels in the "
            "dataset's metadata (a manifest: \"labels\", and for a mask stored as other values, e.g. 0/255, "
            "\"label_map\": {\"255\": 1} in the JSON manifest or in the medmodal.json beside a CSV manifest)"
        )
    return Volume(np.asarray(array).astype(compact_int_dtype(values), copy=False), volume.affine, volume.path)


def inspect_case(
    record: CaseRecord, info: DatasetInfo, *, dicom_resample: bool = False
) -> tuple[Case | None, list[tuple[Path | None, DataError]]]:
    """Read a case like :func:`read_case`, but collect every problem instead of stopping at the first.

    Returns:
        The case (``None`` if there was any problem) and a list of ``(file or None, error)``.
    """
    errors: list[tuple[Path | None, DataError]] = []
    where = f"case {record.case_id!r}"
    try:
        info.check_modalities(list(record.images), where=where)
    except DataError as err:
        errors.append((None, err))
    if not record.images:
        errors.append((record.label, DataError(
            f"{where}: all modalities missing; at least one of {list(info.modalities)} is required"
        )))
    volumes: dict[str, Volume] = {}
    order = [m for m in info.modalities if m in record.images]
    order += sorted(set(record.images) - set(info.modalities))
    for name in order:
        try:
            vol = read_image(record.images[name], dicom_resample=dicom_resample)
            volumes[name] = Volume(vol.array.astype(np.float32, copy=False), vol.affine, vol.path)
        except DataError as err:
            errors.append((record.images[name], err))
    label = None
    if record.label is not None:
        try:
            label = _as_label(read_image(record.label, dicom_resample=dicom_resample), info, record.case_id)
        except DataError as err:
            errors.append((record.label, err))
    grid = dict(volumes) if label is None else {**volumes, "label": label}
    errors += _grid_errors(grid, case_id=record.case_id, atol_mm=1e-2, rtol=1e-3)
    if errors:
        return None, errors
    images = {m: volumes[m] for m in info.modalities if m in volumes}
    case = Case(record.case_id, images, label=label, target=record.target, report=record.report,
                source=record.source)
    return case, errors


def read_case(record: CaseRecord, info: DatasetInfo, *, dicom_resample: bool = False) -> Case:
    """Read every present modality and the label of ``record`` and validate them against ``info``.

    Images become ``float32`` arrays ``(X, Y[, Z])``; the label becomes a compact integer array on the same
    grid, with values in ``info.labels`` (``info.label_map`` maps stored values first). ``dicom_resample`` is
    passed to :func:`read_image`.

    Raises:
        DataError: the first problem found (unknown modality, all modalities missing, unreadable file,
            NaN/inf, grid mismatch, non-integer or undeclared label values). :func:`inspect_case` returns
            them all.
    """
    case, errors = inspect_case(record, info, dicom_resample=dicom_resample)
    if case is None:
        raise errors[0][1]
    return case
