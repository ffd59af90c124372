"""The method contract: every registered method, in every spatial dimension it declares, trains, resumes,
evaluates and predicts through the ``medmodal`` command on its plug-in's tiny phantom recipe, and refuses bad
calls with exit code 2 and one line.

Runs are trained once per module (:func:`contract_run`) and shared by the tests below.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.engine.plugin import get_method, method_names
from medmodal.engine.runinfo import load_run

runner = CliRunner()

CASES = [(m, d) for m in method_names() for d in get_method(m).spatial_dims]
IDS = [f"{m}-{d}d" for m, d in CASES]


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def one_error_line(text: str) -> str:
    """The single non-empty output line of a refused call (asserts there is exactly one)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error:"), text
    return lines[0]


def ckpt_step(run: Path) -> int:
    return int(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"])


def metric_rows(run: Path) -> list[tuple[int, str, float]]:
    with (run / "metrics.csv").open(newline="", encoding="utf-8") as f:
        return [(int(r["step"]), r["name"], float(r["value"])) for r in csv.DictReader(f)]


@dataclass
class ContractRun:
    method: str
    dims: int
    root: Path
    run: Path
    step_after_train: int = 0
    metrics_after_train: list = field(default_factory=list)
    step_after_resume: int = 0

    @property
    def modalities(self) -> list[str]:
        return list(load_run(self.run).info.modalities)

    @property
    def input_modalities(self) -> list[str]:
        """The run's modalities when they are images of a phantom case; else (a pretraining method whose run
        names its stages, say) one phantom image to be refused with."""
        from medmodal.data.phantom import BRATS_MODALITIES

        mods = self.modalities
        return mods if set(mods) <= set(BRATS_MODALITIES) else [BRATS_MODALITIES[0]]


_RUNS: dict[tuple[str, int], ContractRun] = {}


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory: pytest.TempPathFactory):
    """``contract_run(method, dims)``: the method's contract recipe trained 3 steps, then resumed to 5 (cached)."""

    def get(method: str, dims: int) -> ContractRun:
        key = (method, dims)
        if key not in _RUNS:
            root = tmp_path_factory.mktemp(f"contract_{method}_{dims}d")
            recipe = get_method(method).contract_recipe(dims)
            assert recipe["data"]["phantom"]["spatial_dims"] == dims
            (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
            cr = ContractRun(method, dims, root, root / "run")
            code, text = invoke("train", root / "recipe.yaml", "--out", cr.run, "--set", "train.max_steps=3")
            assert code == 0, text
            cr.step_after_train = ckpt_step(cr.run)
            cr.metrics_after_train = metric_rows(cr.run)
            code, text = invoke("train", "--resume", cr.run, "--set", "train.max_steps=5")
            assert code == 0, text
            cr.step_after_resume = ckpt_step(cr.run)
            _RUNS[key] = cr
        return _RUNS[key]

    yield get
    _RUNS.clear()


def phantom_case(out: Path, dims: int, modalities: list[str], *, seed: int = 11) -> dict[str, Path]:
    """One phantom case of ``dims`` dimensions (a fresh one, not a training case): modality → file."""
    from medmodal.data.phantom import write_phantom

    root = write_phantom(out, cases=1, seed=seed, spatial_dims=dims, size=[17, 18, 19] if dims == 3 else [33, 34])
    files = {m: next(root.rglob(f"*_{m}.nii.gz")) for m in modalities}
    assert all(f.is_file() for f in files.values())
    return files


def image_args(files: dict[str, Path]) -> list[str]:
    return [x for m, f in files.items() for x in ("--image", f"{m}={f}")]


def metric_values(eval_dir: Path, prefix: str = "dice") -> list[float]:
    """Every value of a ``<prefix>*`` column in the evaluation's CSV files."""
    values = []
    for path in sorted(eval_dir.glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                values += [float(v) for k, v in row.items() if k.lower().startswith(prefix) and v not in ("", None)]
    return values


def offered(method: str, operation: str) -> bool:
    return get_method(method).offers(operation)


# -- train and resume -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "dims"), CASES, ids=IDS)
def test_train_then_resume_continues_the_same_run(contract_run, method: str, dims: int) -> None:
    cr = contract_run(method, dims)
    assert cr.step_after_train == 3
    assert cr.step_after_resume == 5
    info = load_run(cr.run).info
    assert info.method == method and info.spatial_dims == dims
    assert (cr.run / "weights" / "model.safetensors").is_file() and (cr.run / "split.json").is_file()
    rows = metric_rows(cr.run)
    keys = [(s, n) for s, n, _ in rows]
    assert len(keys) == len(set(keys)), "a (step, name) pair is written twice in metrics.csv"
    assert max(s for s, _, _ in rows) <= 5
    # the rows of the first 3 steps survive the resume unchanged, and include a validation value
    assert cr.metrics_after_train and set(cr.metrics_after_train) <= set(rows)
    assert any(s == 3 and n.startswith("val/") for s, n, _ in cr.metrics_after_train)
    assert all(math.isfinite(v) for _, _, v in rows)


# -- evaluate ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "dims"), CASES, ids=IDS)
def test_evaluate_reports_the_metrics_of_the_run(contract_run, method: str, dims: int) -> None:
    cr = contract_run(method, dims)
    code, text = invoke("evaluate", cr.run)
    assert code == 0, text
    eval_dir = cr.run / "eval"
    report = (eval_dir / "report.md").read_text(encoding="utf-8")
    assert str(cr.run) in report
    shown = {float(x) for x in re.findall(r"(?<![\d.])-?\d+\.\d{2,3}(?!\d)", report)}
    for prefix, (low, high) in get_method(method).evaluation_metrics.items():
        values = metric_values(eval_dir, prefix)
        assert values, f"no {prefix} column in {sorted(p.name for p in eval_dir.glob('*.csv'))}"
        assert all(math.isfinite(v) and low <= v <= high for v in values), (prefix, values[:10])
    # the report shows a value that the CSV files hold (formatted to 2 or 3 decimals)
    first = metric_values(eval_dir, next(iter(get_method(method).evaluation_metrics)))
    assert any(abs(v - s) <= 5e-3 for v in first for s in shown), (first[:10], sorted(shown)[:10])


# -- predict ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "dims"), CASES, ids=IDS)
def test_predict_lands_on_the_input_grid(contract_run, tmp_path: Path, method: str, dims: int) -> None:
    cr = contract_run(method, dims)
    files = phantom_case(tmp_path / "ph", dims, cr.input_modalities)
    if not offered(method, "predict"):  # e.g. a synthesis method: refused in one line, nothing written
        code, text = invoke("predict", cr.run, *image_args(files), "--out", tmp_path / "p")
        assert code == 2 and "predict is not offered" in one_error_line(text), text
        assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
        return
    code, text = invoke("predict", cr.run, *image_args(files), "--case-id", "new", "--out", tmp_path / "p")
    assert code == 0, text
    seg = nib.load(tmp_path / "p" / "new_seg.nii.gz")
    ref = nib.load(next(iter(files.values())))
    assert seg.shape == ref.shape
    assert np.allclose(seg.affine, ref.affine)
    assert np.isfinite(np.asanyarray(seg.dataobj)).all()


@pytest.mark.parametrize(("method", "dims"), [c for c in CASES if c[1] == 3], ids=[i for i, c in zip(IDS, CASES,
                                                                                                 strict=True)
                                                                                  if c[1] == 3])
def test_predict_on_a_permuted_oblique_grid(contract_run, tmp_path: Path, method: str, dims: int) -> None:
    cr = contract_run(method, dims)
    if not offered(method, "predict"):
        pytest.skip(f"{method} does not predict (test_predict_lands_on_the_input_grid checks the refusal)")
    files = phantom_case(tmp_path / "ph", dims, cr.modalities)
    rot = np.array([[0, 0.99, 0.14], [0, -0.14, 0.99], [1, 0, 0]])  # permuted axes + oblique
    aff = np.eye(4)
    aff[:3, :3] = rot * np.array([1.0, 1.2, 1.5])
    aff[:3, 3] = [10, -5, 3]
    moved = {}
    for mod, f in files.items():
        arr = np.transpose(np.asanyarray(nib.load(f).dataobj), (2, 0, 1))[::-1]
        moved[mod] = tmp_path / f"{mod}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), aff), moved[mod])
    code, text = invoke("predict", cr.run, *image_args(moved), "--case-id", "obl", "--out", tmp_path / "p")
    assert code == 0, text
    seg = nib.load(tmp_path / "p" / "obl_seg.nii.gz")
    assert seg.shape == (19, 17, 18)
    assert np.allclose(seg.affine, aff)


# -- refused calls ----------------------------------------------------------------------------------------------
def has_feature_picture(method: str) -> bool:
    from medmodal.engine.cases import CasesPlugin

    plugin = get_method(method)
    return isinstance(plugin, CasesPlugin) and type(plugin).feature_picture is not CasesPlugin.feature_picture


@pytest.mark.parametrize(("method", "dims"), CASES, ids=IDS)
def test_bad_calls_exit_2_with_one_line(contract_run, tmp_path: Path, method: str, dims: int) -> None:
    cr = contract_run(method, dims)
    ckpt = cr.run / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    if not has_feature_picture(method):
        code, text = invoke("evaluate", cr.run, "--features", "--out", tmp_path / "e")
        assert code == 2, text
        assert "--features" in one_error_line(text)
        assert not (tmp_path / "e" / "report.md").exists()
    files = phantom_case(tmp_path / "ph", dims, cr.input_modalities[:1])
    inference = "predict" if offered(method, "predict") else "synthesize"
    code, text = invoke(inference, cr.run, "--image", f"xyz={files[cr.input_modalities[0]]}", "--out",
                        tmp_path / "p")
    assert code == 2, text
    if offered(method, inference):
        assert "unknown modality name(s) ['xyz']" in text and str(cr.modalities) in text, text
    else:  # a pretraining method: neither predicts nor synthesises, refused before any input is read
        assert f"{inference} is not offered by method {method!r}" in one_error_line(text), text
    assert not (tmp_path / "p" / "case_seg.nii.gz").exists()
    code, text = invoke("train", "--resume", cr.run, "--set", "train.lr=1")
    assert code == 2, text
    assert "train.lr" in one_error_line(text)
    code, text = invoke("train", "--resume", cr.run, "--devices", "2")
    assert code == 2, text
    assert "train.devices=2" in one_error_line(text)
    assert ckpt.stat().st_mtime_ns == before and ckpt_step(cr.run) == 5  # the refused calls changed nothing


def test_predict_unknown_modality_is_one_line(contract_run, tmp_path: Path) -> None:
    cr = contract_run("zero_fill", 3)
    files = phantom_case(tmp_path / "ph", 3, ["t1"])
    code, text = invoke("predict", cr.run, "--image", f"xyz={files['t1']}", "--out", tmp_path / "p")
    assert code == 2
    assert "xyz" in one_error_line(text)


# -- the run folder is self-describing ------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "dims"), CASES, ids=IDS)
def test_run_works_after_the_phantom_cache_is_gone(contract_run, tmp_path: Path, monkeypatch, method: str,
                                                   dims: int) -> None:
    cr = contract_run(method, dims)
    # a fresh, empty cache: the generated phantom and every preprocessed array of the training are gone
    monkeypatch.setenv("MEDMODAL_CACHE", str(tmp_path / "empty_cache"))
    files = phantom_case(tmp_path / "ph", dims, cr.input_modalities)
    if offered(method, "predict"):
        code, text = invoke("predict", cr.run, *image_args(files), "--out", tmp_path / "p")
        assert code == 0, text
        assert nib.load(tmp_path / "p" / "case_seg.nii.gz").shape == nib.load(next(iter(files.values()))).shape
    if offered(method, "synthesize"):  # one modality given, the others synthesised onto its grid
        first = cr.modalities[0]
        code, text = invoke("synthesize", cr.run, "--image", f"{first}={files[first]}", "--out", tmp_path / "s")
        assert code == 0, text
        made = sorted((tmp_path / "s").rglob("*synthetic*.nii.gz"))
        assert len(made) == len(cr.modalities) - 1, made
        ref = nib.load(files[first])
        for f in made:
            img = nib.load(f)
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    code, text = invoke("evaluate", cr.run, "--out", tmp_path / "e")
    if code == 0:  # the phantom is regenerated from the recipe
        prefix, (low, high) = next(iter(get_method(method).evaluation_metrics.items()))
        values = metric_values(tmp_path / "e", prefix)
        assert values and all(low <= v <= high for v in values)
    else:
        assert code == 2 and "phantom" in one_error_line(text), text


def test_data_path_run_after_its_data_is_deleted(tmp_path: Path) -> None:
    """A run trained on a data folder predicts without it; evaluate names the missing folder in one line."""
    method = "zero_fill"
    data = tmp_path / "data"
    code, text = invoke("data", "phantom", "--out", data, "--cases", 4, "--dims", 3, "--size", 17, "--seed", 4)
    assert code == 0, text
    recipe = get_method(method).contract_recipe(3)
    recipe["data"] = {**{k: v for k, v in recipe["data"].items() if k != "phantom"}, "path": str(data),
                      "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25}
    recipe["train"].update(max_steps=1, val_every_steps=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    code, text = invoke("train", tmp_path / "recipe.yaml", "--out", run)
    assert code == 0, text
    keep = tmp_path / "keep"
    shutil.copytree(data / "phantom_001", keep)
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "cache")
    files = {m: keep / f"phantom_001_{m}.nii.gz" for m in load_run(run).info.modalities}
    code, text = invoke("predict", run, *image_args(files), "--out", tmp_path / "p")
    assert code == 0, text
    assert nib.load(tmp_path / "p" / "case_seg.nii.gz").shape == nib.load(files["t1"]).shape
    code, text = invoke("evaluate", run)
    assert code == 2, text
    assert str(data) in one_error_line(text)
    assert not (run / "eval" / "report.md").exists()


def test_every_method_declares_a_contract() -> None:
    assert len(CASES) >= len(method_names())
    for m in method_names():
        plugin = get_method(m)
        assert plugin.spatial_dims and set(plugin.spatial_dims) <= {2, 3}
        for d in plugin.spatial_dims:
            r = plugin.contract_recipe(d)
            assert r["method"]["name"] == m and r["train"]["accelerator"] == "cpu"
            assert r["data"]["phantom"]["size"] == ([17, 18, 19] if d == 3 else [33, 34])
    assert os.environ.get("MEDMODAL_CACHE")  # tests/conftest.py keeps generated data out of ~/.cache
