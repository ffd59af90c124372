"""2D X-ray reading: DICOM (modality LUT, MONOCHROME1 inversion, bit depths, spacing tags, geometry, compressed
pixel data through GDCM) and PNG/JPEG/TIFF/BMP pictures (grey modes, grey-as-RGB, colour refused), every failure a
DataError naming the file, the (X, Y) transpose, and PNG label maps written by write_image on the picture's grid."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from medmodal.data import xray
from medmodal.data.case import CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.io import READ_EXTENSIONS, WRITE_EXTENSIONS, check_same_grid, read_case, read_image, write_image
from medmodal.data.xray import XrayVolume, read_dicom_2d, read_picture

ROWS, COLS = 5, 7  # odd and different, so a missing transpose shows


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)


def ramp(bits_stored: int, signed: bool, shape: tuple[int, int] = (ROWS, COLS)) -> np.ndarray:
    """``(rows, cols)`` stored values from the lowest to the highest the bit depth allows, row by row."""
    lo, hi = stored_range(bits_stored, signed)
    return np.round(np.linspace(lo, hi, shape[0] * shape[1])).astype(np.int64).reshape(shape)


def write_dicom(path: Path, stored: np.ndarray, *, bits_allocated: int = 16, bits_stored: int = 12,
                signed: bool = False, photometric: str = "MONOCHROME2", rescale: tuple[float, float] | None = None,
                spacing: dict[str, list[float]] | None = None, frames: int = 1,
                sop_class: str = DigitalXRayImageStorageForPresentation, **tags: object) -> Path:
    """A DX file (explicit VR little endian) holding ``stored`` ``(rows, cols)`` or ``(frames, rows, cols)``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT" if sop_class == CTImageStorage else "DX"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
    for keyword, value in (spacing if spacing is not None else {"PixelSpacing": [0.2, 0.3]}).items():
        setattr(ds, keyword, value)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype(f"{'int' if signed else 'uint'}{bits_allocated}").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# -------------------------------------------------------------------------------------------------------- DICOM

DEPTHS = [  # bits allocated, bits stored, signed, photometric, (slope, intercept) or None
    (8, 8, False, "MONOCHROME2", None),
    (8, 8, False, "MONOCHROME1", None),
    (8, 8, True, "MONOCHROME1", (2.0, 3.0)),
    (16, 12, False, "MONOCHROME2", (0.5, 10.0)),
    (16, 12, False, "MONOCHROME1", (2.0, -5.0)),
    (16, 12, True, "MONOCHROME1", None),
    (16, 16, False, "MONOCHROME1", None),
    (16, 16, True, "MONOCHROME2", (1.0, -1024.0)),
    (16, 16, True, "MONOCHROME1", (0.25, 100.0)),
]


@pytest.mark.parametrize(("allocated", "bits", "signed", "photometric", "rescale"), DEPTHS)
def test_dicom_values_after_modality_lut_and_inversion(tmp_path: Path, allocated: int, bits: int, signed: bool,
                                                       photometric: str, rescale: tuple[float, float] | None) -> None:
    stored = ramp(bits, signed)
    path = write_dicom(tmp_path / "x.dcm", stored, bits_allocated=allocated, bits_stored=bits, signed=signed,
                       photometric=photometric, rescale=rescale)
    slope, intercept = rescale or (1.0, 0.0)
    lo, hi = stored_range(bits, signed)
    expected = slope * ((lo + hi - stored) if photometric == "MONOCHROME1" else stored) + intercept
    vol = read_image(path)
    assert isinstance(vol, XrayVolume)
    assert vol.shape == (COLS, ROWS)
    np.testing.assert_array_equal(vol.array, expected.T)  # exact: every value is representable
    assert vol.array[4, 2] == expected[2, 4]  # the pixel at row 2, column 4
    want = np.float32 if rescale is not None else np.dtype(f"{'int' if signed else 'uint'}{allocated}")
    assert vol.array.dtype == want
    # higher = brighter: MONOCHROME1's darkest stored value (lo) becomes the brightest
    brightest = np.unravel_index(np.argmax(vol.array), vol.shape)
    assert stored.T[brightest] == (lo if photometric == "MONOCHROME1" else hi)


def test_monochrome1_ramp_reads_as_the_reversed_ramp(tmp_path: Path) -> None:
    stored = np.arange(0, 256, 15).reshape(3, 6)  # 0, 15, ..., 255
    path = write_dicom(tmp_path / "m1.dcm", stored, bits_allocated=8, bits_stored=8, photometric="MONOCHROME1")
    vol = read_dicom_2d(path)
    np.testing.assert_array_equal(vol.array.T.ravel(), stored.ravel()[::-1])


