"""The `medmodal` command end to end on a tiny phantom, and its errors on bad input."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.methods.shaspec.quickstart import read_summary

runner = CliRunner()


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, re.sub(r"\s+", " ", result.output)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "phantom"
    code, text = invoke("data", "phantom", "--out", out, "--cases", 6, "--dims", 3, "--size", 20, "--seed", 3)
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, phantom: Path) -> Path:
    root = tmp_path_factory.mktemp("run")
    recipe = {
        "name": "cli_tiny",
        "data": {"path": str(phantom), "patch_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.34,
                 "num_workers": 0},
        "model": {"name": "unet", "kwargs": {"channels": [4, 8]}},
        "train": {"max_steps": 4, "val_every_steps": 2, "checkpoint_every_steps": 2, "progress": False},
        "eval": {"overlap": 0.0},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, text = invoke("train", root / "recipe.yaml", "--out", root / "run")
    assert code == 0, text
    return root / "run"


def test_help_of_every_command() -> None:
    for cmd in ([], ["quickstart"], ["data"], ["data", "phantom"], ["data", "check"], ["data", "convert"],
                ["train"], ["evaluate"], ["predict"]):
        code, text = invoke(*cmd, "--help")
        assert code == 0 and "Usage" in text, cmd


def test_data_check_passes_then_lists_every_problem(phantom: Path, tmp_path: Path) -> None:
    code, text = invoke("data", "check", phantom)
    assert code == 0, text
    assert "6 case(s)" in text and "0 error(s)" in text
    bad = tmp_path / "bad"
    shutil.copytree(phantom, bad)
    # a truncated file in one case, NaNs in another
    f = bad / "phantom_000" / "phantom_000_t2.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    g = bad / "phantom_001" / "phantom_001_flair.nii.gz"
    img = nib.load(g)
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), g)
    code, text = invoke("data", "check", bad)
    assert code == 2
    assert "phantom_000_t2.nii.gz" in text and "phantom_001_flair.nii.gz" in text
    assert "2 error(s)" in text


def test_data_convert_round_trip(phantom: Path, tmp_path: Path) -> None:
    code, text = invoke("data", "convert", phantom, tmp_path / "nn", "--to", "nnunet")
    assert code == 0, text
    assert (tmp_path / "nn" / "dataset.json").is_file()
    code, text = invoke("data", "check", tmp_path / "nn")
    assert code == 0 and "6 case(s)" in text, text
    code, text = invoke("data", "convert", phantom, tmp_path / "nn", "--to", "nnunet")
    assert code == 2 and "overwrite" in text


def test_train_evaluate_predict(trained_run: Path, phantom: Path, tmp_path: Path) -> None:
    code, text = invoke("evaluate", trained_run)
    assert code == 0, text
    rows = (trained_run / "eval" / "subsets.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 15 * 3  # header + 2 validation cases × 15 subsets × 3 regions
    report = (trained_run / "eval" / "report.md").read_text()
    assert "synthetic phantom" in report.lower() and "t1+t1c+t2+flair" in report
    assert (trained_run / "eval" / "dice_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    code, text = invoke("evaluate", trained_run)
    assert code == 2 and "--overwrite" in text
    code, text = invoke("evaluate", trained_run, "--overwrite", "--split", "all")
    assert code == 0, text
    assert len((trained_run / "eval" / "subsets.csv").read_text().splitlines()) == 1 + 6 * 15 * 3

    code, text = invoke("predict", trained_run, "--data", phantom, "--out", tmp_path / "pred")
    assert code == 0, text
    seg = nib.load(tmp_path / "pred" / "phantom_002_seg.nii.gz")
    ref = nib.load(phantom / "phantom_002" / "phantom_002_t1.nii.gz")
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 4}
    # outputs are not overwritten unless asked
    code, text = invoke("predict", trained_run, "--data", phantom, "--out", tmp_path / "pred")
    assert code == 2 and "--overwrite" in text


def test_predict_single_case_on_an_oblique_permuted_grid(trained_run: Path, phantom: Path, tmp_path: Path) -> None:
    """Outputs land on the input's own grid, whatever its orientation."""
    rot = np.array([[0, 0.99, 0.14], [0, -0.14, 0.99], [1, 0, 0]])  # permuted axes + oblique
    args = []
    for mod in ("t1c", "flair"):  # only two modalities: the others are missing
        img = nib.load(phantom / "phantom_004" / f"phantom_004_{mod}.nii.gz")
        arr = np.transpose(np.asanyarray(img.dataobj), (2, 0, 1))[::-1]
        aff = np.eye(4)
        aff[:3, :3] = rot * np.array([1.0, 1.2, 1.5])
        aff[:3, 3] = [10, -5, 3]
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), aff), tmp_path / f"{mod}.nii.gz")
        args += ["--image", f"{mod}={tmp_path / f'{mod}.nii.gz'}"]
    code, text = invoke("predict", trained_run, *args, "--case-id", "oblique", "--out", tmp_path / "p")
    assert code == 0, text
    seg = nib.load(tmp_path / "p" / "oblique_seg.nii.gz")
    ref = nib.load(tmp_path / "flair.nii.gz")
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)


