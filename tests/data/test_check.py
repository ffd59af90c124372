"""Dataset validation lists every problem at once; conversion between layouts preserves the data."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medmodal.data.case import BRATS_LABELS, BRATS_REGIONS, DataError, Volume
from medmodal.data.check import Problem, check_dataset, convert_dataset
from medmodal.data.formats import detect_format, open_dataset, write_brats
from medmodal.data.io import read_case, write_image


def test_clean_dataset_has_no_problem(tmp_path, io_make_case, io_brats_info):
    write_brats([io_make_case("c1"), io_make_case("c2", missing=("t1",), seed=1)], tmp_path / "d", io_brats_info)
    info, records, problems = check_dataset(tmp_path / "d", progress=True)
    assert problems == [] and len(records) == 2 and info is not None and info.modalities == io_brats_info.modalities


def test_check_lists_several_problems_at_once(tmp_path, io_make_case, io_brats_info):
    cases = [io_make_case(f"c{i}", seed=i) for i in range(6)]
    cases[5].label = Volume(np.zeros_like(cases[5].label.array), cases[5].label.affine)
    root = write_brats(cases, tmp_path / "d", io_brats_info)
    # c0: truncated t1; c1: NaN in flair; c2: t2 on another grid; c3: unknown label 3; c4: only a label file;
    # c5: empty label map (warning)
    data = (root / "c0" / "c0_t1.nii.gz").read_bytes()
    (root / "c0" / "c0_t1.nii.gz").write_bytes(data[: len(data) // 2])
    nan = np.full((7, 9, 11), np.nan, np.float32)
    nib.save(nib.Nifti1Image(nan, cases[1].images["flair"].affine), root / "c1" / "c1_flair.nii.gz")
    write_image(Volume(np.zeros((7, 9, 12), np.float32)), root / "c2" / "c2_t2.nii.gz")
    bad = cases[3].label.array.copy()
    bad[0, 0, 0] = 3
    write_image(Volume(bad, cases[3].label.affine), root / "c3" / "c3_seg.nii.gz")
    for m in io_brats_info.modalities:
        (root / "c4" / f"c4_{m}.nii.gz").unlink()

    info, records, problems = check_dataset(root)
    assert info is not None and len(records) == 6
    by_case = {p.case_id: p for p in problems}
    assert sorted(by_case) == ["c0", "c1", "c2", "c3", "c4", "c5"]
    assert "c0_t1.nii.gz: cannot be read" in by_case["c0"].message and by_case["c0"].path.name == "c0_t1.nii.gz"
    assert "NaN" in by_case["c1"].message
    assert "c2_t2.nii.gz" in by_case["c2"].message and "same grid" in by_case["c2"].message
    assert "[3]" in by_case["c3"].message
    assert "all modalities missing" in by_case["c4"].message
    assert by_case["c5"].is_warning and not by_case["c3"].is_warning
    assert all(isinstance(p, Problem) for p in problems)


def test_check_reports_layout_and_manifest_errors(tmp_path):
    info, records, problems = check_dataset(tmp_path / "missing")
    assert info is None and records == [] and "does not exist" in problems[0].message
    (tmp_path / "m.csv").write_text("case_id,t1\nc1,a.nii.gz\nc1,b.nii.gz\n")
    info, _, problems = check_dataset(tmp_path / "m.csv")
    assert info is None and len(problems) == 2  # a missing file and a duplicate id
    assert {p.case_id for p in problems} == {"c1"}
    _, _, problems = check_dataset(tmp_path, "nnunet")
    assert "dataset.json: not found" in problems[0].message


@pytest.mark.parametrize("via", ["nnunet", "manifest"])
def test_convert_round_trip_preserves_arrays(tmp_path, io_make_case, io_brats_info, io_assert_same_case, via):
    cases = [io_make_case("c1", target=1, report="r"), io_make_case("c2", missing=("t1c",), seed=1),
             io_make_case("c3", labelled=False, seed=2)]
    src = write_brats(cases, tmp_path / "src", io_brats_info)
    middle = convert_dataset(src, tmp_path / via, to=via)
    assert detect_format(middle) == via
    back = convert_dataset(middle, tmp_path / "back", to="brats")
    info, records = open_dataset(back)
    assert info.labels == BRATS_LABELS and info.regions == BRATS_REGIONS
    got = {r.case_id: read_case(r, info) for r in records}
    for case in cases:
        io_assert_same_case(case, got[case.case_id])


def test_convert_errors(tmp_path, io_make_case, io_brats_info):
    src = write_brats([io_make_case("c1")], tmp_path / "src", io_brats_info)
    with pytest.raises(DataError, match="unknown target format"):
        convert_dataset(src, tmp_path / "out", to="zarr")
    with pytest.raises(DataError, match="is the source dataset"):
        convert_dataset(src, src, to="nnunet")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="pass --overwrite"):
        convert_dataset(src, tmp_path / "busy", to="nnunet")
    (src / "c1" / "c1_t2.nii.gz").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="c1_t2.nii.gz"):
        convert_dataset(src, tmp_path / "out", to="nnunet")
    assert not (tmp_path / "out").exists()


# -- issue 11, item 11: `data convert SRC out.csv --to manifest` writes that file ------------------------------
@pytest.mark.parametrize("name", ["out.csv", "sub/out.json"])
def test_convert_to_a_manifest_file_lists_the_source_files(tmp_path, io_make_case, io_brats_info,
                                                          io_assert_same_case, name):
    cases = [io_make_case("c1", target=1, report="r"), io_make_case("c2", missing=("t1c",), seed=1)]
    src = write_brats(cases, tmp_path / "src", io_brats_info)
    out = convert_dataset(src, tmp_path / name, to="manifest")
    assert out == tmp_path / name and out.is_file()  # a file, not a folder named out.csv
    assert sorted(p.name for p in out.parent.iterdir() if p.name != "src") == [out.name]  # no stray temp file
    text = out.read_text()
    assert "c1/c1_t1.nii.gz" in text and str(tmp_path) not in text  # paths relative to the manifest's folder
    info, records = open_dataset(out)
    assert [r.images["t1"] for r in records] == [src / "c1" / "c1_t1.nii.gz", src / "c2" / "c2_t1.nii.gz"]
    got = {r.case_id: read_case(r, info) for r in records}
    for case in cases:
        io_assert_same_case(case, got[case.case_id])
    with pytest.raises(DataError, match="--overwrite"):
        convert_dataset(src, tmp_path / name, to="manifest")
    assert convert_dataset(src, tmp_path / name, to="manifest", overwrite=True) == out


def test_convert_to_a_manifest_file_refuses_what_it_cannot_list(tmp_path, io_make_case, io_brats_info):
    src = write_brats([io_make_case("c1")], tmp_path / "src", io_brats_info)
    with pytest.raises(DataError, match="--to brats"):
        convert_dataset(src, tmp_path / "out.csv", to="nnunet")
    nn = convert_dataset(src, tmp_path / "nn", to="nnunet")  # BraTS label 4 is stored as 3 there
    with pytest.raises(DataError, match="stores label values"):
        convert_dataset(nn, tmp_path / "out.csv", to="manifest")
    assert not (tmp_path / "out.csv").exists()
    out = convert_dataset(nn, tmp_path / "out.json", to="manifest")  # a JSON manifest records the label_map
    info, records = open_dataset(out)
    assert info.label_map is not None and info.label_map[3] == 4
    assert set(np.unique(read_case(records[0], info).label.array)) == {0, 1, 2, 4}