def test_dicom_spacing_tags_in_order_of_trust(tmp_path: Path) -> None:
    stored = ramp(12, False)
    both = read_dicom_2d(write_dicom(tmp_path / "a.dcm", stored, spacing={
        "PixelSpacing": [0.2, 0.3], "ImagerPixelSpacing": [0.15, 0.25]}))
    assert both.spacing == pytest.approx((0.3, 0.2))  # X = columns: PixelSpacing[1]; Y = rows: PixelSpacing[0]
    assert both.spacing_source == "PixelSpacing" and both.has_physical_spacing
    np.testing.assert_allclose(both.affine, np.diag([0.3, 0.2, 1.0, 1.0]))
    imager = read_dicom_2d(write_dicom(tmp_path / "b.dcm", stored, spacing={"ImagerPixelSpacing": [0.15, 0.25]}))
    assert imager.spacing == pytest.approx((0.25, 0.15)) and imager.spacing_source == "ImagerPixelSpacing"
    bare = read_dicom_2d(write_dicom(tmp_path / "c.dcm", stored, spacing={}))
    assert bare.spacing == (1.0, 1.0) and bare.spacing_source is None and not bare.has_physical_spacing


def test_dicom_geometry_from_orientation_and_position_matches_simpleitk(tmp_path: Path) -> None:
    stored = ramp(12, False)
    path = write_dicom(tmp_path / "o.dcm", stored, sop_class=CTImageStorage,  # GDCM reads PixelSpacing for CT
                       ImageOrientationPatient=[0, 1, 0, 0, 0, -1], ImagePositionPatient=[10, -20, 30])
    vol = read_image(path)
    # LPS: columns run along +P (0.3 mm), rows along -S (0.2 mm), first pixel at (10, -20, 30); RAS flips x, y
    expected = np.eye(4)
    expected[:3, 0], expected[:3, 1], expected[:3, 3] = [0, -0.3, 0], [0, 0, -0.2], [-10, 20, 30]
    np.testing.assert_allclose(vol.affine[:, [0, 1, 3]], expected[:, [0, 1, 3]])
    image = sitk.ReadImage(str(path))  # the SimpleITK path agrees on grid and values
    assert image.GetSpacing()[:2] == pytest.approx((0.3, 0.2))
    assert image.GetOrigin() == pytest.approx((10, -20, 30))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).reshape(ROWS, COLS), vol.array.T)


def test_compressed_dicom_is_decoded_by_gdcm_with_the_same_photometric_logic(tmp_path: Path) -> None:
    stored = ramp(12, False)
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(tmp_path / "j.dcm"))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")  # JPEG Lossless, process 14: pydicom needs pylibjpeg or gdcm for it
    writer.Execute(sitk.GetImageFromArray(stored.astype(np.uint16)))
    ds = pydicom.dcmread(tmp_path / "j.dcm")
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    for keyword in xray.SPACING_TAGS:  # which one GDCM writes depends on what it read before (its state)
        ds.pop(keyword, None)
    ds.PhotometricInterpretation, ds.BitsStored, ds.HighBit = "MONOCHROME1", 12, 11
    ds.RescaleSlope, ds.RescaleIntercept, ds.ImagerPixelSpacing = "2", "-5", [0.2, 0.3]
    ds.save_as(tmp_path / "m1.dcm")
    vol = read_image(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(vol.array, (2.0 * (4095 - stored) - 5.0).T)
    assert vol.array.dtype == np.float32 and vol.spacing_source == "ImagerPixelSpacing"
    # the same pixels uncompressed, through pydicom, read identically
    plain = write_dicom(tmp_path / "plain.dcm", stored, photometric="MONOCHROME1", rescale=(2.0, -5.0))
    np.testing.assert_array_equal(read_image(plain).array, vol.array)


def test_undecodable_compressed_dicom_names_the_transfer_syntax(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(tmp_path / "j.dcm"))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(ramp(12, False).astype(np.uint16)))

    def fail(*args: object) -> None:
        raise RuntimeError("no codec")

    monkeypatch.setattr(xray.sitk, "ReadImage", fail)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(lambda ds: fail()))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "j.dcm")) + ".*JPEG Lossless.*pip install"):
        read_dicom_2d(tmp_path / "j.dcm")