def test_predict_from_nrrd_and_mha_lands_on_their_grids(trained_run: Path, phantom: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    from medmodal.data.io import read_image

    args = []
    for mod, ext in (("t2", ".nrrd"), ("flair", ".mha")):
        img = sitk.ReadImage(str(phantom / "phantom_005" / f"phantom_005_{mod}.nii.gz"))
        img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rotated in-plane
        img.SetOrigin((4.0, -2.0, 7.5))
        sitk.WriteImage(img, str(tmp_path / f"{mod}{ext}"))
        args += ["--image", f"{mod}={tmp_path / f'{mod}{ext}'}"]
    code, text = invoke("predict", trained_run, *args, "--case-id", "itk", "--out", tmp_path / "p")
    assert code == 0, text
    seg = nib.load(tmp_path / "p" / "itk_seg.nii.gz")
    ref = read_image(tmp_path / "t2.nrrd")
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "dwi={f}"], "unknown modality"),
        (["--image", "t1=/does/not/exist.nii.gz"], "not found"),
        ([], "either --data DIR or one or more --image"),
    ],
)
def test_predict_bad_inputs(trained_run: Path, phantom: Path, tmp_path: Path, args, message) -> None:
    f = phantom / "phantom_000" / "phantom_000_t1.nii.gz"
    args = [a.format(f=f) for a in args]
    code, text = invoke("predict", trained_run, *args, "--out", tmp_path / "p")
    assert code == 2 and message in text, text


def test_train_errors_name_the_problem(tmp_path: Path, phantom: Path) -> None:
    (tmp_path / "typo.yaml").write_text("train:\n  max_step: 3\n")
    code, text = invoke("train", tmp_path / "typo.yaml", "--out", tmp_path / "r")
    assert code == 2 and "train.max_step: unknown field" in text
    code, text = invoke("train", "no_such_recipe", "--out", tmp_path / "r")
    assert code == 2 and "no built-in recipe" in text
    (tmp_path / "mods.yaml").write_text(yaml.safe_dump(
        {"data": {"path": str(phantom), "modalities": ["t1", "pd"], "patch_size": [16, 16, 16]}}))
    code, text = invoke("train", tmp_path / "mods.yaml", "--out", tmp_path / "r")
    assert code == 2 and "data.modalities" in text and "pd" in text
    code, text = invoke("train", "--resume", tmp_path / "nothing")
    assert code == 2 and "nothing to resume" in text
    code, text = invoke("train", "quickstart", "--set", "train.max_steps", "--out", tmp_path / "r")
    assert code == 2 and "key=value" in text


def test_all_modalities_missing_is_a_clear_error(tmp_path: Path, phantom: Path) -> None:
    case = tmp_path / "ds" / "phantom_000"
    shutil.copytree(phantom / "phantom_000", case)
    for f in case.glob("*_t*.nii.gz"):
        f.unlink()
    (case / "phantom_000_flair.nii.gz").unlink()
    code, text = invoke("data", "check", tmp_path / "ds")
    assert code == 2 and "phantom_000" in text and "modalit" in text


def test_corrupt_gzip_is_named(trained_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti at all"))
    code, text = invoke("predict", trained_run, "--image", f"t1={bad}", "--out", tmp_path / "p")
    assert code == 2 and "x.nii.gz" in text, text
    assert not (tmp_path / "p" / "case_seg.nii.gz").exists()


def test_quickstart_fast_end_to_end(tmp_path: Path) -> None:
    code, text = invoke("quickstart", "--fast", "--out", tmp_path / "qs")
    assert code == 0, text
    report = (tmp_path / "qs" / "report.md").read_text()
    assert "synthetic phantom" in report.lower()
    assert report.count("\n| t1") >= 8  # the 15 subset rows (8 contain t1 first)
    assert "## ShaSpec against zero-fill U-Net, paired" in report  # the paired comparison (or why there is none)
    assert "ShaSpec − zero-fill U-Net (seeds ahead)" in report or "No seed where both runs learned" in report
    assert "## Runs that did not learn" in report and "parameters" in report and "GFLOP per training step" in report
    for name in ("dice_heatmap.png", "features.png", "training_curves_zero_fill.png", "training_curves_shaspec.png"):
        assert (tmp_path / "qs" / name).is_file() and name in report, name
    models = {r["model"] for r in read_summary(tmp_path / "qs" / "summary.csv")}
    assert models == {"zero-fill U-Net", "ShaSpec"}
    code, text = invoke("quickstart", "--fast", "--out", tmp_path / "qs")
    assert code == 2 and "--overwrite" in text


@pytest.mark.slow
def test_full_quickstart_learns(tmp_path: Path) -> None:
    """The main job as a user runs it: both models, 5 seeds; with all modalities every run must find the whole
    tumour (WT Dice > 0.7 on average over held-out cases) and no run may have collapsed on WT."""
    code, text = invoke("quickstart", "--out", tmp_path / "qs")
    assert code == 0, text
    rows = read_summary(tmp_path / "qs" / "subsets.csv")
    for model in ("zero-fill U-Net", "ShaSpec"):
        per_seed: dict[str, list[float]] = {}
        for r in rows:
            if r["model"].startswith(model + "@") and r["subset"] == "t1+t1c+t2+flair" and r["region"] == "WT":
                per_seed.setdefault(r["model"], []).append(float(r["dice"]))
        assert len(per_seed) == 5, per_seed.keys()
        learned = sum(sum(v) / len(v) > 0.7 for v in per_seed.values())
        assert learned == 5, (model, per_seed)
    report = (tmp_path / "qs" / "report.md").read_text(encoding="utf-8")
    assert "never finds WT" not in report
