"""MultiMix through the ``medmodal`` command: train → evaluate (in-source and cross-source groups) → predict (PNG
and DICOM inputs land on their own pixel grid) on the chest X-ray phantom, the refused recipes and calls, and the
real-format path on the real chest X-ray JPEGs of pneumonia-model-package (classification only; no accuracy is
claimed). One tiny run is trained per module and shared.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from medmodal.cli import app

runner = CliRunner()
W, H = 37, 29  # a picture's width and height: odd and different, so a transposed grid shows


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def one_error_line(text: str) -> str:
    """The single ``error:`` line of a refused call; besides it only ``warning:`` lines (e.g. the phantom-trained
    model's) and nothing else."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1, text
    assert lines[0].startswith("error:"), text
    return lines[0]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def chest_recipe(**method: Any) -> dict[str, Any]:
    return {
        "name": "multimix_cli",
        "seed": 0,
        "data": {"phantom": {"kind": "chest_xray", "spatial_dims": 2, "cases": 40, "size": 32, "sources": 3},
                 "patch_size": [32, 32], "batch_size": 4, "val_fraction": 0.15, "num_workers": 0},
        "model": {"name": "multimix_unet_tiny", "kwargs": {}},
        "method": {"name": "multimix", "image_size": [32, 32], "seg_labels": 4, "cls_labels": 8,
                   "cross_sources": ["C"], "test_fraction": 0.2, "lr_decay": "cosine", **method},
        "train": {"max_steps": 4, "val_every_steps": 2, "checkpoint_every_steps": 2, "lr": 1e-3, "progress": False,
                  "accelerator": "cpu", "threads": 1},
    }


@pytest.fixture(scope="module")
def chest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``medmodal train`` + ``medmodal evaluate`` of the tiny chest recipe (the run folder; ``RUN/eval``)."""
    root = tmp_path_factory.mktemp("multimix_cli")
    (root / "recipe.yaml").write_text(yaml.safe_dump(chest_recipe()))
    code, text = invoke("train", root / "recipe.yaml", "--out", root / "run")
    assert code == 0, text
    code, text = invoke("evaluate", root / "run")
    assert code == 0, text
    return root / "run"


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A W×H 8-bit grey PNG with a bright, off-centre blob."""
    yy, xx = np.mgrid[:H, :W]
    a = 40 + 150 * np.exp(-((xx - 10) ** 2 + (yy - 18) ** 2) / 40.0)
    path = tmp_path_factory.mktemp("pictures") / "xray.png"
    Image.fromarray(a.astype(np.uint8)).save(path)
    return path


# -- evaluate ----------------------------------------------------------------------------------------------------
def test_evaluate_scores_in_source_and_cross_source_cases(chest_run: Path) -> None:
    split = json.loads((chest_run / "split.json").read_text(encoding="utf-8"))
    assert split["test"] and split["cross_source"]
    selected = json.loads((chest_run / "selected" / "selected.json").read_text(encoding="utf-8"))
    assert selected["rule"] == "validation" and selected["step"] in (2, 4)
    report = (chest_run / "eval" / "report.md").read_text(encoding="utf-8")
    assert "**Data: synthetic phantom**" in report
    assert "## Classification" in report and "## Segmentation" in report
    assert "| in-source test |" in report and "| cross-source |" in report
    assert f"step {selected['step']} (best validation score" in report
    rows = read_rows(chest_run / "eval" / "cases.csv")
    groups = {"in-source test": split["test"], "cross-source": split["cross_source"]}
    assert sorted((r["group"], r["case_id"]) for r in rows) == sorted((g, c) for g, ids in groups.items()
                                                                      for c in ids)
    assert {r["source"] for r in rows if r["group"] == "cross-source"} == {"C"}
    assert "C" not in {r["source"] for r in rows if r["group"] == "in-source test"}
    for r in rows:
        assert 0.0 <= float(r["dice_lung"]) <= 1.0
        assert r["correct"] in ("0", "1")
        assert r["true_class"] in ("normal", "opacity") and r["predicted_class"] in ("normal", "opacity")
        assert int(r["correct"]) == int(r["true_class"] == r["predicted_class"])
    summary = {(r["group"], r["metric"]): r for r in read_rows(chest_run / "eval" / "summary.csv")}
    for group in groups:
        mine = [r for r in rows if r["group"] == group]
        assert float(summary[(group, "accuracy")]["mean"]) == pytest.approx(
            np.mean([int(r["correct"]) for r in mine]), abs=1e-6)
        for metric in ("dice_lung", "jaccard_lung", "recall_lung"):
            s = summary[(group, metric)]
            assert float(s["mean"]) == pytest.approx(np.mean([float(r[metric]) for r in mine]), abs=1e-6)
            assert int(s["n"]) == len(mine)


# -- predict -----------------------------------------------------------------------------------------------------
def test_predict_png_lands_on_its_pixel_grid(chest_run: Path, picture: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    code, text = invoke("predict", chest_run, "--image", f"xray={picture}", "--case-id", "pic", "--out", out)
    assert code == 0, text
    with Image.open(out / "pic_seg.png") as seg_png:
        assert seg_png.size == (W, H)  # PIL (width, height)
        png = np.asarray(seg_png).T  # → (X, Y)
    seg = nib.load(out / "pic_seg.nii.gz")
    assert seg.shape == (W, H)
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), png)  # the same mask in both files
    assert set(np.unique(png)) <= {0, 1}
    sal = np.asanyarray(nib.load(out / "pic_saliency.nii.gz").dataobj)
    assert sal.shape == (W, H) and np.isfinite(sal).all() and sal.min() >= 0 and sal.max() > 0
    with Image.open(out / "pic_saliency.png") as picture_png:
        w, h = picture_png.size
        assert w / h == pytest.approx(W / H, rel=0.03)  # the picture keeps the input's aspect
    (row,) = read_rows(out / "predictions.csv")
    assert set(row) == {"case_id", "prediction", "probability", "p_normal", "p_opacity"}
    p = {c: float(row[f"p_{c}"]) for c in ("normal", "opacity")}
    assert sum(p.values()) == pytest.approx(1.0, abs=2e-6)
    assert row["prediction"] == max(p, key=p.get) and float(row["probability"]) == max(p.values())
    # existing outputs are refused in one line unless --overwrite
    before = (out / "predictions.csv").stat().st_mtime_ns
    code, text = invoke("predict", chest_run, "--image", f"xray={picture}", "--case-id", "pic", "--out", out)
    assert code == 2 and "--overwrite" in one_error_line(text)
    assert (out / "predictions.csv").stat().st_mtime_ns == before
    code, text = invoke("predict", chest_run, "--image", f"xray={picture}", "--case-id", "pic", "--out", out,
                        "--overwrite")
    assert code == 0, text
    assert read_rows(out / "predictions.csv") == [row]  # the same weights, the same answer


