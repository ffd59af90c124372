"""Manifests for two tasks with separate label sets: sources, class names, unlabelled rows, 0/255 masks, and what
``data check`` reports per source and per bad row."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medmodal.data.case import CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.check import SourceCounts, check_dataset, label_counts
from medmodal.data.formats import open_dataset
from medmodal.data.formats.manifest import ClassNamesWarning, read_manifest, write_manifest
from medmodal.data.io import DataErrors, read_case, write_image

SHAPE = (17, 18)  # (X, Y): 17 columns, 18 rows


def _xray(path, seed=0, shape=SHAPE):
    pixels = np.random.default_rng(seed).integers(0, 4000, size=shape).astype(np.uint16)
    write_image(Volume(pixels), path)
    return pixels


def _mask(path, shape=SHAPE, value=1):
    mask = np.zeros(shape, np.uint8)
    mask[3:9, 4:12] = value
    write_image(Volume(mask), path)
    return mask


@pytest.fixture
def two_task(tmp_path):
    """A CSV manifest: source A has 2 images with mask and class, 1 unlabelled; B 1 class-only; one row without
    source has a mask only."""
    for i in range(5):
        _xray(tmp_path / "img" / f"c{i}.png", seed=i)
    for i in (0, 1, 4):
        _mask(tmp_path / "seg" / f"c{i}.png")
    (tmp_path / "manifest.csv").write_text(
        "case_id,xray,label,target,source\n"
        "c0,img/c0.png,seg/c0.png,opacity,A\n"
        "c1,img/c1.png,seg/c1.png,normal,A\n"
        "c2,img/c2.png,,,A\n"
        "c3,img/c3.png,,opacity,B\n"
        "c4,img/c4.png,seg/c4.png,,\n"
    )
    (tmp_path / "medmodal.json").write_text(json.dumps(
        {"name": "chest", "labels": [0, 1], "regions": {"lung": [1]}, "classes": ["normal", "opacity"]}))
    return tmp_path


def test_csv_with_side_file_reads_sources_class_names_and_unlabelled_rows(two_task):
    info, records = read_manifest(two_task / "manifest.csv")
    assert info.name == "chest" and info.modalities == ("xray",) and info.class_names == ("normal", "opacity")
    assert info.labels == (0, 1) and info.regions == {"lung": (1,)} and not info.synthetic
    got = {r.case_id: (r.target, r.source, r.label is not None) for r in records}
    assert got == {"c0": (1, "A", True), "c1": (0, "A", True), "c2": (None, "A", False),
                   "c3": (1, "B", False), "c4": (None, None, True)}
    case = read_case(records[0], info)
    assert (case.source, case.target) == ("A", 1) and case.images["xray"].shape == SHAPE
    assert case.label.array.sum() == 48


@pytest.mark.parametrize("ending", [".json", ".csv"])
def test_manifest_round_trip_keeps_sources_classes_and_unlabelled_rows(two_task, tmp_path, ending):
    info, records = read_manifest(two_task / "manifest.csv")
    out = tmp_path / "copy" / f"list{ending}"
    write_manifest(records, out, info, side_file=True)
    got_info, got = read_manifest(out)
    assert got == records and got_info == info
    if ending == ".json":
        data = json.loads(out.read_text())
        assert data["classes"] == ["normal", "opacity"]
        assert data["cases"][2] == {"case_id": "c2", "images": {"xray": "../img/c2.png"}, "source": "A"}
        assert data["cases"][0]["target"] == "opacity"
    else:
        assert out.read_text().splitlines()[1] == "c0,../img/c0.png,../seg/c0.png,opacity,A"
        with pytest.raises(DataError, match="a CSV manifest cannot record .*classes"):
            write_manifest(records, tmp_path / "plain.csv", info)  # no side file: the classes would be lost


def test_json_manifest_takes_indices_and_names(tmp_path):
    _xray(tmp_path / "a.png")
    cases = [{"case_id": "a", "images": {"xray": "a.png"}, "target": 1, "source": "site-1"},
             {"case_id": "b", "images": {"xray": "a.png"}, "target": "sick"}]
    (tmp_path / "m.json").write_text(json.dumps({"modalities": ["xray"], "classes": ["well", "sick"],
                                                 "cases": cases}))
    info, records = read_manifest(tmp_path / "m.json")
    assert [(r.target, r.source) for r in records] == [(1, "site-1"), (1, None)]


def test_undeclared_class_names_take_the_sorted_names_and_check_says_so(two_task):
    (two_task / "medmodal.json").unlink()
    with pytest.warns(ClassNamesWarning, match=r"sorted distinct names \['normal', 'opacity'\].*medmodal\.json"):
        info, records = read_manifest(two_task / "manifest.csv")
    assert info.class_names == ("normal", "opacity") and [r.target for r in records] == [1, 0, None, 1, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # check_dataset turns the warning into a problem, it does not re-emit it
        info, records, problems = check_dataset(two_task)
    assert len(problems) == 1 and problems[0].is_warning and "sorted distinct names" in problems[0].message


def test_unknown_class_name_and_bad_index_name_the_row_and_list_the_classes(two_task):
    text = (two_task / "manifest.csv").read_text()
    (two_task / "manifest.csv").write_text(text.replace("c1,img/c1.png,seg/c1.png,normal", "c1,img/c1.png,seg/c1.png,"
                                                                                          "pneumonia").replace(
        "c3,img/c3.png,,opacity", "c3,img/c3.png,,2"))
    with pytest.raises(DataErrors) as err:
        read_manifest(two_task / "manifest.csv")
    message = str(err.value)
    assert (f"manifest.csv, line 3: case 'c1': unknown class name 'pneumonia'; the classes declared in "
            f"{two_task / 'medmodal.json'} are ['normal', 'opacity']") in message
    assert "line 5: target 2 is not a class index; give 0..1 (classes ['normal', 'opacity'])" in message
    info, records, problems = check_dataset(two_task)
    assert info is None and [p.case_id for p in problems] == ["c1", "c3"]


def test_mixing_indices_and_undeclared_names_is_an_error(tmp_path):
    _xray(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("case_id,xray,target\na,a.png,normal\nb,a.png,1\n")
    with pytest.raises(DataError, match=r"line 3: target is a class index but other rows give class names .*"
                                        r"declare the classes"):
        read_manifest(tmp_path / "m.csv")


def test_bad_side_file_keys_are_named(tmp_path):
    _xray(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("case_id,xray\na,a.png\n")
    for meta, message in [({"classes": ["a", "a"]}, "must list each class name once"),
                          ({"classes": ["0", "1"]}, r"class name\(s\) \['0', '1'\] look like class indices"),
                          ({"labels": [0, 1], "label_map": {"255": 2}}, "'label_map' maps stored value"),
                          ({"label_map": [255]}, "'label_map' an object of stored value -> label value")]:
        (tmp_path / "medmodal.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match=message):
            read_manifest(tmp_path / "m.csv")


def test_a_0_255_mask_reads_with_label_map_and_is_explained_without(two_task):
    _mask(two_task / "seg" / "c0.png", value=255)
    info, records = read_manifest(two_task / "manifest.csv")
    with pytest.raises(DataError) as err:
        read_case(records[0], info)
    assert "case 'c0': label" in str(err.value) and "value(s) [255]" in str(err.value)
    assert "\"label_map\": {\"255\": 1}" in str(err.value) and "medmodal.json beside a CSV manifest" in str(err.value)
    meta = json.loads((two_task / "medmodal.json").read_text())
    (two_task / "medmodal.json").write_text(json.dumps({**meta, "label_map": {"255": 1}}))
    info, records = read_manifest(two_task / "manifest.csv")
    assert info.label_map == {0: 0, 1: 1, 255: 1}
    assert set(np.unique(read_case(records[0], info).label.array)) == {0, 1}
    assert set(np.unique(read_case(records[1], info).label.array)) == {0, 1}  # 0/1 masks still read
    assert check_dataset(two_task)[2] == []


def test_check_lists_each_bad_file_with_its_case(two_task):
    _mask(two_task / "seg" / "c0.png", shape=(17, 20))  # another size than its image
    (two_task / "img" / "c2.png").write_bytes(b"")  # empty
    (two_task / "img" / "c3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # corrupt
    Image.fromarray(np.dstack([np.zeros((18, 17), np.uint8), np.full((18, 17), 200, np.uint8),
                               np.zeros((18, 17), np.uint8)])).save(two_task / "img" / "c4.png")  # colour
    info, records, problems = check_dataset(two_task)
    assert info is not None and len(records) == 5
    by_case = {p.case_id: p.message for p in problems}
    assert sorted(by_case) == ["c0", "c2", "c3", "c4"] and not any(p.is_warning for p in problems)
    assert "shape (17, 18) vs (17, 20)" in by_case["c0"] and "case 'c0'" in by_case["c0"]
    assert "c2.png: is empty (0 bytes)" in by_case["c2"]
    assert "c3.png" in by_case["c3"] and ("corrupt" in by_case["c3"] or "not an image" in by_case["c3"])
    assert "c4.png" in by_case["c4"] and "colour" in by_case["c4"].lower()


def test_label_counts_per_source(two_task):
    info, records = open_dataset(two_task)
    assert label_counts(info, records) == [
        SourceCounts("A", images=3, masks=2, classes={"normal": 1, "opacity": 1}, unlabelled=1),
        SourceCounts("B", images=1, masks=0, classes={"normal": 0, "opacity": 1}, unlabelled=0),
        SourceCounts(None, images=1, masks=1, classes={"normal": 0, "opacity": 0}, unlabelled=0),
    ]
    plain = DatasetInfo(name="p", modalities=("xray",))
    recs = [CaseRecord("a", {}, target=2), CaseRecord("b", {}, target=0), CaseRecord("c", {})]
    assert label_counts(plain, recs) == [SourceCounts(None, images=3, masks=0, classes={"0": 1, "2": 1},
                                                      unlabelled=1)]


def test_data_check_command_prints_the_table_per_source(two_task):
    from medmodal.cli import app

    result = CliRunner().invoke(app, ["data", "check", str(two_task)], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["source", "images", "masks", "class", "normal", "class", "opacity", "unlabelled"] in lines
    assert ["A", "3", "2", "1", "1", "1"] in lines and ["B", "1", "0", "0", "1", "0"] in lines
    assert ["(none)", "1", "1", "0", "0", "0"] in lines and ["all", "5", "3", "1", "2", "1"] in lines
    (two_task / "img" / "c2.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["data", "check", str(two_task)], terminal_width=200)
    assert result.exit_code == 2 and "c2" in result.output and "is empty" in result.output


def test_data_phantom_command_writes_the_chest_phantom_and_refuses_brain_options(tmp_path):
    from medmodal.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "phantom", "--kind", "chest_xray", "--out", str(tmp_path / "c"),
                                 "--cases", "4", "--size", "16", "--sources", "A,C"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert [r.source for r in open_dataset(tmp_path / "c")[1]] == ["A", "C", "A", "C"]
    for args, message in [(["--kind", "chest_xray", "--dims", "3"], "--dims: not an option of the chest_xray"),
                          (["--kind", "chest_xray", "--missing-rate", "0.2", "--layout", "nnunet"],
                           "--missing-rate, --layout: not an option"),
                          (["--sources", "3"], "--sources: only the chest_xray phantom has sources"),
                          (["--kind", "lungs"], "--kind: expected brain or chest_xray"),
                          (["--kind", "chest_xray", "--sources", "A,Q"], "--sources A,Q: chest phantom sources")]:
        result = runner.invoke(app, ["data", "phantom", "--out", str(tmp_path / "x"), *args], terminal_width=200)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert not (tmp_path / "x").exists()
