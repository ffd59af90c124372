"""medmodal.atomic: a failed write leaves the old file and no temporary file; CSV round-trips awkward values."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmodal.atomic import atomic_path, atomic_write, atomic_write_text, csv_text, read_csv, write_csv


def test_atomic_write_text_replaces_and_makes_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "note.txt"
    assert atomic_write_text(path, "first ünïcode\n") == path
    assert path.read_bytes() == "first ünïcode\n".encode()
    atomic_write_text(path, "second")
    assert path.read_text(encoding="utf-8") == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["note.txt"]


def test_failed_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.txt"
    atomic_write_text(path, "old results\n")

    def explode(f) -> None:
        f.write(b"half-written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, explode)
    assert path.read_text(encoding="utf-8") == "old results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.txt"]

    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_text("new")
        assert tmp.parent == tmp_path and tmp.suffix == ".txt" and tmp != path
        raise RuntimeError("boom")
    assert path.read_text(encoding="utf-8") == "old results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.txt"]


def test_failed_write_of_a_new_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "x.txt", "\ud800")  # a lone surrogate cannot be encoded as UTF-8
    assert list(tmp_path.iterdir()) == []


def test_csv_round_trip(tmp_path: Path) -> None:
    rows = [["a,b", 'say "hi"', "two\nlines"], ["plain", "", "3"]]
    assert csv_text(["x", "y", "z"], rows).splitlines()[0] == "x,y,z"
    path = write_csv(tmp_path / "t.csv", ["x", "y", "z"], rows)
    assert read_csv(path) == [{"x": "a,b", "y": 'say "hi"', "z": "two\nlines"}, {"x": "plain", "y": "", "z": "3"}]
