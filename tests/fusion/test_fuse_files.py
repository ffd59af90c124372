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


def save(folder: Path, arrays: np.ndarray | list[np.ndarray], affine: np.ndarray = OBLIQUE, *,
         prefix: str = "rater") -> list[Path]:
    paths = []
    for k, array in enumerate(arrays):
        path = folder / f"{prefix}{k}.nii.gz"
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
    assert img.shape == (23, 21) and result.staple is None
    sidecar = json.loads(result.sidecar.read_text())
    assert result.sidecar.name == "fused.majority.json" and sidecar["ties"] == "smallest tied label"
    assert sidecar["tied_voxels"] == int((masks.sum(0) == 2).sum()) > 0  # 4 raters: 2-2 splits are ties
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
        fuse_label_files(good, method="staple", out=tmp_path / "fused.gif")
    assert not out.exists()


def test_an_intensity_image_is_refused_naming_the_file(tmp_path: Path, raters3) -> None:
    """A uint8 T1-like volume (255 distinct values) is not a label map: refused before any fusion work."""
    t1 = np.random.default_rng(3).permutation(np.arange(17 * 18 * 19) % 255).reshape(17, 18, 19).astype(np.uint8)
    paths = save(tmp_path, [raters3[1][0], t1])
    out = tmp_path / "fused.nii.gz"
    with pytest.raises(DataError, match=r"rater1\.nii\.gz: holds 255 distinct values \(0\.\.254\), more than "
                                        r"--max-labels 250; it looks like an intensity image"):
        fuse_label_files(paths, method="majority", out=out)
    with pytest.raises(DataError, match=r"rater1\.nii\.gz: holds 255 distinct values.*--max-labels 20;"):
        fuse_label_files(paths, method="staple", out=out, max_labels=20)
    assert not out.exists()
    result = fuse_label_files(paths, method="majority", out=out, max_labels=255)  # the user says it is labels
    assert result.multilabel
    a = np.arange(17 * 18 * 19, dtype=np.int16).reshape(17, 18, 19) % 6
    b = a + 1  # 6 values each, 7 together
    with pytest.raises(DataError, match=r"hold 7 distinct values together \(.*a0\.nii\.gz, .*a1\.nii\.gz\)"):
        fuse_label_files(save(tmp_path, [a, b], prefix="a"), method="majority", out=tmp_path / "o.nii.gz", max_labels=6)


def test_undecided_label_in_the_output_and_the_sidecar(tmp_path: Path) -> None:
    labels = np.array([[[0, 1, 1, 2]], [[1, 0, 1, 2]], [[2, 2, 1, 0]]], dtype=np.uint8)[..., None]  # (3, 1, 4, 1)
    labels = np.tile(labels, (1, 5, 1, 3))  # a 5×4×3 grid; each column: 3-way tie, 3-way tie, agreed 1, 2-of-3
    paths = save(tmp_path, labels)
    out = tmp_path / "vote.nii.gz"
    result = fuse_label_files(paths, method="majority", out=out)
    fused = np.asarray(nib.load(out).dataobj)
    assert fused[0, :, 0].tolist() == [0, 0, 1, 2] and result.tied_voxels == 2 * 15
    sidecar = json.loads((tmp_path / "vote.majority.json").read_text())
    assert sidecar["ties"] == "smallest tied label" and sidecar["tied_voxels"] == 30
    result = fuse_label_files(paths, method="majority", out=out, overwrite=True, undecided_label=9)
    assert np.asarray(nib.load(out).dataobj)[0, :, 0].tolist() == [9, 9, 1, 2]
    sidecar = json.loads((tmp_path / "vote.majority.json").read_text())
    assert sidecar["undecided_label"] == 9 and "undecided_label (--undecided-label)" in sidecar["tie_rule"]

    staple_out = tmp_path / "staple.nii.gz"
    result = fuse_label_files(paths, method="staple", out=staple_out)
    default = np.asarray(nib.load(staple_out).dataobj)
    sidecar = json.loads(result.sidecar.read_text())
    undecided = default == 3
    assert sidecar["undecided_label"] == 3 and sidecar["undecided_voxels"] == int(undecided.sum()) > 0
    assert sidecar["undecided_label_is_a_class"] is False and "largest input label + 1" in sidecar["undecided"]
    result = fuse_label_files(paths, method="staple", out=staple_out, overwrite=True, undecided_label=0)
    resolved = np.asarray(nib.load(staple_out).dataobj)
    np.testing.assert_array_equal(resolved, np.where(undecided, 0, default))
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["undecided_label"] == 0 and sidecar["undecided_label_is_a_class"] is True
    binary = save(tmp_path, (labels == 1).astype(np.uint8), prefix="mask")
    with pytest.raises(DataError, match="--undecided-label is used by --method majority and by multi-label STAPLE"):
        fuse_label_files(binary, method="staple", out=tmp_path / "b.nii.gz", undecided_label=0)
