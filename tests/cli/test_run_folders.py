"""Run folders through the `medmodal` command: --overwrite and --resume safety, relative paths, and evaluate /
predict of every method once the training data is gone."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import nibabel as nib
import pytest
import torch
import yaml
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.engine.recipe import recipe_from_dict, resolve_paths

runner = CliRunner()


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, re.sub(r"\s+", " ", result.output)


def one_line_error(*args: str | Path) -> str:
    """The message of a command that must fail with exit 2 and one line on stderr (no traceback)."""
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=10_000)
    assert result.exit_code == 2, result.output + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _recipe(method: dict, model: dict | None = None, **data: object) -> dict:
    return {
        "name": f"rf_{method['name']}",
        "data": {"path": "data", "cache_dir": "cache", "patch_size": [24, 24], "batch_size": 2,
                 "val_fraction": 0.34, "num_workers": 0, **data},
        "model": model or {"name": "unet", "kwargs": {"channels": [4, 8]}},
        "method": method,
        "train": {"max_steps": 3, "val_every_steps": 3, "checkpoint_every_steps": 1, "progress": False,
                  "threads": 1, "schedule": "constant"},
        "eval": {"overlap": 0.0, "sw_batch_size": 1},
    }


SHASPEC = {"name": "shaspec", "kwargs": {"channels": [4, 8]}}
RECIPES = {
    "zero_fill": _recipe({"name": "zero_fill"}),
    "shaspec": _recipe({"name": "shaspec"}, SHASPEC),
    "shaspec_cls": _recipe({"name": "shaspec", "task": "classification"},
                           {"name": "shaspec", "kwargs": {"channels": [4, 8], "num_classes": 2, "norm": "batch"}}),
    "deepstaple": _recipe({"name": "deepstaple", "candidates": {"noise": {"labels_per_target": 2, "seed": 0}}},
                          modalities=["t2"]),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folders")
    for name, cases, seed in (("data", 6, 3), ("other", 3, 5)):
        code, text = invoke("data", "phantom", "--out", root / name, "--cases", cases, "--dims", 2, "--size", 33,
                            "--seed", seed)
        assert code == 0, text
    shutil.copytree(root / "data", root / "kept")
    return root


@pytest.fixture(scope="module")
def gone(root: Path) -> dict[str, Path]:
    """One run of each method trained from ``root`` with relative paths; then their data set is deleted."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, recipe in RECIPES.items():
            Path(f"{name}.yaml").write_text(yaml.safe_dump(recipe))
            code, text = invoke("train", f"{name}.yaml", "--out", f"runs/{name}")
            assert code == 0, (name, text)
    shutil.rmtree(root / "data")
    return {name: root / "runs" / name for name in RECIPES}


@pytest.fixture(scope="module")
def kept(root: Path) -> Path:
    """A zero-fill run trained from ``root/a`` with relative data.path and cache_dir; its data stays."""
    (root / "a").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "a")
        recipe = _recipe({"name": "zero_fill"}, path="../kept", cache_dir="../kept_cache")
        Path("r.yaml").write_text(yaml.safe_dump(recipe))
        code, text = invoke("train", "r.yaml", "--out", "run")
        assert code == 0, text
    return root / "a" / "run"


# -- relative paths ---------------------------------------------------------------------------------------------
def test_relative_paths_are_stored_resolved_and_the_run_works_from_any_folder(kept: Path, root: Path,
                                                                              monkeypatch) -> None:
    stored = yaml.safe_load((kept / "recipe.yaml").read_text())
    assert stored["data"]["path"] == str((root / "kept").resolve())
    assert stored["data"]["cache_dir"] == str((root / "kept_cache").resolve())
    (root / "b").mkdir(exist_ok=True)
    monkeypatch.chdir(root / "b")
    code, text = invoke("evaluate", "../a/run", "--out", "ev")
    assert code == 0, text
    assert (root / "b" / "ev" / "report.md").is_file()
    code, text = invoke("predict", "../a/run", "--data", "../other", "--out", "pred")
    assert code == 0, text
    assert len(list((root / "b" / "pred").glob("*_seg.nii.gz"))) == 3


