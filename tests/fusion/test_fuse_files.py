"""``fuse_label_files``: reading, validation, outputs on the inputs' grid, the STAPLE sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmodal.data.case import DataError
from medmodal.fusion import majority_vote, staple
from medmodal.fusion.files import fuse_label_files, staple_sidecar_path

#: Anisotropic (0.8 × 1.1 × 2.5 mm) and oblique (rotated about two axes).
OBLIQUE = np.array([
    [0.8 * np.cos(0.3), -1.1 * np.sin(0.3), 0.0, -40.0],
    [0.8 * np.sin(0.3) * np.cos(0.2), 1.1 * np.cos(0.3) * np.cos(0.2), -2.5 * np.sin(0.2), 12.5],
    [0.8 * np.sin(0.3) * np.sin(0.2), 1.1 * np.cos(0.3) * np.sin(0.2), 2.5 * np.cos(0.2), 7.0],
    [0.0, 0.0, 0.0, 1.0],
])


def save(folder: Path, arrays: np.ndarray | list[np.ndarray], affine: np.ndarray = OBLIQUE) -> list[Path]:
    paths = []
    for k, array in enumerate(arrays):
        path = folder / f"rater{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
        paths.append(path)
    return paths


def test_staple_writes_label_probability_and_sidecar_on_the_input_grid(tmp_path: Path, raters3) -> None:
    _, masks = raters3
    paths = save(tmp_path, masks)
    out, prob = tmp_path / "out" / "fused.nii.gz", tmp_path / "out" / "prob.nii.gz"
    result = fuse_label_files(paths, method="staple", out=out, probability_out=prob)
    expected = staple(masks)
    img, pimg = nib.load(out), nib.load(prob)
    np.testing.assert_allclose(img.affine, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(pimg.affine, OBLIQUE, atol=1e-5)
    assert img.get_data_dtype() == np.uint8 and pimg.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected.fused.numpy())
    np.testing.assert_allclose(np.asarray(pimg.dataobj), expected.probability.numpy(), atol=1e-6)
    assert not result.multilabel and result.foreground_voxels == int(expected.fused.sum())
    sidecar = json.loads((tmp_path / "out" / "fused.staple.json").read_text())
    assert result.sidecar == staple_sidecar_path(out) == tmp_path / "out" / "fused.staple.json"
    assert [r["file"] for r in sidecar["raters"]] == [str(p) for p in paths]
    assert sidecar["raters"][0]["sensitivity"] == pytest.approx(float(expected.sensitivity[0]))
    assert sidecar["raters"][2]["specificity"] == pytest.approx(float(expected.specificity[2]))
    assert sidecar["iterations"] == expected.iterations and sidecar["converged"] is True
    assert sidecar["prior"] == pytest.approx(expected.prior)


def test_majority_on_2d_labels(tmp_path: Path) -> None:
    masks = np.random.default_rng(0).random((4, 23, 21)) < 0.5
    affine = np.diag([0.7, 1.3, 5.0, 1.0])
    paths = save(tmp_path, masks.astype(np.int16), affine)
    result = fuse_label_files(paths, method="majority", out=tmp_path / "fused.nii.gz")
    img = nib.load(result.out)
    assert img.shape == (23, 21) and result.sidecar is None and result.staple is None
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), majority_vote(torch.from_numpy(masks)).numpy())


def test_multilabel_is_detected_and_fused_with_multilabel_staple(tmp_path: Path) -> None:
    truth = (np.indices((11, 12, 13)).sum(0) // 4 % 3).astype(np.float32)  # float labels with integer values
    rng = np.random.default_rng(1)
    raters = [np.where(rng.random(truth.shape) < 0.1, (truth + 1) % 3, truth) for _ in range(3)]
    paths = save(tmp_path, raters)
    result = fuse_label_files(paths, method="staple", out=tmp_path / "fused.nii.gz",
                              probability_out=tmp_path / "p.nii.gz")
    assert result.multilabel
    fused = np.asarray(nib.load(result.out).dataobj)
    assert (fused == truth).mean() > 0.99
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["labels"] == [0, 1, 2] and np.array(sidecar["raters"][1]["confusion"]).shape == (3, 3)
    with pytest.raises(DataError, match=r"rater0\.nii\.gz: holds the values 0, 1, 2.*--multilabel"):
        fuse_label_files(paths, method="staple", out=tmp_path / "b.nii.gz", multilabel=False)


def test_output_is_not_overwritten_without_overwrite(tmp_path: Path, raters3) -> None:
    paths = save(tmp_path, raters3[1])
    out = tmp_path / "fused.nii.gz"
    fuse_label_files(paths, method="majority", out=out)
    before = out.stat().st_mtime_ns
    with pytest.raises(DataError, match="fused.nii.gz: exists already; pass --overwrite"):
        fuse_label_files(paths, method="staple", out=out)
    assert out.stat().st_mtime_ns == before
    fuse_label_files(paths, method="staple", out=out, overwrite=True)
    assert (tmp_path / "fused.staple.json").exists()


def test_bad_inputs_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    masks = (np.random.default_rng(2).random((2, 7, 8, 9)) < 0.5).astype(np.uint8)
    good = save(tmp_path, masks)
    out = tmp_path / "fused.nii.gz"
    other = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(masks[0, :6], OBLIQUE), other)
    with pytest.raises(DataError, match=r"small\.nii\.gz.*rater0\.nii\.gz.*shape \(7, 8, 9\) vs \(6, 8, 9\)"):
        fuse_label_files([good[0], other], method="staple", out=out)
    moved = tmp_path / "moved.nii.gz"
    nib.save(nib.Nifti1Image(masks[1], OBLIQUE @ np.diag([1.0, 1.0, 2.0, 1.0])), moved)
    with pytest.raises(DataError, match=r"moved\.nii\.gz.*not on the same grid.*spacing"):
        fuse_label_files([good[0], moved], method="majority", out=out)
    with pytest.raises(DataError, match="at least 2 label files, got 1"):
        fuse_label_files(good[:1], method="staple", out=out)
    with pytest.raises(DataError, match=r"missing\.nii\.gz: file not found"):
        fuse_label_files([good[0], tmp_path / "missing.nii.gz"], method="staple", out=out)
    nan = masks[1].astype(np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, OBLIQUE), tmp_path / "nan.nii.gz")
    with pytest.raises(DataError, match=r"nan\.nii\.gz: contains 1 NaN"):
        fuse_label_files([good[0], tmp_path / "nan.nii.gz"], method="staple", out=out)
    soft = masks[1] * np.float32(0.6)
    nib.save(nib.Nifti1Image(soft, OBLIQUE), tmp_path / "soft.nii.gz")
    with pytest.raises(DataError, match=r"soft\.nii\.gz: has non-integer values \(e\.g\. 0\.6\)"):
        fuse_label_files([good[0], tmp_path / "soft.nii.gz"], method="staple", out=out)
    with pytest.raises(DataError, match="needs --method staple"):
        fuse_label_files(good, method="majority", out=out, probability_out=tmp_path / "p.nii.gz")
    with pytest.raises(DataError, match="must end in one of"):
        fuse_label_files(good, method="staple", out=tmp_path / "fused.png")
    assert not out.exists()
