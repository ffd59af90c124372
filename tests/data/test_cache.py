"""The preprocessed cache: layout, memory maps, reuse ("done once"), rebuilds, atomic writes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmodal.atomic import atomic_write
from medmodal.data.cache import CacheIndex, build_cache
from medmodal.data.case import Case, CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.preprocess import restore_to_input_grid

INFO = DatasetInfo(name="tiny", modalities=("t1", "t1c", "t2", "flair"))


def make_cases(n: int = 3, shape: tuple[int, ...] = (17, 18, 19), *, offset: float = 0.0) -> list[Case]:
    """``n`` cases: a noisy blob with a labelled core; case 1 lacks t1c and t2, case 2 is unlabelled."""
    cases = []
    for k in range(n):
        rng = np.random.default_rng(k)
        grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
        r = np.sqrt(sum(g**2 for g in grid))
        label = (np.where(r < 0.3, 4, 0) + np.where((r >= 0.3) & (r < 0.5), 2, 0)).astype(np.uint8)
        affine = np.diag([1.0, 1.2, 0.9, 1.0])
        present = ("t1", "flair") if k == 1 else INFO.modalities
        images = {}
        for i, m in enumerate(present):
            img = (40 + 10 * i + offset + 20 * label + rng.normal(0, 3, shape)) * (r < 0.9)
            images[m] = Volume(img.astype(np.float32), affine)
        lab = None if k == 2 else Volume(label, affine)
        cases.append(Case(f"case_{k}", images, label=lab, target=k % 2, report=f"report {k}"))
    return cases


def mtimes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(root.glob("*_img.npy"))}


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_build_layout_and_load(tmp_path: Path) -> None:
    cases = make_cases()
    index = build_cache(cases, INFO, tmp_path, progress=True)
    assert len(index) == 3 and index.info == INFO and index.target_spacing is None
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"cache.json", *(f"case_{k}_img.npy" for k in range(3))} | {
        f"case_{k}_{s}" for k in (0, 1) for s in ("seg.npy", "fg.npz")
    }
    assert CacheIndex.load(tmp_path) == index
    for case, cached in zip(cases, index, strict=True):
        image = cached.image()
        assert isinstance(image, np.memmap) and image.dtype == np.float32
        assert image.shape == (4, *cached.shape)
        assert cached.available.tolist() == case.available(INFO.modalities).tolist()
        assert not image[~cached.available].any()
        assert (cached.target, cached.report) == (case.target, case.report)
        label = cached.label()
        if case.label is None:
            assert label is None and cached.foreground() == {}
            continue
        assert label.dtype == np.uint8 and label.shape == cached.shape
        restored = restore_to_input_grid(np.asarray(label), cached.geometry, order=0)
        np.testing.assert_array_equal(restored, case.label.array)
        fg = cached.foreground()
        assert sorted(fg) == [2, 4]
        for value, coords in fg.items():
            assert coords.shape[1] == 3 and (label[tuple(coords.T)] == value).all()
            assert len(coords) == (label == value).sum()  # fewer than the 10k cap: all of them
    sub = index.subset(["case_2", "case_0"])
    assert [c.case_id for c in sub] == ["case_2", "case_0"] and len(index) == 3
    with pytest.raises(DataError, match="nope"):
        index.subset(["nope"])


def test_built_twice_is_reused_and_parameter_change_rebuilds(tmp_path: Path, caplog) -> None:
    build_cache(make_cases(), INFO, tmp_path)
    first = mtimes(tmp_path)
    build_cache(make_cases(), INFO, tmp_path)
    assert mtimes(tmp_path) == first

    changed = make_cases()
    changed[1] = make_cases(offset=5.0)[1]
    build_cache(changed, INFO, tmp_path)
    again = mtimes(tmp_path)
    assert again["case_1_img.npy"] != first["case_1_img.npy"]
    assert {k: v for k, v in again.items() if k != "case_1_img.npy"} == {
        k: v for k, v in first.items() if k != "case_1_img.npy"
    }

    with caplog.at_level(logging.WARNING, logger="medmodal.data.cache"):
        index = build_cache(changed[:2], INFO, tmp_path, target_spacing=(1.5, 1.5, 1.5))
    assert "rebuilding" in caplog.text and "target_spacing" in caplog.text
    assert index.target_spacing == (1.5, 1.5, 1.5)
    assert all(c.geometry.resampled_shape != c.geometry.canonical_shape for c in index)
    assert not (tmp_path / "case_2_img.npy").exists()  # a case that left the dataset leaves the cache
    assert leftovers(tmp_path) == []


def test_fingerprint_skips_reading_the_source(tmp_path: Path) -> None:
    build_cache(make_cases(2), INFO, tmp_path, fingerprint="tiny-v1")
    first = mtimes(tmp_path)

    def never() -> Iterator[Case]:
        raise AssertionError("the source must not be read when the fingerprint matches")
        yield

    index = build_cache(never(), INFO, tmp_path, fingerprint="tiny-v1")
    assert len(index) == 2 and mtimes(tmp_path) == first
    build_cache((c for c in make_cases(2)), INFO, tmp_path, fingerprint="tiny-v2")  # new source, same arrays
    assert mtimes(tmp_path) == first
    assert json.loads((tmp_path / "cache.json").read_text())["fingerprint"] == "tiny-v2"


def test_records_are_read_lazily_and_tracked_by_mtime(tmp_path: Path) -> None:
    pytest.importorskip("medmodal.data.io")
    src, out = tmp_path / "raw", tmp_path / "cache"
    src.mkdir()
    records = []
    for case in make_cases(2, (21, 23)):
        paths = {}
        for m, vol in case.images.items():
            paths[m] = src / f"{case.case_id}_{m}.nii.gz"
            nib.save(nib.Nifti1Image(vol.array, vol.affine), paths[m])
        seg = src / f"{case.case_id}_seg.nii.gz"
        nib.save(nib.Nifti1Image(case.label.array, case.label.affine), seg)
        records.append(CaseRecord(case.case_id, paths, label=seg, target=case.target))
    index = build_cache(records, INFO, out)
    assert [c.shape for c in index] == [c.label().shape for c in index]
    assert index.cases[1].available.sum() == 2
    first = mtimes(out)
    build_cache(records, INFO, out)
    assert mtimes(out) == first
    t1 = records[0].images["t1"]
    os.utime(t1, ns=(t1.stat().st_atime_ns, t1.stat().st_mtime_ns + 10**9))
    build_cache(records, INFO, out)
    now = mtimes(out)
    assert now["case_0_img.npy"] != first["case_0_img.npy"]
    assert now["case_1_img.npy"] == first["case_1_img.npy"]


def test_worker_processes_give_the_same_cache(tmp_path: Path) -> None:
    serial = build_cache(make_cases(2), INFO, tmp_path / "a")
    parallel = build_cache(make_cases(2), INFO, tmp_path / "b", num_workers=2)
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a.image(), b.image())
        np.testing.assert_array_equal(a.label(), b.label())
        assert a.geometry == b.geometry


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    def explode(f) -> None:
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "x_img.npy", explode)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rebuild_leaves_no_stale_index(tmp_path: Path) -> None:
    build_cache(make_cases(2), INFO, tmp_path)

    def crash() -> Iterator[Case]:
        yield make_cases(1)[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(crash(), INFO, tmp_path, target_spacing=(2.0, 2.0, 2.0))
    assert not (tmp_path / "cache.json").exists() and leftovers(tmp_path) == []
    with pytest.raises(DataError):
        CacheIndex.load(tmp_path)
    assert len(build_cache(make_cases(2), INFO, tmp_path)) == 2


def test_errors_name_the_folder_or_case(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="build_cache"):
        CacheIndex.load(tmp_path)
    (tmp_path / "cache.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cache\.json.*corrupt"):
        CacheIndex.load(tmp_path)
    twins = make_cases(2)
    twins[1].case_id = "case_0"
    with pytest.raises(DataError, match="duplicate"):
        build_cache(twins, INFO, tmp_path / "dup")
    bad = make_cases(1)
    bad[0].case_id = "../escape"
    with pytest.raises(DataError, match="escape"):
        build_cache(bad, INFO, tmp_path / "bad")


def test_2d_cache(tmp_path: Path) -> None:
    index = build_cache(make_cases(2, (21, 23)), INFO, tmp_path, target_spacing=(0.8, 0.8))
    assert all(c.image().ndim == 3 and c.geometry.spatial_dims == 2 for c in index)
    assert all(c.foreground()[4].shape[1] == 2 for c in index)
