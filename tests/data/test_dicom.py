"""DICOM series geometry: gaps, uneven spacing, mixed orientations and several series are errors naming the series
and the slices; ``dicom_resample=True`` puts an uneven series on a regular grid with the same physical extent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medmodal.data.case import CaseRecord, DataError, DatasetInfo
from medmodal.data.io import DicomGeometryWarning, inspect_case, read_case, read_image

UID = "1.2.826.0.1.3680043.2.1125.7"
TILT = 0.3  # radians about the x axis: an oblique stack, so "z" is along the slice normal, not the scanner's z
ORIGIN = np.array([5.0, -3.0, 2.0])  # LPS position of the slice at z = 0


def direction(tilt: float = TILT) -> np.ndarray:
    """``(3, 3)`` LPS direction, columns: row, column and slice normal."""
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(tilt), -np.sin(tilt)], [0.0, np.sin(tilt), np.cos(tilt)]])


def at(z: float) -> str:
    """How the error messages print the slice at ``z``: its patient position projected on the slice normal."""
    return f"z = {z + ORIGIN @ direction()[:, 2]:.2f} mm"


def intensity(z: float) -> int:
    """Every voxel of the slice at ``z`` mm along the normal holds ``10 + 10 z`` (linear in z)."""
    return 10 + round(10 * z)


def write_series(folder: Path, zs: list[float], *, uid: str = UID, tilts: list[float] | None = None,
                 sideways: list[float] | None = None, shape: tuple[int, int] = (9, 7)) -> list[Path]:
    """One ``.dcm`` file per slice at ``zs`` mm along the normal (SimpleITK writes position/orientation tags)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for i, z in enumerate(zs):
        d = direction(TILT if tilts is None else tilts[i])
        image = sitk.GetImageFromArray(np.full((1, *shape), intensity(z), dtype=np.int16))
        image.SetSpacing((0.5, 0.7, 1.0))
        image.SetDirection(d.ravel().tolist())
        shift = 0.0 if sideways is None else sideways[i]
        image.SetOrigin((ORIGIN + z * direction()[:, 2] + shift * d[:, 0]).tolist())
        tags = {"0008|0060": "MR", "0020|000d": f"{uid}.1", "0020|000e": uid, "0008|0018": f"{uid}.3.{i}",
                "0020|0013": str(i + 1)}
        for key, value in tags.items():
            image.SetMetaData(key, value)
        path = folder / f"{uid[-1]}_{i:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image)
        paths.append(path)
    return paths


def test_intact_oblique_series_reads_with_its_geometry(tmp_path: Path) -> None:
    zs = [2.0 * i for i in range(7)]
    write_series(tmp_path / "dcm", zs[::-1])  # file order does not matter: slices are sorted along the normal
    vol = read_image(tmp_path / "dcm")
    assert vol.shape == (7, 9, 7)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.7, 2.0), rtol=1e-5)
    np.testing.assert_array_equal(vol.array[3, 4, :], [intensity(z) for z in zs])
    ras_normal = np.diag([-1.0, -1.0, 1.0]) @ direction()[:, 2]
    np.testing.assert_allclose(vol.affine[:3, 2] / 2.0, ras_normal, atol=1e-5)


def test_a_missing_slice_is_an_error_naming_the_series_and_the_gap(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "dcm", [2.0 * i for i in range(9)])
    paths[5].unlink()  # z = 10 mm
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "dcm")
    text = str(err.value)
    assert f"dcm: DICOM series {UID} has uneven slice spacing" in text
    assert "expected 2 mm between slices" in text
    assert f"4 mm between slices 5 and 6 of 8 (7_004.dcm at {at(8)}, 7_006.dcm at {at(12)}), 1 slice(s) missing" in text
    assert "dicom_resample=True" in text


def test_uneven_spacing_is_an_error_within_a_stated_tolerance(tmp_path: Path) -> None:
    write_series(tmp_path / "uneven", [0.0, 2.0, 4.0, 7.0, 9.0, 11.0])
    gap = rf"3 mm between slices 3 and 4 of 6 \(7_002\.dcm at {at(4)}, 7_003\.dcm at {at(7)}\)"
    with pytest.raises(DataError, match=gap):
        read_image(tmp_path / "uneven")
    # 0.5 % off the median (inside the 1 % tolerance) reads as one 2 mm grid
    vol = read_image(write_series(tmp_path / "close", [0.0, 2.0, 4.0, 6.01, 8.0, 10.0])[0].parent)
    assert vol.shape == (7, 9, 6)