def test_multiframe_dicom_keeps_the_volume_path(tmp_path: Path) -> None:
    stored = np.stack([ramp(12, False) // 2 + k for k in range(3)])
    path = write_dicom(tmp_path / "mf.dcm", stored, frames=3)
    assert not xray.is_single_frame_dicom(path)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": holds 3 frames; read it with .*read_image"):
        read_dicom_2d(path)
    vol = read_image(path)  # SimpleITK: a 3D (X, Y, frames) volume
    assert not isinstance(vol, XrayVolume) and vol.shape == (COLS, ROWS, 3)
    np.testing.assert_array_equal(vol.array[..., 2], stored[2].T)


def test_broken_dicom_files_are_errors_naming_the_file(tmp_path: Path) -> None:
    good = write_dicom(tmp_path / "good.dcm", ramp(16, False, (40, 50)), bits_stored=16)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(DataError, match=re.escape(str(truncated)) + ": cannot be read, the file is corrupt or"):
        read_image(truncated)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    for read in (read_image, read_dicom_2d):
        with pytest.raises(DataError, match=re.escape(str(empty)) + r": is empty \(0 bytes\)"):
            read(empty)
    text = tmp_path / "text.dcm"
    text.write_text("not a dicom file at all\n" * 20)
    with pytest.raises(DataError, match=re.escape(str(text)) + ": is not a DICOM file"):
        read_dicom_2d(text)
    with pytest.raises(DataError, match=re.escape(str(text))):
        read_image(text)  # not DICOM to pydicom: SimpleITK's path reports it
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "none.dcm")) + ": file not found"):
        read_dicom_2d(tmp_path / "none.dcm")


# ------------------------------------------------------------------------------------------------------ pictures

RNG = np.random.default_rng(7)
PICTURE = RNG.integers(0, 256, size=(18, 17), dtype=np.uint8)  # PIL (rows, cols)


@pytest.mark.parametrize("ending", [".png", ".tif", ".bmp"])
def test_8bit_grey_picture_reads_transposed_with_1mm_pixels(tmp_path: Path, ending: str) -> None:
    Image.fromarray(PICTURE).save(tmp_path / f"p{ending}")
    vol = read_image(tmp_path / f"p{ending}")
    assert isinstance(vol, XrayVolume) and vol.array.dtype == np.uint8 and vol.shape == (17, 18)
    np.testing.assert_array_equal(vol.array, PICTURE.T)
    assert vol.array[16, 3] == PICTURE[3, 16]
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    assert vol.spacing == (1.0, 1.0) and vol.spacing_source is None


def test_16bit_and_float_pictures(tmp_path: Path) -> None:
    deep = (PICTURE.astype(np.uint16) * 250 + 7).astype(np.uint16)  # up to 63757
    Image.fromarray(deep).save(tmp_path / "d.png")
    vol = read_picture(tmp_path / "d.png")
    assert vol.array.dtype == np.uint16
    np.testing.assert_array_equal(vol.array, deep.T)
    real = PICTURE.astype(np.float32) / 7
    Image.fromarray(real).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif").array, real.T)
    real[2, 3] = np.nan
    Image.fromarray(real).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nan.tif")) + ": contains 1 NaN"):
        read_image(tmp_path / "nan.tif")


def test_grey_stored_as_rgb_la_or_palette_is_grey(tmp_path: Path) -> None:
    rgba = np.stack([PICTURE, PICTURE, PICTURE, np.full_like(PICTURE, 128)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png").array, PICTURE.T)  # alpha dropped
    Image.fromarray(np.stack([PICTURE, rgba[..., 3]], axis=-1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png").array, PICTURE.T)
    indices = PICTURE // 2
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([min(2 * k, 255) for k in range(256) for _ in range(3)])  # entry k < 128 is grey 2k
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png").array, (2 * indices).T)
    smooth = np.add.outer(np.arange(18) * 6, np.arange(17) * 5).astype(np.uint8)
    Image.fromarray(np.stack([smooth] * 3, axis=-1)).save(tmp_path / "g.jpg", quality=95)
    vol = read_image(tmp_path / "g.jpg")
    assert vol.array.dtype == np.uint8 and vol.shape == (17, 18)
    assert np.abs(vol.array.astype(int) - smooth.T).max() <= 3  # JPEG is lossy


@pytest.mark.parametrize("ending", [".png", ".jpg"])
def test_colour_picture_is_refused(tmp_path: Path, ending: str) -> None:
    colour = np.stack([PICTURE, PICTURE // 2, 255 - PICTURE], axis=-1)
    Image.fromarray(colour).save(tmp_path / f"c{ending}")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / f"c{ending}")) + ": has colour .*medmodal expects "
                       "a grey X-ray: convert it to grey or give one channel"):
        read_image(tmp_path / f"c{ending}")


@pytest.mark.parametrize("ending", [".png", ".jpg"])
def test_broken_pictures_are_errors_naming_the_file(tmp_path: Path, ending: str) -> None:
    good = tmp_path / f"good{ending}"
    Image.fromarray(RNG.integers(0, 256, size=(60, 70), dtype=np.uint8)).save(good)
    cut = tmp_path / f"cut{ending}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(str(cut)) + ": cannot be read, the file is corrupt or truncated"):
        read_image(cut)
    empty = tmp_path / f"empty{ending}"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(str(empty)) + r": is empty \(0 bytes\); re-export"):
        read_image(empty)
    text = tmp_path / f"text{ending}"
    text.write_text("hello")
    with pytest.raises(DataError, match=re.escape(str(text)) + ": is not an image Pillow can read"):
        read_image(text)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / f"none{ending}")) + ": file not found"):
        read_image(tmp_path / f"none{ending}")


