"""Image and case I/O: round trips keep arrays and affines; bad files give errors that name them."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medmodal.data.case import CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.io import (
    check_same_grid,
    inspect_case,
    read_case,
    read_image,
    write_image,
)

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("shape", [(7, 9, 11), (17, 18)], ids=["3d", "2d"])
def test_round_trip_keeps_array_and_affine(tmp_path: Path, io_oblique_affine, ext: str, shape) -> None:
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = write_image(Volume(array, io_oblique_affine), tmp_path / "sub" / f"img{ext}")
    back = read_image(path)
    assert back.shape == shape and back.array.dtype == np.float32 and back.path == path
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, io_oblique_affine, atol=1e-5)
    np.testing.assert_allclose(back.spacing, (0.8, 1.2, 3.0)[: len(shape)], rtol=1e-6)
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_integer_labels_keep_their_dtype(tmp_path: Path) -> None:
    label = np.zeros((7, 9, 11), dtype=np.int64)
    label[2:4, 3:5, 1:6] = 4
    back = read_image(write_image(Volume(label), tmp_path / "seg.nii.gz"))
    assert back.array.dtype.kind in "iu"  # int64 is narrowed on write, never turned into float
    np.testing.assert_array_equal(back.array, label)


def test_sitk_image_uses_nibabel_axes_and_ras(tmp_path: Path) -> None:
    """A SimpleITK (LPS, numpy z-y-x) image reads as (x, y, z) with the LPS→RAS flip."""
    zyx = np.arange(5 * 9 * 7, dtype=np.float32).reshape(5, 9, 7)
    image = sitk.GetImageFromArray(zyx)
    image.SetSpacing((0.5, 0.7, 2.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    vol = read_image(tmp_path / "a.mha")
    np.testing.assert_array_equal(vol.array, zyx.transpose(2, 1, 0))
    np.testing.assert_allclose(np.diag(vol.affine), [-0.5, -0.7, 2.0, 1.0])
    np.testing.assert_allclose(vol.affine[:3, 3], [-10.0, -20.0, 30.0])


def _write_dicom_series(folder: Path, zyx: np.ndarray, series: str = "1.2.826.0.1.3680043.2.1125.77") -> None:
    image = sitk.GetImageFromArray(zyx)
    image.SetSpacing((0.5, 0.7, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir(parents=True, exist_ok=True)
    for z in range(zyx.shape[0]):
        piece = image[:, :, z]
        origin = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": "MR", "0020|000d": f"{series}.1", "0020|000e": f"{series}.2",
            "0008|0018": f"{series}.3.{z}", "0020|0013": str(z + 1), "0018|0050": "2.0",
            "0020|0032": "\\".join(f"{c:g}" for c in origin), "0020|0037": "1\\0\\0\\0\\1\\0",
        }
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series[-2:]}_{z:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_folder(tmp_path: Path) -> None:
    zyx = np.arange(5 * 9 * 7, dtype=np.int16).reshape(5, 9, 7)
    _write_dicom_series(tmp_path / "dcm", zyx)
    vol = read_image(tmp_path / "dcm")
    assert vol.shape == (7, 9, 5)
    np.testing.assert_array_equal(vol.array, zyx.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.spacing, (0.5, 0.7, 2.0), rtol=1e-4)


def test_dicom_folder_with_two_series_is_an_error(tmp_path: Path) -> None:
    zyx = np.zeros((3, 9, 7), dtype=np.int16)
    _write_dicom_series(tmp_path / "dcm", zyx, series="1.2.826.0.1.3680043.2.1125.41")
    _write_dicom_series(tmp_path / "dcm", zyx, series="1.2.826.0.1.3680043.2.1125.42")
    with pytest.raises(DataError, match=r"2 DICOM series.*own folder"):
        read_image(tmp_path / "dcm")


def test_truncated_nifti_names_the_file(tmp_path: Path) -> None:
    path = write_image(Volume(np.random.default_rng(0).random((17, 18, 19)).astype(np.float32)), tmp_path / "t.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.nii\.gz.*(corrupt|truncated)"):
        read_image(path)


@pytest.mark.parametrize("content", [b"not an image at all", gzip.compress(b"\0" * 40)])
def test_garbage_files_are_data_errors(tmp_path: Path, content: bytes) -> None:
    for name in ("bad.nii.gz", "bad.mha"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.nii\.gz: file not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"x\.gif: unsupported file type"):
        read_image(tmp_path / "x.gif")
    with pytest.raises(DataError, match="cannot write"):
        write_image(Volume(np.zeros((3, 3))), tmp_path / "x.gif")


def test_nan_and_inf_voxels(tmp_path: Path) -> None:
    array = np.ones((7, 9, 11), dtype=np.float32)
    array[1, 2, 3], array[0, 0, 0] = np.nan, np.inf
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(DataError, match=r"nan\.nii\.gz: contains 1 NaN and 1 infinite"):
        read_image(tmp_path / "nan.nii.gz")


def test_4d_and_one_slice_images(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((7, 9, 11, 2), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(DataError, match=r"4d\.nii\.gz: is a 4D image"):
        read_image(tmp_path / "4d.nii.gz")
    affine = np.diag([2.0, 3.0, 5.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((7, 9, 1), np.float32), affine), tmp_path / "slice.nii.gz")
    vol = read_image(tmp_path / "slice.nii.gz")
    assert vol.shape == (7, 9)
    np.testing.assert_allclose(vol.affine, affine)


def test_vector_image_is_an_error(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([7, 9], sitk.sitkVectorFloat32, 3), str(tmp_path / "rgb.mha"))
    with pytest.raises(DataError, match=r"rgb\.mha: has 3 components"):
        read_image(tmp_path / "rgb.mha")


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(DataError, match="could not be written"):
        write_image(Volume(np.zeros((3, 4, 5))), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_check_same_grid(io_oblique_affine) -> None:
    a = Volume(np.zeros((7, 9, 11)), io_oblique_affine, Path("a_t1.nii.gz"))
    check_same_grid({"t1": a, "t2": Volume(np.zeros((7, 9, 11)), io_oblique_affine + 1e-6)}, case_id="c")
    shifted = io_oblique_affine.copy()
    shifted[0, 3] += 2.0
    cases = {
        r"shape \(7, 9, 11\) vs \(7, 9, 12\)": Volume(np.zeros((7, 9, 12)), io_oblique_affine, Path("b.nii.gz")),
        r"origin": Volume(np.zeros((7, 9, 11)), shifted, Path("b.nii.gz")),
        r"spacing": Volume(np.zeros((7, 9, 11)), io_oblique_affine @ np.diag([1, 1, 2, 1]), Path("b.nii.gz")),
        r"orientation": Volume(np.zeros((7, 9, 11)), io_oblique_affine[[1, 0, 2, 3]], Path("b.nii.gz")),
    }
    for what, b in cases.items():
        with pytest.raises(DataError, match=rf"case 'c': t2 \(b\.nii\.gz\) and t1 \(a_t1\.nii\.gz\).*{what}.*Resample"):
            check_same_grid({"t1": a, "t2": b}, case_id="c")


def _write_case(tmp_path: Path, case, names=None) -> CaseRecord:
    images = {m: write_image(v, tmp_path / f"{case.case_id}_{m}.nii.gz") for m, v in case.images.items()}
    label = write_image(case.label, tmp_path / f"{case.case_id}_seg.nii.gz") if case.label is not None else None
    return CaseRecord(case.case_id, images, label=label)


def test_read_case(tmp_path: Path, io_make_case, io_brats_info, io_assert_same_case) -> None:
    case = io_make_case("c1", missing=("t2",))
    got = read_case(_write_case(tmp_path, case), io_brats_info)
    io_assert_same_case(case, got)
    assert list(got.images) == ["t1", "t1c", "flair"]  # the dataset's modality order
    assert got.images["t1"].array.dtype == np.float32 and got.label.array.dtype == np.uint8


def test_read_case_float_label_with_integral_values(tmp_path: Path, io_make_case, io_brats_info) -> None:
    case = io_make_case("c1")
    case.label = Volume(case.label.array.astype(np.float32), case.label.affine)
    got = read_case(_write_case(tmp_path, case), io_brats_info)
    assert got.label.array.dtype.kind in "iu"
    case.label = Volume(case.label.array + 0.5, case.label.affine)
    with pytest.raises(DataError, match=r"c1_seg\.nii\.gz has non-integer values"):
        read_case(_write_case(tmp_path, case), io_brats_info)


def test_read_case_errors(tmp_path: Path, io_make_case, io_brats_info) -> None:
    case = io_make_case("c1")
    case.label.array[0, 0, :2] = [3, 7]
    record = _write_case(tmp_path, case)
    with pytest.raises(DataError, match=r"c1_seg\.nii\.gz has value\(s\) \[3, 7\].*\[0, 1, 2, 4\]"):
        read_case(record, io_brats_info)
    with pytest.raises(DataError, match="all modalities missing"):
        read_case(CaseRecord("c1", {}, label=record.label), io_brats_info)
    with pytest.raises(DataError, match=r"unknown modality name\(s\) \['pet'\]"):
        read_case(CaseRecord("c1", {"pet": record.images["t1"]}), io_brats_info)
    other = write_image(Volume(np.zeros((7, 9, 12), np.float32), np.eye(4)), tmp_path / "c1_t2_big.nii.gz")
    with pytest.raises(DataError, match=r"t2 \(.*c1_t2_big\.nii\.gz\) and t1 \(.*c1_t1\.nii\.gz\)"):
        read_case(CaseRecord("c1", {**record.images, "t2": other}), io_brats_info)


def test_inspect_case_collects_every_problem(tmp_path: Path, io_make_case, io_brats_info) -> None:
    record = _write_case(tmp_path, io_make_case("c1"))
    record.images["t1"].write_bytes(b"garbage")
    nib.save(nib.Nifti1Image(np.full((7, 9, 11), np.nan, np.float32), np.eye(4)), record.images["t2"])
    record.images["pet"] = record.images["flair"]
    case, errors = inspect_case(record, io_brats_info)
    assert case is None
    messages = "\n".join(str(e) for _, e in errors)
    assert "'pet'" in messages and "c1_t1.nii.gz: cannot be read" in messages and "NaN" in messages


def test_remapped_labels(tmp_path: Path, io_make_case) -> None:
    case = io_make_case("c1")
    stored = np.searchsorted([0, 1, 2, 4], case.label.array).astype(np.uint8)  # 0, 1, 2, 3
    record = _write_case(tmp_path, case)
    write_image(Volume(stored, case.label.affine), record.label)
    info = DatasetInfo(name="x", modalities=("t1", "t1c", "t2", "flair"), label_map={0: 0, 1: 1, 2: 2, 3: 4})
    np.testing.assert_array_equal(read_case(record, info).label.array, case.label.array)
    with pytest.raises(DataError, match=r"value\(s\) \[3\]"):
        read_case(record, DatasetInfo(name="x", modalities=info.modalities))