def test_method_paths_are_resolved(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(_recipe({"name": "deepstaple", "candidates": {"manifest": "reg/manifest.csv"}}))
    resolved = resolve_paths(recipe)
    assert resolved.method.candidates.manifest == tmp_path.resolve() / "reg" / "manifest.csv"
    assert resolved.data.path == tmp_path.resolve() / "data"


# -- evaluate / predict without the training data --------------------------------------------------------------
@pytest.mark.parametrize("name", ["zero_fill", "shaspec", "deepstaple"])
def test_segmentation_predict_without_training_data(gone: dict[str, Path], root: Path, tmp_path, name) -> None:
    code, text = invoke("predict", gone[name], "--data", root / "other", "--out", tmp_path / "p")
    assert code == 0, text
    for case in sorted((root / "other").glob("phantom_*")):
        seg = nib.load(tmp_path / "p" / f"{case.name}_seg.nii.gz")
        ref = nib.load(case / f"{case.name}_t2.nii.gz")
        assert seg.shape == ref.shape and torch.allclose(torch.tensor(seg.affine), torch.tensor(ref.affine))


def test_classification_predict_without_training_data(gone: dict[str, Path], root: Path, tmp_path) -> None:
    code, text = invoke("predict", gone["shaspec_cls"], "--data", root / "other", "--out", tmp_path / "p")
    assert code == 0, text
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    assert sorted(r["case_id"] for r in rows) == sorted(p.name for p in (root / "other").glob("phantom_*"))
    for r in rows:
        probs = [float(v) for k, v in r.items() if k.startswith("p_")]
        assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-4, r


@pytest.mark.parametrize("name", list(RECIPES))
def test_evaluate_without_training_data_names_it(gone: dict[str, Path], root: Path, name: str) -> None:
    text = one_line_error("evaluate", gone[name], "--out", root / f"ev_{name}")
    assert "data.path" in text and str((root / "data").resolve()) in text, text
    if name != "deepstaple":  # DeepSTAPLE evaluates its own candidate labels: no --data to suggest
        assert "--data" in text


@pytest.mark.parametrize("name", ["zero_fill", "shaspec", "shaspec_cls"])
def test_evaluate_on_other_data(gone: dict[str, Path], root: Path, name: str) -> None:
    code, text = invoke("evaluate", gone[name], "--data", root / "other", "--out", root / f"ev_other_{name}")
    assert code == 0, text
    assert (root / f"ev_other_{name}" / "report.md").is_file()


def test_a_run_without_run_json_is_a_one_line_error(gone: dict[str, Path], root: Path, tmp_path) -> None:
    old = tmp_path / "old"
    shutil.copytree(gone["zero_fill"], old)
    (old / "run.json").unlink()
    for args in (["evaluate", old], ["predict", old, "--data", root / "other", "--out", tmp_path / "p"]):
        text = one_line_error(*args)
        assert "run.json" in text and "older medmodal" in text, text


# -- --overwrite ------------------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_that_is_not_a_run(kept: Path, tmp_path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    code, text = invoke("train", kept / "recipe.yaml", "--out", tmp_path / "mine", "--overwrite")
    assert code == 2 and "only a medmodal run folder" in text, text
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_the_working_folder_and_its_parents(kept: Path, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(kept, run)
    before = _files(run)
    monkeypatch.chdir(run)
    code, text = invoke("train", run / "recipe.yaml", "--out", ".", "--overwrite")
    assert code == 2 and "working folder" in text, text
    monkeypatch.chdir(run / "checkpoints")
    code, text = invoke("train", run / "recipe.yaml", "--out", "..", "--overwrite")
    assert code == 2 and "working folder" in text, text
    assert _files(run) == before


def test_overwrite_validates_the_recipe_before_deleting(kept: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(kept, run)
    before = _files(run)
    code, text = invoke("train", run / "recipe.yaml", "--out", run, "--overwrite", "--set", "model.name=typo")
    assert code == 2 and "typo" in text, text
    assert _files(run) == before


# -- --resume -----------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the run was copied to another folder
def test_resume_refuses_changes_and_applies_safe_ones(kept: Path, root: Path, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(kept, run)
    monkeypatch.chdir(tmp_path)  # another folder than the one it was trained from
    before = _files(run)
    for args, message in (
        (["--set", "train.lr=0.1"], "cannot change train.lr"),
        (["--devices", "2"], "train.devices=2"),
        (["--set", "data.path=elsewhere"], "cannot change data.path"),
        (["quickstart"], "drop the recipe argument"),
        (["--out", tmp_path / "x"], "drop --out"),
    ):
        code, text = invoke("train", "--resume", run, *args)
        assert code == 2 and message in text, (args, text)
    assert _files(run) == before
    code, text = invoke("train", "--resume", run, "--set", "train.max_steps=5", "--set", "eval.overlap=0.1")
    assert code == 0, text
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    assert stored["train"]["max_steps"] == 5 and stored["eval"]["overlap"] == 0.1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