def test_predict_dicom_lands_on_its_grid(chest_run: Path, tmp_path: Path) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "x.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", H, W, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.3]
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (H, W)).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    code, text = invoke("predict", chest_run, "--image", f"xray={path}", "--case-id", "dcm", "--out", tmp_path / "p")
    assert code == 0, text
    assert nib.load(tmp_path / "p" / "dcm_seg.nii.gz").shape == (W, H)
    sal = np.asanyarray(nib.load(tmp_path / "p" / "dcm_saliency.nii.gz").dataobj)
    assert sal.shape == (W, H) and np.isfinite(sal).all() and sal.min() >= 0
    assert not (tmp_path / "p" / "dcm_seg.png").exists()  # PNG outputs only for picture inputs
    assert [r["case_id"] for r in read_rows(tmp_path / "p" / "predictions.csv")] == ["dcm"]


# -- refused recipes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "names"), [
    ("method.cross_sources=[Z]", ["method.cross_sources", "['Z']", "['A', 'B', 'C']"]),
    ("method.image_size=[32,32,32]", ["method.image_size", "3D", "2D"]),
    ("model.kwargs.segment=false", ["model.kwargs", "'segment'"]),
    ("method.seg_labels=500", ["method.seg_labels", "500"]),
], ids=["cross-source", "image-size", "kwargs", "budget"])
def test_bad_recipes_exit_2_with_one_line(chest_run: Path, tmp_path: Path, override: str, names: list[str]) -> None:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(chest_recipe()))
    code, text = invoke("train", tmp_path / "recipe.yaml", "--out", tmp_path / "run", "--set", override)
    assert code == 2, text
    line = one_error_line("\n".join(x for x in text.splitlines() if not x.startswith("INFO")))
    assert all(n in line for n in names), line
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- real chest X-rays -------------------------------------------------------------------------------------------
def real_jpegs() -> list[Path]:
    spec = importlib.util.find_spec("pneumonia_model_package")  # finds the folder, never imports it
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "pneumonia-data" / "val"
    return sorted(folder.glob("*.jpeg"))


