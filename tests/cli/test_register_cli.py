"""``medmodal register`` end to end on a tiny phantom, and its exit code 2 on user errors."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.data.phantom import write_phantom

runner = CliRunner()


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, re.sub(r"\s+", " ", result.output)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("register_cli")
    return write_phantom(root / "atlases", cases=2, seed=1, size=24), write_phantom(root / "targets", cases=1,
                                                                                  seed=2, size=24)


def test_register_writes_labels_and_a_summary_then_refuses_to_overwrite(data, tmp_path) -> None:
    atlases, targets = data
    out = tmp_path / "out"
    args = ("register", "--atlases", atlases, "--targets", targets, "--out", out, "--atlas-modality", "t1c",
            "--target-modality", "t2", "--transform", "affine", "--workers", "1")
    code, text = invoke(*args)
    assert code == 0, text
    assert "registered 2 of 2 pair(s)" in text and "median" in text and "mean Dice" in text
    with (out / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["target"], r["atlas"], r["status"]) for r in rows] == [("phantom_000", "phantom_000", "ok"),
                                                                     ("phantom_000", "phantom_001", "ok")]
    assert all((out / r["label"]).is_file() for r in rows)

    code, text = invoke(*args)
    assert code == 2 and "not empty" in text and "--overwrite" in text
    code, text = invoke(*args, "--overwrite")
    assert code == 0, text


def test_a_failed_pair_is_reported_and_not_fatal(data, tmp_path) -> None:
    atlases, targets = data
    broken = tmp_path / "atlases"
    broken.mkdir()
    for case in atlases.iterdir():
        if case.is_dir():
            (broken / case.name).mkdir()
            for file in case.iterdir():
                (broken / case.name / file.name).write_bytes(file.read_bytes())
    (broken / "phantom_001" / "phantom_001_t1.nii.gz").write_bytes(b"corrupt")
    code, text = invoke("register", "--atlases", broken, "--targets", targets, "--out", tmp_path / "out",
                        "--transform", "affine", "--workers", "1")
    assert code == 3, text  # issue 11, item 13: a failed pair is not a success; the pairs that worked are kept
    assert "registered 1 of 2 pair(s)" in text and "1 of 2 pairs failed" in text and "phantom_001_t1" in text
    assert "--allow-failures" in text and (tmp_path / "out" / "manifest.csv").is_file()
    code, text = invoke("register", "--atlases", broken, "--targets", targets, "--out", tmp_path / "out2",
                        "--transform", "affine", "--workers", "1", "--allow-failures")
    assert code == 0, text
    assert "1 of 2 pairs failed" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--transform", "rigid"), "--transform: expected one of affine, bspline, demons"),
        (("--atlas-modality", "pet"), "--atlas-modality 'pet'"),
    ],
)
def test_user_errors_exit_2(data, tmp_path, extra: tuple[str, ...], message: str) -> None:
    atlases, targets = data
    code, text = invoke("register", "--atlases", atlases, "--targets", targets, "--out", tmp_path / "out", *extra)
    assert code == 2 and message in text, text
    assert not (tmp_path / "out").exists()


def test_missing_folder_and_help(tmp_path) -> None:
    code, text = invoke("register", "--atlases", tmp_path / "nowhere", "--targets", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "atlas data set" in text and "nowhere" in text
    code, text = invoke("register", "--help")
    assert code == 0 and "--atlases" in text and "--transform" in text
