"""``register_atlases``: every atlas onto every target, manifest, failures, bad inputs, parallel workers."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from reg_helpers import FAST

from medmodal.data.case import BRATS_MODALITIES, DataError, DatasetInfo
from medmodal.data.io import read_image
from medmodal.data.phantom import write_phantom
from medmodal.registration import MANIFEST_COLUMNS, read_manifest_rows
from medmodal.registration.atlases import choose_modalities, register_atlases

OPTIONS = {k: v for k, v in FAST.items() if k != "threads"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two labelled 24³ atlases (BraTS layout), two labelled targets, and the atlases in the nnU-Net layout."""
    root = tmp_path_factory.mktemp("multi_atlas")
    return {
        "atlases": write_phantom(root / "atlases", cases=2, seed=1, size=24),
        "targets": write_phantom(root / "targets", cases=2, seed=2, size=24),
        "nnunet": write_phantom(root / "nnunet", cases=1, seed=1, size=24, layout="nnunet"),
    }


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_every_pair_is_written_and_a_corrupt_target_only_fails_its_pairs(data, tmp_path) -> None:
    targets = copy(data["targets"], tmp_path / "targets")
    bad = targets / "phantom_001" / "phantom_001_t2.nii.gz"
    bad.write_bytes(b"this is not an image")
    out = tmp_path / "out"
    summary = register_atlases(data["atlases"], targets, out, atlas_modality="t1c", target_modality="t2",
                               workers=1, progress=False, **OPTIONS)

    assert [(p.target, p.atlas, p.status) for p in summary.pairs] == [
        ("phantom_000", "phantom_000", "ok"), ("phantom_000", "phantom_001", "ok"),
        ("phantom_001", "phantom_000", "failed"), ("phantom_001", "phantom_001", "failed"),
    ]
    assert all(bad.name in p.error for p in summary.failed)
    target = read_image(targets / "phantom_000" / "phantom_000_t2.nii.gz")
    for pair in summary.ok:
        assert pair.label == out / "labels" / "phantom_000" / f"{pair.atlas}.nii.gz"
        warped = read_image(pair.label)
        assert warped.shape == target.shape and np.allclose(warped.affine, target.affine)
        assert warped.array.dtype == np.uint8 and set(np.unique(warped.array)) <= {0, 1, 2, 4}
        assert 0.0 <= pair.dice_to_reference <= 1.0 and pair.metric < 0
    assert summary.median_seconds > 0 and summary.mean_dice is not None

    with (out / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert rows[0]["label"] == "labels/phantom_000/phantom_000.nii.gz" and rows[2]["label"] == ""
    assert rows[2]["status"] == "failed" and rows[2]["metric"] == "" and rows[2]["dice_to_reference"] == ""
    rows = read_manifest_rows(out)
    assert [(r.target, r.atlas, r.label, r.status, r.error) for r in rows] == [
        (p.target, p.atlas, p.label, p.status, p.error) for p in summary.pairs]
    assert rows[0].metric == pytest.approx(summary.pairs[0].metric, abs=1e-6)
    record = json.loads((out / "registration.json").read_text())
    assert record["ok"] == 2 and record["failed"] == 2 and record["target_modality"] == "t2"
    assert record["settings"]["transform"] == "bspline" and "SimpleITK" in record["versions"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "targets"]  # no staging folder left behind


def test_parallel_workers_give_the_same_labels(data, tmp_path) -> None:
    one = register_atlases(data["atlases"], data["targets"], tmp_path / "one", transform="affine", workers=1,
                           progress=False, **OPTIONS)
    two = register_atlases(data["atlases"], data["targets"], tmp_path / "two", transform="affine", workers=2,
                           progress=False, **OPTIONS)
    assert two.settings["workers"] == 2 and len(two.ok) == len(one.ok) == 4
    for a, b in zip(one.pairs, two.pairs, strict=True):
        agree = np.mean(read_image(a.label).array == read_image(b.label).array)
        assert (a.target, a.atlas) == (b.target, b.atlas) and agree > 0.99


def test_unlabelled_targets_and_an_nnunet_atlas_with_mapped_labels(data, tmp_path) -> None:
    targets = copy(data["targets"], tmp_path / "targets")
    for seg in targets.glob("*/*_seg.nii.gz"):
        seg.unlink()
    summary = register_atlases(data["nnunet"], targets, tmp_path / "out", transform="affine", workers=1,
                               progress=False, **OPTIONS)
    assert len(summary.ok) == 2 and summary.mean_dice is None
    assert all(p.dice_to_reference is None for p in summary.pairs)
    values = set().union(*(np.unique(read_image(p.label).array).tolist() for p in summary.ok))
    assert 4 in values and 3 not in values  # nnU-Net stores enhancing tumour as 3; medmodal's value is 4


def test_a_target_without_the_modality_fails_its_pairs(data, tmp_path) -> None:
    targets = copy(data["targets"], tmp_path / "targets")
    (targets / "phantom_000" / "phantom_000_t2.nii.gz").unlink()  # a missing modality, not an error
    summary = register_atlases(data["atlases"], targets, tmp_path / "out", atlas_modality="t1", target_modality="t2",
                               transform="affine", workers=1, progress=False, **OPTIONS)
    failed = summary.failed
    assert [(p.target, p.target_image) for p in failed] == [("phantom_000", None)] * 2
    assert "target 'phantom_000' has no t2 image" in failed[0].error and len(summary.ok) == 2


def test_atlases_used_as_targets_skip_the_self_pairs(data, tmp_path) -> None:
    summary = register_atlases(data["atlases"], data["atlases"], tmp_path / "out", transform="affine", workers=1,
                               progress=False, **OPTIONS)
    assert [(p.target, p.atlas) for p in summary.pairs] == [("phantom_000", "phantom_001"),
                                                          ("phantom_001", "phantom_000")]


def test_bad_inputs_are_data_errors_that_name_them(data, tmp_path) -> None:
    kw = {"workers": 1, "progress": False, "transform": "affine", **OPTIONS}
    unlabelled = copy(data["atlases"], tmp_path / "unlabelled")
    (unlabelled / "phantom_001" / "phantom_001_seg.nii.gz").unlink()
    with pytest.raises(DataError, match="phantom_001"):
        register_atlases(unlabelled, data["targets"], tmp_path / "o1", **kw)
    with pytest.raises(DataError, match=r"'pet'.*\['t1', 't1c', 't2', 'flair'\]"):
        register_atlases(data["atlases"], data["targets"], tmp_path / "o2", atlas_modality="pet", **kw)
    with pytest.raises(DataError, match="target data set.*nowhere"):
        register_atlases(data["atlases"], tmp_path / "nowhere", tmp_path / "o3", **kw)
    with pytest.raises(DataError, match="workers must be at least 1"):
        register_atlases(data["atlases"], data["targets"], tmp_path / "o6", **{**kw, "workers": 0})
    with pytest.raises(DataError, match="sampling_percentage"):
        register_atlases(data["atlases"], data["targets"], tmp_path / "o4", **{**kw, "sampling_percentage": 2.0})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        register_atlases(data["atlases"], data["targets"], tmp_path / "full", **kw)
    broken = copy(data["targets"], tmp_path / "broken")
    for image in broken.glob("*/*_t1.nii.gz"):
        image.write_bytes(b"garbage")
    with pytest.raises(DataError, match="all 4 registration pair"):
        register_atlases(data["atlases"], broken, tmp_path / "o5", **kw)
    assert not (tmp_path / "o5").exists() and not any(tmp_path.glob(".o5*"))
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_modality_choice() -> None:
    brats = DatasetInfo(name="a", modalities=BRATS_MODALITIES)
    t2_only = DatasetInfo(name="b", modalities=("t2", "flair"))
    assert choose_modalities(brats, brats, atlas_modality=None, target_modality=None) == ("t1", "t1")
    assert choose_modalities(brats, t2_only, atlas_modality=None, target_modality=None) == ("t2", "t2")
    assert choose_modalities(brats, t2_only, atlas_modality="T1CE", target_modality=None) == ("t1c", "t2")
    assert choose_modalities(brats, t2_only, atlas_modality=None, target_modality="flair") == ("flair", "flair")
    with pytest.raises(DataError, match=r"--target-modality 't1'.*\['t2', 'flair'\]"):
        choose_modalities(brats, t2_only, atlas_modality=None, target_modality="t1")
    with pytest.raises(DataError, match="none in common"):
        choose_modalities(DatasetInfo(name="c", modalities=("ct",)), t2_only, atlas_modality=None,
                          target_modality=None)


@pytest.mark.parametrize("workers", [1, 2])
def test_running_pairs_report_their_optimiser_progress(data, tmp_path, workers: int) -> None:
    """Issue 11, item 13: each running pair reports its stage and iterations, from worker processes too."""
    from medmodal.registration.atlases import _progress, _run_jobs  # the display's feed

    events: list[tuple[int, str, int, int]] = []
    jobs = _jobs_of(data, tmp_path)
    results = _run_jobs(jobs, workers=workers, threads=1, on_done=lambda i, r: None,
                        on_iteration=lambda *e: events.append(e))
    assert [r.status for r in results] == ["ok"] * 4
    assert {i for i, *_ in events} == {0, 1, 2, 3}
    for i in range(4):
        mine = [(stage, done) for j, stage, done, _ in events if j == i]
        assert mine[0] == ("affine", 1)  # the first iteration of a stage always gets through the throttle
    on_done, on_iteration, close = _progress(jobs, True)
    on_iteration(0, "affine", 3, 120)
    on_done(0, results[0])
    close()


def _jobs_of(data, tmp_path):
    from medmodal.data.formats import open_dataset
    from medmodal.registration.multi_atlas import PairJob
    from medmodal.registration.sitk import RegistrationSettings

    atlas_info, atlases = open_dataset(data["atlases"])
    target_info, targets = open_dataset(data["targets"])
    settings = RegistrationSettings(transform="affine", **OPTIONS)
    return [PairJob(atlas=a, target=t, atlas_info=atlas_info, target_info=target_info, atlas_modality="t1",
                    target_modality="t1", settings=settings,
                    label_path=tmp_path / "jobs" / t.case_id / f"{a.case_id}.nii.gz")
            for t in targets for a in atlases]