def test_real_chest_xray_jpegs_train_evaluate_and_predict(tmp_path: Path) -> None:
    files = real_jpegs()
    if not files:
        pytest.skip("pneumonia-model-package's chest X-ray JPEGs are not installed (make install adds them)")
    data = tmp_path / "kermany"
    data.mkdir()
    rows = []
    for i, f in enumerate(files):
        target = "normal" if f.name.startswith("NORMAL") else "pneumonia" if "bacteria" in f.name else None
        assert target is not None, f.name
        rows.append([f"x{i:02d}", str(f), target, "kermany"])
    with (data / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["case_id", "xray", "target", "source"], *rows])
    (data / "medmodal.json").write_text(json.dumps({"modalities": ["xray"], "classes": ["normal", "pneumonia"]}))
    recipe = {"name": "kermany", "seed": 0,
              "data": {"path": str(data / "manifest.csv"), "patch_size": [48, 48], "batch_size": 4,
                       "val_fraction": 0.2, "num_workers": 0},
              "model": {"name": "multimix_unet_tiny"},  # the generic default model.kwargs are not passed on
              "method": {"name": "multimix", "variant": "enc", "image_size": [48, 48], "test_fraction": 0.25,
                         "lr_decay": "none"},
              "train": {"max_steps": 3, "val_every_steps": 3, "checkpoint_every_steps": 3, "progress": False,
                        "accelerator": "cpu", "threads": 1}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    code, text = invoke("train", tmp_path / "recipe.yaml", "--out", run)
    assert code == 0, text
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    assert len(split["test"]) == 4 and split["cross_source"] == []
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["task"]["regions"] == {} and info["task"]["class_names"] == ["normal", "pneumonia"]
    code, text = invoke("evaluate", run)
    assert code == 0, text
    report = (run / "eval" / "report.md").read_text(encoding="utf-8")
    assert "## Classification" in report and "f1_pneumonia" in report and "## Segmentation" not in report
    assert "synthetic phantom" not in report
    cases = read_rows(run / "eval" / "cases.csv")
    assert sorted(r["case_id"] for r in cases) == sorted(split["test"])
    assert all(r["true_class"] in ("normal", "pneumonia") and r["correct"] in ("0", "1") for r in cases)
    jpeg = files[0]
    code, text = invoke("predict", run, "--image", f"xray={jpeg}", "--case-id", "real", "--out", tmp_path / "p")
    assert code == 0, text
    assert "synthetic" not in text
    with Image.open(jpeg) as im:
        size = im.size  # (width, height) = (X, Y)
    sal = np.asanyarray(nib.load(tmp_path / "p" / "real_saliency.nii.gz").dataobj)
    assert sal.shape == size and np.isfinite(sal).all() and sal.min() >= 0 and sal.max() > 0
    with Image.open(tmp_path / "p" / "real_saliency.png") as pic:
        assert pic.size[0] / pic.size[1] == pytest.approx(size[0] / size[1], rel=0.03)
    assert not (tmp_path / "p" / "real_seg.nii.gz").exists()  # a classifier-only model writes no mask
    (row,) = read_rows(tmp_path / "p" / "predictions.csv")
    assert row["prediction"] in ("normal", "pneumonia")
    assert float(row["p_normal"]) + float(row["p_pneumonia"]) == pytest.approx(1.0, abs=2e-6)
