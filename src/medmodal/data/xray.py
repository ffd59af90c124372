"""Planar (2D) X-ray images: PNG / JPEG / TIFF / BMP pictures (Pillow) and single-frame DICOM files (pydicom).

Every reader returns an :class:`XrayVolume`: a :class:`~medmodal.data.case.Volume` with an ``(X, Y)`` array
(``X`` = picture columns, left to right; ``Y`` = picture rows, top to bottom: the *transpose* of the
``(rows, columns)`` arrays of PIL and pydicom) and a RAS+ affine whose first two column norms are the pixel
spacing in mm. ``spacing_source`` says where that spacing came from; ``None`` means the file has no physical
pixel size, and the spacing is a placeholder of 1 mm per pixel.

Intensities follow "higher = brighter" (dense tissue bright, as MONOCHROME2 displays it):

* DICOM: the stored values go through the modality LUT (RescaleSlope/RescaleIntercept or a Modality LUT
  Sequence, PS3.3 C.11.1); MONOCHROME1 is then inverted within the range the file declares (BitsStored and
  PixelRepresentation, mapped through the same LUT): ``v -> lo + hi - v``. The array keeps the stored integer
  dtype when the LUT is the identity and is ``float32`` otherwise. Compressed pixel data that pydicom has no
  decoder for is decoded by SimpleITK (GDCM), which applies the same rescale and MONOCHROME1 inversion.
* Pictures: grey values as stored (``uint8``, ``uint16``, ``int32`` or ``float32``). DPI is never trusted as a
  pixel size (it is a print resolution, often a 72/96 dpi default), so pictures always get 1 mm pixels and
  ``spacing_source=None``. A colour picture is refused (an X-ray is grey) unless it is read with
  ``read_picture(path, colour=True)`` (image collections: H&E pathology, fundus photographs), which keeps its RGB
  channels in :attr:`XrayVolume.rgb` and puts their ITU-R BT.601 luma in ``array``.

Every problem is a :class:`~medmodal.data.case.DataError` naming the file and saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

try:
    from pydicom.pixels import apply_modality_lut
except ImportError:  # pydicom < 3
    from pydicom.pixel_data_handlers.util import apply_modality_lut

from medmodal.data.case import DataError, Volume

__all__ = [
    "BT601_WEIGHTS",
    "PICTURE_EXTENSIONS",
    "SPACING_TAGS",
    "XrayVolume",
    "bt601_grey",
    "is_single_frame_dicom",
    "png_label_map",
    "read_dicom_2d",
    "read_picture",
    "read_xray",
    "write_png",
]

#: File endings :func:`read_picture` reads (through Pillow).
PICTURE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: DICOM pixel-size attributes, in the order they are trusted: the spacing in the patient (PixelSpacing), at the
#: detector (ImagerPixelSpacing: larger than the anatomy by the geometric magnification, about 1.1 for a chest
#: PA), and of a film digitiser (NominalScannedPixelSpacing, secondary capture).
SPACING_TAGS: tuple[str, ...] = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
#: Largest channel difference (grey levels of 255) of an RGB JPEG still read as grey: lossy chroma noise.
JPEG_GREY_TOLERANCE = 4
#: ITU-R BT.601 luma weights of (R, G, B): ``Y' = 0.299 R + 0.587 G + 0.114 B`` (Rec. ITU-R BT.601-7, eq. 2.1;
#: also Pillow's ``convert("L")``). The one RGB -> grey conversion of medmodal.
BT601_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, as in medmodal.data.io
_JPEG = (".jpg", ".jpeg")


@dataclass
class XrayVolume(Volume):
    """A 2D X-ray image: a :class:`Volume` with an ``(X, Y)`` array that also says where its spacing came from.

    Args:
        spacing_source: the DICOM attribute the pixel spacing was read from (one of :data:`SPACING_TAGS`), or
            ``None`` when the file carries no physical pixel size and the affine holds 1 mm per pixel.
        rgb: ``(3, X, Y)`` red, green and blue of a colour picture read with ``read_picture(path, colour=True)``
            (``array`` is then their BT.601 luma, :func:`bt601_grey`, float32); ``None`` for a grey image.
    """

    spacing_source: str | None = None
    rgb: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rgb is not None and (self.rgb.ndim != 3 or self.rgb.shape != (3, *self.array.shape)):
            raise DataError(f"{self.where}: rgb must be (3, X, Y) = (3, {', '.join(map(str, self.array.shape))}), "
                            f"got {self.rgb.shape}")

    @property
    def channels(self) -> int:
        """3 for a colour picture kept in colour (:attr:`rgb`), else 1."""
        return 1 if self.rgb is None else 3

    @property
    def has_physical_spacing(self) -> bool:
        """Whether ``spacing`` is a physical pixel size (``False``: a 1 mm per pixel placeholder)."""
        return self.spacing_source is not None


def _existing_file(path: Path | str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise DataError(f"{path}: is not a file; point to one image file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: is empty (0 bytes); re-export it or download it again")
    return path


def _corrupt(path: Path, err: BaseException) -> DataError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"{path}: cannot be read, the file is corrupt or truncated ({reason}); "
                     "re-export it or download it again")


def _grey(rgb: np.ndarray, path: Path, *, tolerance: int = 0) -> np.ndarray:
    """The one channel of a ``(rows, cols, 3)`` colour image whose channels are equal (within ``tolerance``)."""
    spread = int(np.ptp(rgb.astype(np.int64), axis=-1).max()) if rgb.size else 0
    if spread > tolerance:
        raise DataError(f"{path}: has colour (channels differ by up to {spread} grey levels); medmodal expects a "
                        "grey X-ray: convert it to grey or give one channel")
    if tolerance == 0:
        return rgb[..., 0]
    return np.round(rgb.mean(axis=-1)).astype(rgb.dtype)


def bt601_grey(rgb: np.ndarray, *, axis: int = 0) -> np.ndarray:
    """The BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (:data:`BT601_WEIGHTS`) of the 3 channels on ``axis``,
    float32 (the channel axis removed)."""
    rgb = np.asarray(rgb)
    if rgb.shape[axis] != 3:
        raise ValueError(f"expected 3 colour channels on axis {axis}, got shape {rgb.shape}")
    weights = np.asarray(BT601_WEIGHTS, dtype=np.float32)
    return np.tensordot(np.moveaxis(rgb, axis, -1).astype(np.float32, copy=False), weights, axes=([-1], [0]))


def _planar(rows_cols: np.ndarray, affine: np.ndarray, path: Path, spacing_source: str | None) -> XrayVolume:
    """``(rows, cols)`` grey or ``(rows, cols, 3)`` colour -> an :class:`XrayVolume` with the ``(X, Y) = (cols,
    rows)`` array (colour: the BT.601 luma, the channels in ``rgb``); NaN/inf refused."""
    if rows_cols.dtype.kind == "f" and not np.isfinite(rows_cols).all():
        n_bad = int(rows_cols.size - np.isfinite(rows_cols).sum())
        raise DataError(f"{path}: contains {n_bad} NaN or infinite pixel(s); replace them (e.g. with 0) in the "
                        "tool that produced the file")
    if rows_cols.ndim == 3:
        rgb = np.ascontiguousarray(np.moveaxis(rows_cols, -1, 0).transpose(0, 2, 1))
        return XrayVolume(array=bt601_grey(rgb), affine=affine, path=path, spacing_source=spacing_source, rgb=rgb)
    array = np.ascontiguousarray(rows_cols.T)
    return XrayVolume(array=array, affine=affine, path=path, spacing_source=spacing_source)


# --------------------------------------------------------------------------------------------------- pictures


def read_picture(path: Path | str, *, colour: bool = False) -> XrayVolume:
    """Read a PNG, JPEG, TIFF or BMP picture as an ``(X, Y)`` image with 1 mm pixels.

    Modes: ``L`` -> ``uint8``; ``I;16*`` -> ``uint16``; ``I`` -> ``int32``; ``F`` -> ``float32``; ``1`` (bilevel)
    -> ``uint8`` 0/1; ``LA``, ``P``, ``RGB(A)`` and other colour modes are read as grey when their colour
    channels are equal (exactly, or within :data:`JPEG_GREY_TOLERANCE` for JPEG), alpha dropped.

    Args:
        path: the picture.
        colour: keep a picture whose channels differ as colour (``rgb`` ``(3, X, Y)`` ``uint8``, ``array`` its
            BT.601 luma) instead of refusing it. An alpha channel must then be opaque (every pixel 255) and is
            dropped; a transparent pixel is an error, since what lies behind it is unknown. The default
            (``False``) is the X-ray readers' behaviour: colour refused, alpha dropped.

    Returns:
        An :class:`XrayVolume` with ``array[c, r]`` = the pixel at row ``r``, column ``c``, affine
        ``diag(1, 1, 1, 1)`` (the picture's own axes, so reorientation to RAS leaves it as it is) and
        ``spacing_source=None``.

    Raises:
        DataError: missing, empty, truncated or unreadable file; several frames/pages; colour (unless
            ``colour``); a transparent pixel (with ``colour``); NaN/inf.
    """
    path = _existing_file(path)
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise DataError(f"{path}: has {frames} frames/pages; medmodal reads one 2D image per file: save "
                                "each page as its own file")
            image.load()
            array = _picture_array(image, path, colour=colour)
    except DataError:
        raise
    except UnidentifiedImageError as err:
        raise DataError(f"{path}: is not an image Pillow can read (PNG, JPEG, TIFF, BMP); check the file or "
                        "convert it to PNG") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _corrupt(path, err) from err
    return _planar(array, np.eye(4), path, None)


def _picture_array(image: Image.Image, path: Path, *, colour: bool = False) -> np.ndarray:
    """``(rows, cols)`` grey, or ``(rows, cols, 3)`` RGB when ``colour`` and the channels differ."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image).astype(np.uint8)
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        array = np.asarray(image)
        return array.astype(array.dtype.newbyteorder("="), copy=False)  # big-endian I;16B -> native uint16
    if mode in ("LA", "La"):
        if colour:
            _opaque(np.asarray(image.getchannel("A")), path, mode)
        return np.asarray(image.getchannel("L"))
    if colour and (mode in ("PA", "RGBa") or (mode == "P" and "transparency" in image.info)):
        image = image.convert("RGBA")  # keep the transparency to check it
    if mode not in ("RGB", "RGBA", "RGBX", "RGBa") and image.mode != "RGBA":
        image = image.convert("RGB")  # P, PA, CMYK, YCbCr, LAB, HSV
    pixels = np.asarray(image)
    if colour and image.mode == "RGBA":
        _opaque(pixels[..., 3], path, mode)
    rgb = pixels[..., :3]
    tolerance = JPEG_GREY_TOLERANCE if path.name.lower().endswith(_JPEG) else 0
    if colour:
        spread = int(np.ptp(rgb.astype(np.int16), axis=-1).max()) if rgb.size else 0
        if spread > tolerance:
            return np.ascontiguousarray(rgb)
    return _grey(rgb, path, tolerance=tolerance)


def _opaque(alpha: np.ndarray, path: Path, mode: str) -> None:
    """Refuse a picture with a transparent pixel (alpha below 255): what lies behind it is unknown."""
    clear = int(np.count_nonzero(alpha < 255))
    if clear:
        second = (" (or a 2-channel image whose second channel Pillow reads as alpha)" if mode in ("LA", "La")
                  else "")
        raise DataError(f"{path}: has {clear} transparent pixel(s) (alpha < 255, mode {mode}){second}; medmodal "
                        "reads opaque grey or RGB pictures: flatten it onto a background or drop the alpha "
                        "channel, and save each channel of a multi-channel image as its own grey image")


def png_label_map(array: np.ndarray, path: Path | str) -> np.ndarray:
    """The ``(rows, cols)`` array a PNG of the 2D integer ``(X, Y)`` label map ``array`` stores.

    ``uint8`` when every value fits, ``uint16`` otherwise. ``path`` is named in the errors.

    Raises:
        DataError: not 2D, not integer, or values outside ``0..65535``.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise DataError(f"{path}: PNG holds 2D integer label maps; got a {array.ndim}D {array.dtype} array: "
                        "write it as .nii.gz instead")
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise DataError(f"{path}: values {lo}..{hi} do not fit a PNG (0..65535); write it as .nii.gz instead")
    return np.ascontiguousarray(array.T.astype(np.uint8 if hi <= 255 else np.uint16))


def write_png(array: np.ndarray, path: Path | str) -> None:
    """Write a 2D integer ``(X, Y)`` label map with values ``0..65535`` as a grey PNG (see :func:`png_label_map`).

    PNG stores no geometry: reading it back gives :func:`read_picture`'s 1 mm grid. Not atomic:
    :func:`medmodal.data.io.write_image` stages it.
    """
    Image.fromarray(png_label_map(array, path)).save(path, format="PNG")


# ------------------------------------------------------------------------------------------------------ DICOM


def is_single_frame_dicom(path: Path | str) -> bool:
    """Whether ``path`` is a DICOM file (pydicom reads its header) holding one 2D frame of pixel data."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # a probe: whatever pydicom cannot parse goes to SimpleITK, which reports it
        return False
    return "Rows" in ds and "Columns" in ds and _frames(ds) == 1


def _frames(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _spacing(ds: pydicom.Dataset) -> tuple[float, float, str | None]:
    """``(row spacing, column spacing, attribute)`` in mm: the first valid of :data:`SPACING_TAGS`."""
    for keyword in SPACING_TAGS:
        try:
            values = [float(v) for v in ds.get(keyword) or ()]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values):
            return values[0], values[1], keyword
    return 1.0, 1.0, None


def _dicom_affine(ds: pydicom.Dataset, row_spacing: float, col_spacing: float) -> np.ndarray:
    """RAS+ affine of the ``(X, Y) = (cols, rows)`` array: from ImageOrientation/PositionPatient (LPS, PS3.3
    C.7.6.2.1.1) when the file has a valid orientation, else ``diag(col_spacing, row_spacing, 1, 1)``."""
    try:
        cosines = np.array([float(v) for v in ds.get("ImageOrientationPatient") or ()], dtype=np.float64)
        origin = np.array([float(v) for v in ds.get("ImagePositionPatient") or ()], dtype=np.float64)
    except (TypeError, ValueError):
        cosines, origin = np.empty(0), np.empty(0)
    if cosines.shape != (6,) or not np.isfinite(cosines).all() or not np.allclose(
            np.linalg.norm(cosines.reshape(2, 3), axis=1), 1.0, atol=1e-3):
        return np.diag([col_spacing, row_spacing, 1.0, 1.0])
    row, col = cosines[:3], cosines[3:]  # along a row (increasing column index), along a column
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * col_spacing, col * row_spacing, np.cross(row, col)
    if origin.shape == (3,) and np.isfinite(origin).all():
        lps[:3, 3] = origin
    return _LPS @ lps


def _stored_range(ds: pydicom.Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _identity_lut(ds: pydicom.Dataset) -> bool:
    if "ModalityLUTSequence" in ds:
        return False
    return float(ds.get("RescaleSlope", 1) or 1) == 1.0 and float(ds.get("RescaleIntercept", 0) or 0) == 0.0


def read_dicom_2d(path: Path | str) -> XrayVolume:
    """Read a single-frame 2D DICOM file (CR, DX, or any one-frame image) as an ``(X, Y)`` image.

    The modality LUT is applied and MONOCHROME1 inverted (see the module docstring), so higher is brighter. A
    colour file (RGB, YBR) is accepted when its channels are equal. The spacing is the first of
    :data:`SPACING_TAGS` present (``spacing_source`` names it), else 1 mm with ``spacing_source=None``.

    Returns:
        An :class:`XrayVolume`: ``array[c, r]`` = the pixel at row ``r``, column ``c``; the affine from
        ImageOrientationPatient/ImagePositionPatient (LPS -> RAS) when present, else ``diag(sx, sy, 1, 1)``.

    Raises:
        DataError: missing, empty, not DICOM, truncated, no pixel data, several frames, colour, compressed
            pixel data that neither pydicom nor SimpleITK can decode (naming the transfer syntax).
    """
    path = _existing_file(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise DataError(f"{path}: is not a DICOM file (no 'DICM' marker); check the file or convert it") from err
    except (OSError, EOFError, ValueError, TypeError, KeyError) as err:
        raise _corrupt(path, err) from err
    if "PixelData" not in ds:
        raise DataError(f"{path}: is a DICOM file without pixel data (a report or a presentation state?); point "
                        "to the image file")
    if _frames(ds) > 1:
        raise DataError(f"{path}: holds {_frames(ds)} frames; read it with medmodal.data.io.read_image, which "
                        "reads a multi-frame file as a 3D volume, or save one frame as its own file")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    row_spacing, col_spacing, source = _spacing(ds)
    affine = _dicom_affine(ds, row_spacing, col_spacing)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        stored = ds.pixel_array
    except (RuntimeError, NotImplementedError) as err:
        if syntax is None or not syntax.is_compressed:
            raise _corrupt(path, err) from err
        return _planar(_decode_with_gdcm(path, ds, syntax, photometric), affine, path, source)
    except (ValueError, TypeError, AttributeError, KeyError, OSError, EOFError) as err:
        raise _corrupt(path, err) from err
    if stored.ndim == 3:  # (rows, cols, samples): pydicom has converted YBR to RGB
        return _planar(_grey(stored, path), affine, path, source)
    if stored.ndim != 2:
        raise DataError(f"{path}: has pixel data of shape {stored.shape}; expected one 2D frame")
    try:
        values = _monochrome(stored, ds, photometric)
    except (ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(f"{path}: has an unusable modality LUT (RescaleSlope/RescaleIntercept or Modality LUT "
                        f"Sequence: {err}); fix the tags in the tool that exported it") from err
    return _planar(values, affine, path, source)


def _monochrome(stored: np.ndarray, ds: pydicom.Dataset, photometric: str) -> np.ndarray:
    """Modality LUT, then MONOCHROME1 inversion within the declared range mapped through the LUT."""
    identity = _identity_lut(ds)
    values = stored if identity else np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if photometric == "MONOCHROME1":
        lo, hi = _stored_range(ds)
        bounds = np.asarray(apply_modality_lut(np.array([lo, hi], dtype=np.int64), ds), dtype=np.float64)
        inverted = bounds.min() + bounds.max() - values.astype(np.float64)
        values = inverted.astype(stored.dtype) if identity else inverted
    return values if identity else values.astype(np.float32)


def _decode_with_gdcm(path: Path, ds: pydicom.Dataset, syntax: pydicom.uid.UID, photometric: str) -> np.ndarray:
    """Decode compressed pixel data with SimpleITK (GDCM): ``(rows, cols)`` final values.

    GDCM applies RescaleSlope/RescaleIntercept and inverts MONOCHROME1 as ``slope * (max_stored - v) +
    intercept``, which is :func:`_monochrome`'s ``lo + hi - (slope * v + intercept)`` for unsigned data (tested).
    """
    todo = ("install a decoder (`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` or "
            "`pip install python-gdcm`) or decompress the file (`gdcmconv --raw in.dcm out.dcm`)")
    where = f"{path}: its pixel data is compressed as {syntax.name} ({syntax})"
    if "ModalityLUTSequence" in ds or (photometric == "MONOCHROME1" and ds.get("PixelRepresentation", 0) == 1):
        raise DataError(f"{where}, which pydicom has no decoder for here; {todo}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise DataError(f"{where}, which neither pydicom nor SimpleITK (GDCM) could decode; {todo}") from err
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 3:
        return _grey(array.reshape(array.shape[-3:]), path)
    array = array.reshape(array.shape[-2:])
    if _identity_lut(ds):
        return array.astype(_stored_dtype(ds))
    return array.astype(np.float32)


def _stored_dtype(ds: pydicom.Dataset) -> np.dtype:
    bits = 8 if int(ds.get("BitsAllocated", 16) or 16) <= 8 else 16 if int(ds.BitsAllocated) <= 16 else 32
    return np.dtype(f"{'int' if int(ds.get('PixelRepresentation', 0) or 0) == 1 else 'uint'}{bits}")


def read_xray(path: Path | str) -> XrayVolume:
    """Read a 2D X-ray: a picture (:data:`PICTURE_EXTENSIONS`) or a single-frame DICOM file (any other ending)."""
    path = Path(path)
    if path.name.lower().endswith(PICTURE_EXTENSIONS):
        return read_picture(path)
    return read_dicom_2d(path)