def test_multipage_tiff_is_refused(tmp_path: Path) -> None:
    pages = [Image.fromarray(PICTURE), Image.fromarray(255 - PICTURE)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "pages.tif")) + ": has 2 frames/pages"):
        read_image(tmp_path / "pages.tif")


# ------------------------------------------------------------------------------------------------- PNG label maps


def test_png_mask_round_trip_on_the_pictures_grid(tmp_path: Path) -> None:
    assert ".png" in READ_EXTENSIONS and ".png" in WRITE_EXTENSIONS and ".jpeg" in READ_EXTENSIONS
    Image.fromarray(PICTURE).save(tmp_path / "cxr.png")
    image = read_image(tmp_path / "cxr.png")
    mask = (image.array > 100).astype(np.int64)  # int64 like a prediction
    write_image(Volume(mask, image.affine), tmp_path / "cxr_mask.png")
    back = read_image(tmp_path / "cxr_mask.png")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask)
    check_same_grid({"xray": image, "label": back}, case_id="cxr")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cxr_mask.png")), PICTURE > 100)  # on the picture
    wide = mask * 300
    write_image(Volume(wide, image.affine), tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    np.testing.assert_array_equal(read_image(tmp_path / "wide.png").array, wide)
    info = DatasetInfo(name="cxr", modalities=("xray",), labels=(0, 1), regions={"lung": (1,)})
    case = read_case(CaseRecord("cxr", {"xray": tmp_path / "cxr.png"}, label=tmp_path / "cxr_mask.png"), info)
    assert case.images["xray"].array.dtype == np.float32 and case.label is not None
    np.testing.assert_array_equal(case.label.array, mask)


@pytest.mark.parametrize(("array", "problem"), [
    (np.zeros((5, 6, 7), np.uint8), "2D integer label maps; got a 3D"),
    (np.full((5, 6), 0.5, np.float32), "2D integer label maps; got a 2D float32"),
    (np.full((5, 6), 70000, np.int64), "values 70000..70000 do not fit a PNG"),
    (np.full((5, 6), -1, np.int64), "values -1..-1 do not fit a PNG"),
])
def test_png_refuses_what_it_cannot_hold(tmp_path: Path, array: np.ndarray, problem: str) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'm.png'}: PNG holds") if "PNG holds" in problem
                       else re.escape(str(tmp_path / "m.png"))):
        write_image(Volume(array), tmp_path / "m.png")
    with pytest.raises(DataError, match=re.escape(problem)):
        write_image(Volume(array), tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- real chest X-rays


def _real_jpegs() -> list[Path]:
    spec = importlib.util.find_spec("pneumonia_model_package")  # finds the folder, never imports it
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "pneumonia-data" / "val"
    return sorted(folder.glob("*.jpeg"))


def test_real_chest_xray_jpegs() -> None:
    files = _real_jpegs()
    if not files:
        pytest.skip("pneumonia-model-package's chest X-ray JPEGs are not installed (make install adds them)")
    for path in files[:2] + files[-2:]:
        vol = read_image(path)
        with Image.open(path) as image:
            assert vol.shape == image.size  # PIL's (width, height) = (X, Y)
            np.testing.assert_array_equal(vol.array.T, np.asarray(image.convert("L")))
        assert vol.array.dtype == np.uint8 and vol.spacing_source is None
        assert vol.array.max() >= 200 and vol.array.min() <= 30 and 30 < vol.array.mean() < 220
