"""Completed data sets: the input's files plus synthesised images, written in the input's layout and read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmodal.data.case import BRATS_MODALITIES, CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.check import check_dataset
from medmodal.data.formats import open_dataset, write_dataset, write_manifest
from medmodal.data.formats.brats import split_case_file
from medmodal.data.formats.completed import SIDECAR, read_synthetic_sidecar, write_completed_dataset
from medmodal.data.io import read_case, read_image, write_image

PROVENANCE = {"run": "runs/m2dn", "sampler": "ddim", "steps": 5, "seed": 3}
SHAPES = {2: (7, 9), 3: (7, 9, 11)}
#: case → modalities the source lacks (c2 lacks nothing; c3 lacks t1, so its grid comes from t1c)
MISSING = {"c1": ("t1c", "flair"), "c2": (), "c3": ("t1",)}
#: the synthesised file of c1's flair in each layout, relative to the output folder
FLAIR_FILE = {"brats": "c1/c1_flair_synthetic.nii.gz", "nnunet": "imagesTr/c1_0003.nii.gz",
              "manifest": "images/c1_flair_synthetic.nii.gz"}
#: the data set's own metadata file that must mark the synthesised images
METADATA_FILE = {"brats": "medmodal.json", "nnunet": "dataset.json", "manifest": "manifest.json"}


def _source(tmp_path: Path, io_make_case, fmt: str, dims: int, info: DatasetInfo) -> Path:
    cases = [io_make_case("c1", shape=SHAPES[dims], missing=MISSING["c1"], target=1, report="left, frontal"),
             io_make_case("c2", shape=SHAPES[dims], missing=MISSING["c2"], labelled=False, seed=1),
             io_make_case("c3", shape=SHAPES[dims], missing=MISSING["c3"], target=0, seed=2)]
    return write_dataset(cases, tmp_path / "src", info, format=fmt)


def _fill(records: list[CaseRecord], *, seed: int = 7) -> dict[str, dict[str, np.ndarray]]:
    """Random float32 arrays on each case's grid for its missing modalities (not for complete cases)."""
    rng = np.random.default_rng(seed)
    filled = {}
    for record in records:
        shape = read_image(next(iter(record.images.values()))).shape
        if MISSING[record.case_id]:
            filled[record.case_id] = {m: rng.normal(size=shape).astype(np.float32) for m in MISSING[record.case_id]}
    return filled


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("fmt", ["brats", "nnunet", "manifest"])
def test_completed_dataset_reads_back_complete(tmp_path, io_make_case, fmt, dims):
    info = DatasetInfo(name="tiny", modalities=BRATS_MODALITIES, synthetic=True)
    source = _source(tmp_path, io_make_case, fmt, dims, info)
    src_info, src_records = open_dataset(source)
    filled = _fill(src_records)
    out = tmp_path / "out"
    result = write_completed_dataset(source=source, format=fmt, records=src_records, info=src_info,
                                     synthesized=filled, out_dir=out, provenance=PROVENANCE)

    assert json.loads((out / SIDECAR).read_text()) == {
        "synthetic": {"c1": ["t1c", "flair"], "c3": ["t1"]}, "complete": ["c2"], "provenance": PROVENANCE}
    assert read_synthetic_sidecar(out)["synthetic"] == {"c1": ["t1c", "flair"], "c3": ["t1"]}
    assert result.synthetic == {"c1": ("t1c", "flair"), "c3": ("t1",)} and result.complete == ("c2",)
    assert result.files["c1"]["flair"] == out / FLAIR_FILE[fmt] and sorted(result.files) == ["c1", "c3"]
    meta = json.loads((out / METADATA_FILE[fmt]).read_text())
    meta = meta["medmodal"] if fmt == "nnunet" else meta
    assert meta["synthesized_modalities"] is True and meta["synthesized"] == {"c1": ["t1c", "flair"], "c3": ["t1"]}
    assert meta["synthetic"] is True  # the source was synthetic: the output does not claim real images

    out_info, out_records = open_dataset(out)
    assert (out_info.name, out_info.modalities, out_info.labels, out_info.regions, out_info.synthetic) == (
        src_info.name, src_info.modalities, src_info.labels, src_info.regions, src_info.synthetic)
    source_by_id = {r.case_id: r for r in src_records}
    assert sorted(r.case_id for r in out_records) == ["c1", "c2", "c3"]
    for record in out_records:
        src = source_by_id[record.case_id]
        assert sorted(record.images) == sorted(BRATS_MODALITIES)
        assert (record.target, record.report) == (src.target, src.report)
        case, src_case = read_case(record, out_info), read_case(src, src_info)
        grid = src_case.reference
        for m, vol in case.images.items():
            assert vol.shape == grid.shape and np.array_equal(vol.affine, grid.affine)
            if m in src.images:  # acquired: the very same file
                assert record.images[m].read_bytes() == src.images[m].read_bytes()
            else:
                assert vol.array.dtype == np.float32
                np.testing.assert_array_equal(vol.array, filled[record.case_id][m])
        assert (record.label is None) == (src.label is None)
        if src.label is not None:
            assert record.label.read_bytes() == src.label.read_bytes()
            np.testing.assert_array_equal(case.label.array, src_case.label.array)
    if fmt == "brats":  # the reader tells a synthesised file by its name
        by_id = {r.case_id: r for r in out_records}
        assert split_case_file(by_id["c1"].images["flair"], "c1") == ("flair", True)
        assert split_case_file(by_id["c1"].images["t1"], "c1") == ("t1", False)

    _, _, problems = check_dataset(out)
    assert [p.message for p in problems if not p.is_warning] == []
    assert any("3 synthesised image(s) in 2 case(s)" in p.message for p in problems if p.is_warning)