def test_two_series_in_one_folder_lists_both_uids(tmp_path: Path) -> None:
    write_series(tmp_path / "dcm", [0.0, 2.0, 4.0], uid=UID + "1")
    write_series(tmp_path / "dcm", [0.0, 2.0], uid=UID + "2")
    with pytest.raises(DataError, match=rf"2 DICOM series \(SeriesInstanceUID {UID}1 \(3 files\), {UID}2 \(2 files\)\)"
                                        r".*own folder"):
        read_image(tmp_path / "dcm")


def test_mixed_orientations_duplicates_and_drift_are_errors(tmp_path: Path) -> None:
    write_series(tmp_path / "mixed", [0.0, 2.0, 4.0, 6.0], tilts=[TILT, TILT, TILT + 0.2, TILT])
    with pytest.raises(DataError, match=rf"DICOM series {UID}: mixes slice orientations.*1 of 4 slice\(s\) differ"):
        read_image(tmp_path / "mixed")
    write_series(tmp_path / "twice", [0.0, 2.0, 2.0, 4.0])
    with pytest.raises(DataError, match=r"7_001\.dcm and 7_002\.dcm are at the same position \(z = 4\.797 mm"):
        read_image(tmp_path / "twice")
    write_series(tmp_path / "tilted", [0.0, 2.0, 4.0, 6.0], sideways=[0.0, 0.3, 0.6, 0.9])
    with pytest.raises(DataError, match=r"7_003\.dcm is shifted 0\.9 mm sideways.*tilted gantry"):
        read_image(tmp_path / "tilted")
    with pytest.raises(DataError, match="mixes slice orientations"):  # resampling does not cover these
        read_image(tmp_path / "mixed", dicom_resample=True)


def test_resample_fills_a_gap_on_a_regular_grid_with_the_same_extent(tmp_path: Path) -> None:
    intact = read_image(write_series(tmp_path / "intact", [2.0 * i for i in range(9)])[0].parent)
    paths = write_series(tmp_path / "gap", [2.0 * i for i in range(9)])
    paths[5].unlink()
    with pytest.warns(DicomGeometryWarning, match=rf"{UID} has uneven.*resampled onto 9 evenly spaced slices of 2 mm"):
        vol = read_image(tmp_path / "gap", dicom_resample=True)
    assert vol.shape == intact.shape and vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.affine, intact.affine, atol=1e-4)
    np.testing.assert_allclose(vol.array, intact.array, atol=1e-4)  # linear in z: interpolation is exact


def test_resample_keeps_the_first_and_last_slice_positions(tmp_path: Path) -> None:
    zs = [0.0, 2.0, 4.0, 7.0, 9.0]  # extent 9 mm, median gap 2 mm → 4 steps of 2.25 mm
    write_series(tmp_path / "dcm", zs)
    with pytest.warns(DicomGeometryWarning, match="5 evenly spaced slices of 2.25 mm"):
        vol = read_image(tmp_path / "dcm", dicom_resample=True)
    assert vol.shape == (7, 9, 5)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.7, 2.25), rtol=1e-6)
    first = read_image(tmp_path / "dcm" / "7_000.dcm")
    last = read_image(tmp_path / "dcm" / "7_004.dcm")
    np.testing.assert_allclose(vol.affine[:3, 3], first.affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(vol.affine @ [0, 0, 4, 1], last.affine[:, 3], atol=1e-4)
    np.testing.assert_allclose(vol.array[2, 3, :], [10 + 10 * z for z in np.linspace(0.0, 9.0, 5)], atol=1e-3)


def test_read_case_passes_the_option_and_inspect_case_reports_the_gap(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "t1", [2.0 * i for i in range(6)])
    paths[2].unlink()
    record = CaseRecord(case_id="c1", images={"t1": tmp_path / "t1"})
    info = DatasetInfo(name="d", modalities=("t1",))
    case, errors = inspect_case(record, info)
    assert case is None and "1 slice(s) missing" in str(errors[0][1]) and errors[0][0] == tmp_path / "t1"
    with pytest.warns(DicomGeometryWarning):
        case = read_case(record, info, dicom_resample=True)
    assert case.images["t1"].shape == (7, 9, 6)
