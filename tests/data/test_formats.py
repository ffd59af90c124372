"""Dataset layouts: BraTS, nnU-Net v2 raw and CSV/JSON manifests read, write and round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmodal.data.case import BRATS_LABELS, BRATS_MODALITIES, BRATS_REGIONS, CaseRecord, DataError, Volume
from medmodal.data.formats import (
    FORMATS,
    detect_format,
    open_dataset,
    read_brats,
    read_manifest,
    read_nnunet,
    write_brats,
    write_dataset,
    write_manifest,
    write_nnunet,
)
from medmodal.data.io import DataErrors, read_case, write_image


def _read_all(root: Path, fmt: str = "auto"):
    info, records = open_dataset(root, fmt)
    return info, {r.case_id: read_case(r, info) for r in records}


def test_brats_round_trip_with_missing_modality(tmp_path, io_make_case, io_brats_info, io_assert_same_case):
    cases = [io_make_case("c1", target=1, report="a tumour, with a comma"),
             io_make_case("c2", missing=("t1c", "flair"), seed=1), io_make_case("c3", labelled=False, seed=2)]
    root = write_brats(iter(cases), tmp_path / "brats", io_brats_info)
    assert (root / "c2" / "c2_t1.nii.gz").is_file() and not (root / "c2" / "c2_flair.nii.gz").exists()
    assert detect_format(root) == "brats"
    info, got = _read_all(root)
    assert info.modalities == BRATS_MODALITIES and info.labels == BRATS_LABELS and info.regions == BRATS_REGIONS
    assert info.name == "tiny-brats" and not info.synthetic
    for case in cases:
        io_assert_same_case(case, got[case.case_id])
    assert got["c2"].available(info.modalities).tolist() == [True, False, True, False]


def test_brats_names_2018_and_2023(tmp_path, io_make_case):
    case = io_make_case("x")
    for case_id, names in {
        "BraTS20_Training_001": ("t1", "t1ce", "t2", "flair", "seg"),
        "BraTS-GLI-00000-000": ("t1n", "t1c", "t2w", "t2f", "seg"),
    }.items():
        sep = "-" if "-" in case_id else "_"
        volumes = [*case.images.values(), case.label]
        for name, vol in zip(names, volumes, strict=True):
            ext = ".nii" if name == "t2" else ".nii.gz"
            write_image(vol, tmp_path / case_id / f"{case_id}{sep}{name}{ext}")
    (tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-brainmask.nii.gz").write_bytes(b"ignored")
    (tmp_path / "metadata.csv").write_text("case_id,target,report\nBraTS20_Training_001,2,\n")
    info, records = read_brats(tmp_path)
    assert [r.case_id for r in records] == ["BraTS-GLI-00000-000", "BraTS20_Training_001"]
    for record in records:
        assert sorted(record.images) == sorted(BRATS_MODALITIES) and record.label is not None
    assert (records[0].target, records[1].target, records[1].report) == (None, 2, None)
    case_2023 = read_case(records[0], info)
    np.testing.assert_array_equal(case_2023.images["flair"].array, case.images["flair"].array)


def test_brats_errors(tmp_path, io_make_case, io_brats_info):
    with pytest.raises(DataError, match="no BraTS case folders"):
        read_brats(tmp_path)
    write_brats([io_make_case("c1")], tmp_path / "d", io_brats_info)
    with pytest.raises(DataError, match="not empty; pass --overwrite"):
        write_brats([io_make_case("c1")], tmp_path / "d", io_brats_info)
    write_brats([io_make_case("c1", seed=5)], tmp_path / "d", io_brats_info, overwrite=True)
    (tmp_path / "d" / "metadata.csv").write_text("case_id,target,report\nc1,high,\n")
    with pytest.raises(DataError, match=r"metadata\.csv, line 2: target 'high' is not an integer"):
        read_brats(tmp_path / "d")


def test_failed_dataset_write_leaves_nothing(tmp_path, io_make_case, io_brats_info):
    def cases():
        yield io_make_case("c1")
        raise DataError("boom")

    with pytest.raises(DataError, match="boom"):
        write_brats(cases(), tmp_path / "out", io_brats_info)
    assert list(tmp_path.iterdir()) == []


def test_nnunet_round_trip_with_brats_labels(tmp_path, io_make_case, io_brats_info, io_assert_same_case):
    cases = [io_make_case("c1", target=0, report="r1"), io_make_case("c2", missing=("t2",), seed=1),
             io_make_case("c3", labelled=False, seed=2)]
    root = write_nnunet(cases, tmp_path / "Dataset001_Tiny", io_brats_info)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "necrosis": 1, "edema": 2, "enhancing_tumor": 3}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert (root / "imagesTs" / "c3_0000.nii.gz").is_file() and not (root / "imagesTr" / "c2_0002.nii.gz").exists()
    from medmodal.data.io import read_image

    assert set(np.unique(read_image(root / "labelsTr" / "c1.nii.gz").array)) == {0, 1, 2, 3}  # consecutive
    assert detect_format(root) == "nnunet" == detect_format(root / "dataset.json")
    info, got = _read_all(root)
    assert info.labels == BRATS_LABELS and info.regions == BRATS_REGIONS and info.modalities == BRATS_MODALITIES
    for case in cases:
        io_assert_same_case(case, got[case.case_id])


def _nnunet_folder(root: Path, labels: dict, channels=None, cases=("a",), missing=()) -> Path:
    channels = channels or {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": channels, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}))
    for case_id in cases:
        for ch in channels:
            if ch not in missing:
                file = root / "imagesTr" / f"{case_id}_{int(ch):04d}.nii.gz"
                write_image(Volume(np.zeros((7, 9, 11), np.float32)), file)
        write_image(Volume(np.zeros((7, 9, 11), np.uint8)), root / "labelsTr" / f"{case_id}.nii.gz")
    return root


def test_nnunet_external_datasets(tmp_path):
    msd = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    info, records = read_nnunet(_nnunet_folder(tmp_path / "msd", msd, missing=("1",)))
    assert info.modalities == ("t1", "t1c", "t2", "flair") and info.labels == (0, 1, 2, 3)
    assert info.regions == {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}
    assert sorted(records[0].images) == ["flair", "t1", "t2"] and records[0].label is not None

    regions = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}
    info, _ = read_nnunet(_nnunet_folder(tmp_path / "regions", regions))
    assert info.regions == {"whole_tumor": (1, 2, 3), "tumor_core": (2, 3), "enhancing_tumor": (3,)}

    info, _ = read_nnunet(_nnunet_folder(tmp_path / "ct", {"background": 0, "liver": 1, "tumour": 2},
                                         channels={"0": "CT"}))
    assert info.modalities == ("ct",) and info.regions == {"liver": (1,), "tumour": (2,)}


def test_nnunet_errors(tmp_path):
    with pytest.raises(DataError, match=r"dataset\.json: not found"):
        read_nnunet(tmp_path)
    root = _nnunet_folder(tmp_path / "d", {"background": 0, "x": 1})
    write_image(Volume(np.zeros((7, 9, 11), np.float32)), root / "imagesTr" / "a_0007.nii.gz")
    with pytest.raises(DataError, match=r"a_0007\.nii\.gz: channel 0007 is not in"):
        read_nnunet(root)


def test_manifest_csv(tmp_path, io_make_case, io_brats_info, io_assert_same_case):
    case = io_make_case("c1", missing=("t1c",), target=1, report="left frontal lesion")
    for name, vol in case.images.items():
        write_image(vol, tmp_path / "img" / f"{name}.nii.gz")
    write_image(case.label, tmp_path / "seg.nii.gz")
    (tmp_path / "m.csv").write_text(
        "case_id,T1,t1ce,t2,flair,label,target,report\n"
        "c1,img/t1.nii.gz,,img/t2.nii.gz,img/flair.nii.gz,seg.nii.gz,1,left frontal lesion\n"
    )
    assert detect_format(tmp_path / "m.csv") == "manifest" == detect_format(tmp_path)
    info, got = _read_all(tmp_path / "m.csv")
    assert info.modalities == BRATS_MODALITIES
    io_assert_same_case(case, got["c1"])
    _, records = read_manifest(tmp_path / "m.csv")
    write_manifest(records, tmp_path / "out" / "copy.csv", info)
    assert "../img/t1.nii.gz" in (tmp_path / "out" / "copy.csv").read_text()
    assert read_manifest(tmp_path / "out" / "copy.csv")[1] == records


def test_manifest_json_round_trip(tmp_path, io_make_case, io_assert_same_case):
    from medmodal.data.case import DatasetInfo

    info = DatasetInfo(name="j", modalities=BRATS_MODALITIES, synthetic=True)
    cases = [io_make_case("c1", missing=("t2",), target=3), io_make_case("c2", labelled=False, seed=1)]
    root = write_dataset(cases, tmp_path / "m", info, format="manifest")
    assert detect_format(root) == "manifest"
    got_info, got = _read_all(root)
    assert got_info.synthetic and got_info.name == "j"
    for case in cases:
        io_assert_same_case(case, got[case.case_id])
    with pytest.raises(DataError, match="cannot record"):
        write_manifest(open_dataset(root)[1], tmp_path / "m.csv", info)


def test_manifest_errors_are_all_listed(tmp_path):
    write_image(Volume(np.zeros((7, 9, 11), np.float32)), tmp_path / "a.nii.gz")
    (tmp_path / "m.csv").write_text(
        "case_id,t1,flair,label\nc1,a.nii.gz,,\nc1,a.nii.gz,,\nc2,,,\nc3,missing.nii.gz,,\n"
    )
    with pytest.raises(DataErrors) as err:
        read_manifest(tmp_path / "m.csv")
    text = str(err.value)
    assert "3 problems" in text and "line 3: case id 'c1' appears twice" in text
    assert "line 4: case 'c2' lists no image" in text and "line 5: file" in text and "missing.nii.gz" in text
    manifest = {"modalities": ["t1"], "cases": [{"case_id": "c1", "images": {"t1": "a.nii.gz", "pet": "a.nii.gz"}}]}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"cases\[0\] \(case 'c1'\): unknown modality name\(s\) \['pet'\]"):
        read_manifest(tmp_path / "m.json")


def test_detect_format_explains_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="BraTS folder.*nnU-Net v2.*manifest"):
        detect_format(tmp_path)
    with pytest.raises(DataError, match="unknown dataset format"):
        write_dataset([], tmp_path / "x", None, format="zarr")  # type: ignore[arg-type]
    assert FORMATS == ("brats", "nnunet", "manifest")


def test_open_dataset_with_explicit_format(tmp_path, io_make_case, io_brats_info):
    write_brats([io_make_case("c1")], tmp_path / "b", io_brats_info)
    assert [r.case_id for r in open_dataset(tmp_path / "b", "brats")[1]] == ["c1"]
    with pytest.raises(DataError, match=r"dataset\.json: not found"):
        open_dataset(tmp_path / "b", "nnunet")
    assert isinstance(open_dataset(tmp_path / "b")[1][0], CaseRecord)


def test_invalid_json_metadata_names_the_file(tmp_path: Path) -> None:
    from medmodal.data.formats import open_dataset

    (tmp_path / "nn").mkdir()
    (tmp_path / "nn" / "dataset.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset.json: is not valid JSON"):
        open_dataset(tmp_path / "nn", format="nnunet")
    (tmp_path / "nn" / "dataset.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset.json: must hold a JSON object with 'channel_names'"):
        open_dataset(tmp_path / "nn", format="nnunet")


# -- issue 11, item 4: column roles and modality names are case-insensitive, with one normalisation ----------
def test_canonical_modality_is_case_insensitive_and_knows_aliases() -> None:
    from medmodal.data.formats import canonical_modality

    assert [canonical_modality(n) for n in ("T1", " FLAIR ", "T1ce", "t1Gd", "T2w", "dwi")] == [
        "t1", "flair", "t1c", "t1c", "t2", "dwi"]


def test_csv_manifest_column_roles_are_case_insensitive(tmp_path, io_make_case) -> None:
    case = io_make_case("a")
    for name in ("t1", "flair"):
        write_image(case.images[name], tmp_path / f"a_{name}.nii.gz")
    write_image(case.label, tmp_path / "a_seg.nii.gz")
    (tmp_path / "m.csv").write_text("Case_ID,T1,FLAIR,Label,Target,Report\n"
                                    "a,a_t1.nii.gz,a_flair.nii.gz,a_seg.nii.gz,1,a report\n")
    info, records = read_manifest(tmp_path / "m.csv")
    assert info.modalities == ("t1", "flair")
    assert records[0].label == tmp_path / "a_seg.nii.gz"
    assert records[0].target == 1 and records[0].report == "a report"


def test_brats_sidecar_modalities_are_normalised(tmp_path, io_make_case, io_brats_info) -> None:
    root = write_brats([io_make_case("c1")], tmp_path / "d", io_brats_info)
    sidecar = json.loads((root / "medmodal.json").read_text())
    sidecar["modalities"] = ["T1", "T1ce", "T2", "FLAIR"]
    (root / "medmodal.json").write_text(json.dumps(sidecar))
    info, records = read_brats(root)
    assert info.modalities == BRATS_MODALITIES
    assert sorted(records[0].images) == sorted(BRATS_MODALITIES)
