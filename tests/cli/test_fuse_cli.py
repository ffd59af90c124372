"""``medmodal fuse``: summaries on success, exit code 2 with a message naming the file/option on user errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medmodal.cli import app

runner = CliRunner()
AFFINE = np.array([[0.0, -0.9, 0.0, 10.0], [1.2, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 1.0]])


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, re.sub(r"\s+", " ", result.output)


@pytest.fixture
def labels(tmp_path: Path) -> list[Path]:
    truth = np.zeros((17, 18, 19), np.uint8)
    truth[4:12, 5:14, 3:15] = 1
    paths = []
    for k, shift in enumerate((0, 1, -1)):
        path = tmp_path / f"atlas{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.roll(truth, shift, axis=k), AFFINE), path)
        paths.append(path)
    return paths


def test_staple_prints_a_summary_and_writes_on_the_input_grid(tmp_path: Path, labels: list[Path]) -> None:
    out = tmp_path / "fused.nii.gz"
    code, text = invoke("fuse", *labels, "--method", "staple", "--out", out, "--probability", tmp_path / "p.nii.gz",
                        "--max-iter", 1000)
    assert code == 0, text
    assert "3 binary label(s) by staple" in text and "iteration(s), converged" in text
    assert re.search(r"1 atlas0\.nii\.gz \d\.\d{4} \d\.\d{4}", text), text  # the per-rater table
    np.testing.assert_allclose(nib.load(out).affine, AFFINE, atol=1e-5)
    assert json.loads((tmp_path / "fused.staple.json").read_text())["converged"] is True
    code, text = invoke("fuse", *labels, "--method", "majority", "--out", out)
    assert code == 2 and "fused.nii.gz: exists already; pass --overwrite" in text
    code, text = invoke("fuse", *labels, "--method", "majority", "--out", out, "--overwrite")
    assert code == 0 and "by majority" in text
    code, text = invoke("fuse", *labels, "--method", "staple", "--out", out, "--overwrite", "--max-iter", 3)
    assert code == 0 and "3 iteration(s), not converged (raise --max-iter)" in text


def test_multilabel_staple_summary(tmp_path: Path, labels: list[Path]) -> None:
    code, text = invoke("fuse", *labels, "--method", "staple", "--multilabel", "--out", tmp_path / "m.nii.gz")
    assert code == 0, text
    assert "multi-label STAPLE" in text and "P(1|1)" in text and "undecided voxel(s)" in text


def test_user_errors_exit_2_naming_the_file_or_option(tmp_path: Path, labels: list[Path]) -> None:
    out = tmp_path / "fused.nii.gz"
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((17, 18, 5), np.uint8), AFFINE), small)
    two = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.full((17, 18, 19), 2, np.uint8), AFFINE), two)
    cases = [
        ((labels[0], small, "--method", "staple"), "small.nii.gz"),
        ((labels[0], tmp_path / "nope.nii.gz", "--method", "staple"), "nope.nii.gz: file not found"),
        ((labels[0], "--method", "staple"), "at least 2 label files"),
        ((labels[0], two, "--method", "staple", "--binary"), "two.nii.gz: holds the values 2"),
        ((*labels, "--method", "vote"), "--method: expected one of majority, staple, dp"),
        (("--method", "dp"), "--method dp needs --run"),
        ((*labels, "--method", "dp", "--run", tmp_path), "LABEL arguments are not used with --method dp"),
        ((*labels, "--method", "staple", "--run", tmp_path), "--run is only used with --method dp"),
        (("--method", "staple"), "needs the label files to fuse"),
    ]
    for args, message in cases:
        code, text = invoke("fuse", *args, "--out", out)
        assert code == 2 and message in text, (args, text)
    assert not out.exists()


def test_help_explains_the_undecided_label() -> None:
    code, text = invoke("fuse", "--help")
    assert code == 0
    assert "largest input label + 1" in text and "--undecided-label" in text and "--max-labels" in text


def test_undecided_label_and_max_labels_options(tmp_path: Path, labels: list[Path]) -> None:
    maps = []
    for k, path in enumerate(labels):  # 3 maps whose disagreements are 3-way ties where the shifts overlap
        array = np.asarray(nib.load(path).dataobj) * (k + 1)
        maps.append(tmp_path / f"map{k}.nii.gz")
        nib.save(nib.Nifti1Image(array.astype(np.uint8), AFFINE), maps[-1])
    out = tmp_path / "vote.nii.gz"
    code, text = invoke("fuse", *maps, "--method", "majority", "--out", out, "--undecided-label", 7)
    assert code == 0, text
    fused = np.asarray(nib.load(out).dataobj)
    sidecar = json.loads((tmp_path / "vote.majority.json").read_text())
    assert int((fused == 7).sum()) == sidecar["tied_voxels"] > 0
    assert f"{sidecar['tied_voxels']} tied voxel(s), given label 7" in text
    code, text = invoke("fuse", *maps, "--method", "staple", "--out", tmp_path / "s.nii.gz")
    assert code == 0 and "(label 4: not a class, see the sidecar)" in text, text
    code, text = invoke("fuse", *maps, "--method", "staple", "--out", tmp_path / "s0.nii.gz", "--undecided-label", 0)
    assert code == 0 and "(label 0: a class)" in text, text
    image = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image((np.arange(17 * 18 * 19) % 255).reshape(17, 18, 19).astype(np.uint8), AFFINE), image)
    code, text = invoke("fuse", maps[0], image, "--method", "staple", "--out", tmp_path / "x.nii.gz")
    assert code == 2 and "t1.nii.gz: holds 255 distinct values (0..254), more than --max-labels 250" in text
    code, text = invoke("fuse", *maps, "--method", "staple", "--binary", "--undecided-label", 0,
                        "--out", tmp_path / "y.nii.gz")
    assert code == 2 and "holds the values 0, 2" in text, text