def test_brats_2023_names_and_extra_metadata_columns(tmp_path, io_make_case):
    """A BraTS 2023 data set keeps its names and separator; extra metadata.csv columns are carried over."""
    case = io_make_case("x")
    src = tmp_path / "src"
    for case_id, missing in (("BraTS-GLI-00000-000", "t2f"), ("BraTS-GLI-00001-000", "t1c")):
        for suffix, vol in zip(("t1n", "t1c", "t2w", "t2f"), case.images.values(), strict=True):
            if suffix != missing:
                write_image(vol, src / case_id / f"{case_id}-{suffix}.nii.gz")
        write_image(case.label, src / case_id / f"{case_id}-seg.nii.gz")
    (src / "metadata.csv").write_text("case_id,target,report,site\nBraTS-GLI-00000-000,2,,A\n"
                                      "BraTS-GLI-00001-000,,seen,B\n")
    info, records = open_dataset(src)
    filled = {"BraTS-GLI-00000-000": {"flair": np.full((7, 9, 11), 0.5, np.float32)},
              "BraTS-GLI-00001-000": {"t1c": np.full((7, 9, 11), -1.5, np.float32)}}
    out = tmp_path / "out"
    result = write_completed_dataset(source=src, format="brats", records=records, info=info, synthesized=filled,
                                     out_dir=out, provenance={})
    assert result.files["BraTS-GLI-00000-000"]["flair"] == (
        out / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t2f-synthetic.nii.gz")
    assert (out / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz").is_file()
    assert (out / "metadata.csv").read_text().splitlines() == [
        "case_id,target,report,site", "BraTS-GLI-00000-000,2,,A", "BraTS-GLI-00001-000,,seen,B"]
    out_info, out_records = open_dataset(out)
    got = read_case(out_records[0], out_info)
    assert out_records[0].target == 2 and out_records[1].report == "seen"
    np.testing.assert_array_equal(got.images["flair"].array, filled["BraTS-GLI-00000-000"]["flair"])
    np.testing.assert_array_equal(got.images["flair"].affine, got.images["t1"].affine)


def test_image_input_without_a_data_set_becomes_a_brats_folder(tmp_path, io_oblique_affine):
    """``--image``: no source data set; a NIfTI file is copied as is, an NRRD file re-encoded as NIfTI."""
    rng = np.random.default_rng(0)
    t1 = write_image(Volume(rng.normal(size=(9, 8)).astype(np.float32), io_oblique_affine), tmp_path / "a.nii.gz")
    t2 = write_image(Volume(rng.normal(size=(9, 8)).astype(np.float32), io_oblique_affine), tmp_path / "b.nrrd")
    info = DatasetInfo(name="input", modalities=BRATS_MODALITIES)
    record = CaseRecord("case", {"t1": t1, "t2": t2})
    filled = {"case": {m: rng.normal(size=(9, 8)).astype(np.float32) for m in ("t1c", "flair")}}
    out = tmp_path / "out"
    write_completed_dataset(source=None, format="brats", records=[record], info=info, synthesized=filled,
                            out_dir=out, provenance={"created": "now", "run": tmp_path / "run"})
    assert sorted(p.name for p in (out / "case").iterdir()) == [
        "case_flair_synthetic.nii.gz", "case_t1.nii.gz", "case_t1c_synthetic.nii.gz", "case_t2.nii.gz"]
    assert (out / "case" / "case_t1.nii.gz").read_bytes() == t1.read_bytes()
    assert json.loads((out / SIDECAR).read_text())["provenance"] == {"created": "now", "run": str(tmp_path / "run")}
    out_info, records = open_dataset(out)
    case = read_case(records[0], out_info)
    assert case.images["t1"].affine.tolist() == read_image(t1).affine.tolist()
    np.testing.assert_array_equal(case.images["t2"].array, read_image(t2).array)
    np.testing.assert_array_equal(case.images["flair"].array, filled["case"]["flair"])


def test_completing_a_completed_set_keeps_the_marks(tmp_path, io_make_case, io_brats_info):
    """nnU-Net names carry no mark: a second pass over a completed set keeps the first pass's list."""
    source = _source(tmp_path, io_make_case, "nnunet", 3, io_brats_info)
    info, records = open_dataset(source)
    write_completed_dataset(source=source, format="nnunet", records=records, info=info, synthesized=_fill(records),
                            out_dir=tmp_path / "once", provenance={"pass": 1})
    info, records = open_dataset(tmp_path / "once" / "dataset.json")
    again = write_completed_dataset(source=tmp_path / "once" / "dataset.json", format="nnunet", records=records,
                                    info=info, synthesized={}, out_dir=tmp_path / "twice", provenance={"pass": 2})
    assert again.complete == ("c1", "c2", "c3") and again.files == {}
    assert read_synthetic_sidecar(tmp_path / "twice")["synthetic"] == {"c1": ["t1c", "flair"], "c3": ["t1"]}
    meta = json.loads((tmp_path / "twice" / "dataset.json").read_text())
    assert meta["medmodal"]["synthesized"] == {"c1": ["t1c", "flair"], "c3": ["t1"]} and meta["numTraining"] == 2


def test_manifest_keeps_user_keys_and_lists_the_synthetic_file(tmp_path, io_make_case, io_brats_info):
    source = _source(tmp_path, io_make_case, "manifest", 2, io_brats_info)
    data = json.loads((source / "manifest.json").read_text())
    (source / "manifest.json").write_text(json.dumps({**data, "site": "hospital A"}))
    info, records = open_dataset(source)
    out = tmp_path / "out"
    write_completed_dataset(source=source / "manifest.json", format="manifest", records=records, info=info,
                            synthesized=_fill(records), out_dir=out, provenance={})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["site"] == "hospital A"
    c1 = next(c for c in manifest["cases"] if c["case_id"] == "c1")
    assert c1["images"] == {"t1": "images/c1_t1.nii.gz", "t1c": "images/c1_t1c_synthetic.nii.gz",
                            "t2": "images/c1_t2.nii.gz", "flair": "images/c1_flair_synthetic.nii.gz"}
    assert (c1["label"], c1["target"], c1["report"]) == ("labels/c1.nii.gz", 1, "left, frontal")

    write_manifest(records, tmp_path / "csv" / "list.csv", info)  # a CSV manifest: the output is a JSON one
    info, records = open_dataset(tmp_path / "csv" / "list.csv")
    filled = _fill(records, seed=2)
    write_completed_dataset(source=tmp_path / "csv" / "list.csv", format="manifest", records=records, info=info,
                            synthesized=filled, out_dir=tmp_path / "from_csv", provenance={})
    out_info, out_records = open_dataset(tmp_path / "from_csv")
    c3 = read_case(next(r for r in out_records if r.case_id == "c3"), out_info)
    np.testing.assert_array_equal(c3.images["t1"].array, filled["c3"]["t1"])
    assert out_records[0].report == "left, frontal"


@pytest.fixture
def brats_source(tmp_path, io_make_case, io_brats_info):
    source = _source(tmp_path, io_make_case, "brats", 3, io_brats_info)
    info, records = open_dataset(source)
    return source, info, records, _fill(records)


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f["c1"].update(flair=np.zeros((7, 9), np.float32)),
     r"case 'c1': the synthesised 'flair' has shape \(7, 9\), but the case's grid .* is \(7, 9, 11\)"),
    (lambda f: f["c1"].update(t1=np.zeros((7, 9, 11), np.float32)),
     r"case 'c1': \['t1'\] present already .*c1_t1\.nii\.gz.*never replaces an acquired one"),
    (lambda f: f["c1"].update(pet=np.zeros((7, 9, 11), np.float32)),
     r"case 'c1', synthesised images: unknown modality name\(s\) \['pet'\]; this dataset has \['t1', 't1c', "
     r"'t2', 'flair'\]"),
    (lambda f: f["c1"].pop("flair"), r"case 'c1': \['flair'\] missing and not synthesised"),
    (lambda f: f.update(c9={"t1": np.zeros((7, 9, 11), np.float32)}), r"case\(s\) \['c9'\], which are not among"),
    (lambda f: f["c3"].update(t1=np.full((7, 9, 11), np.nan, np.float32)), r"case 'c3': the synthesised 't1' holds "
     "non-finite"),
])
def test_bad_synthesised_images_are_refused_and_leave_nothing(tmp_path, brats_source, change, message):
    source, info, records, filled = brats_source
    change(filled)
    with pytest.raises(DataError, match=message):
        write_completed_dataset(source=source, format="brats", records=records, info=info, synthesized=filled,
                                out_dir=tmp_path / "out", provenance={})
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_folder_rules(tmp_path, brats_source):
    source, info, records, filled = brats_source
    kwargs = dict(format="brats", records=records, info=info, synthesized=filled, provenance={})
    for out, text in ((source, "is the source data set"), (source / "c1" / "x", "is inside the source data set"),
                      (tmp_path, "contains the source data set")):
        with pytest.raises(DataError, match=f"{out}: {text}"):
            write_completed_dataset(source=source, out_dir=out, **kwargs)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep")
    with pytest.raises(DataError, match=f"{tmp_path / 'out'}: folder exists and is not empty; pass --overwrite"):
        write_completed_dataset(source=source, out_dir=tmp_path / "out", **kwargs)
    write_completed_dataset(source=source, out_dir=tmp_path / "out", overwrite=True, **kwargs)
    assert len(open_dataset(tmp_path / "out")[1]) == 3 and (tmp_path / "out" / "old.txt").read_text() == "keep"
    with pytest.raises(DataError, match="nnU-Net data set can only be completed from an nnU-Net source"):
        write_completed_dataset(source=None, out_dir=tmp_path / "nn", **{**kwargs, "format": "nnunet"})
    with pytest.raises(DataError, match="unknown dataset format 'png'"):
        write_completed_dataset(source=source, out_dir=tmp_path / "x", **{**kwargs, "format": "png"})


def test_a_case_with_nothing_present_is_refused(tmp_path, io_brats_info):
    with pytest.raises(DataError, match="case 'e': no modality is present, nothing to complete it from"):
        write_completed_dataset(source=None, format="brats", records=[CaseRecord("e", {})], info=io_brats_info,
                                synthesized={}, out_dir=tmp_path / "out", provenance={})


def test_a_broken_sidecar_is_reported(tmp_path, brats_source):
    source, *_ = brats_source
    (source / SIDECAR).write_text(json.dumps({"synthetic": {"c1": "flair"}}))
    with pytest.raises(DataError, match=r"synthetic\.json: 'synthetic' must map case ids to lists"):
        read_synthetic_sidecar(source)
    _, _, problems = check_dataset(source)
    assert [p.message for p in problems if not p.is_warning][0].startswith(str(source / SIDECAR))
