"""``train.init_from`` / ``medmodal train --from RUN``: a new run starts from another run's weights (fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.engine.plugin import get_method

runner = CliRunner()


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def recipe_file(path: Path, **changes: object) -> Path:
    recipe = get_method("zero_fill").contract_recipe(3)
    recipe["train"].update(max_steps=2, val_every_steps=2, checkpoint_every_steps=2)
    for key, value in changes.items():
        section, field = key.split("__")
        recipe[section][field] = value
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("init_from")
    code, text = invoke("train", recipe_file(root / "a.yaml"), "--out", root / "a")
    assert code == 0, text
    return root / "a"


def test_a_new_run_starts_from_the_source_weights(source_run: Path, tmp_path: Path) -> None:
    # one step at a learning rate of 1e-12 leaves the weights where they started
    recipe = recipe_file(tmp_path / "b.yaml", train__max_steps=1, train__val_every_steps=1, train__lr=1e-12)
    code, text = invoke("train", recipe, "--out", tmp_path / "b", "--from", source_run)
    assert code == 0, text
    a = load_file(str(source_run / "weights" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "weights" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    info = json.loads((tmp_path / "b" / "run.json").read_text(encoding="utf-8"))["initialised_from"]
    assert info["run"] == str(source_run.resolve()) and info["loaded"] == info["total"] == len(a)
    assert info["not_loaded"] == [] and info["other_shape"] == []
    stored = yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text(encoding="utf-8"))
    assert stored["train"]["init_from"] == str(source_run.resolve())  # the run says where it started
    # without --from the same recipe starts elsewhere
    code, text = invoke("train", recipe, "--out", tmp_path / "c")
    assert code == 0, text
    c = load_file(str(tmp_path / "c" / "weights" / "model.safetensors"))
    assert not all(torch.allclose(a[k].float(), c[k].float(), atol=1e-6) for k in a)


def test_tensors_of_another_shape_keep_their_initialisation(source_run: Path, tmp_path: Path) -> None:
    recipe = recipe_file(tmp_path / "b.yaml", data__modalities=["t1", "flair"], train__max_steps=1,
                         train__val_every_steps=1, train__lr=1e-12)
    code, text = invoke("train", recipe, "--out", tmp_path / "b", "--from", source_run)
    assert code == 0, text
    info = json.loads((tmp_path / "b" / "run.json").read_text(encoding="utf-8"))["initialised_from"]
    assert info["other_shape"] and set(info["other_shape"]) == set(info["not_loaded"])
    assert 0 < info["loaded"] < info["total"]
    a = load_file(str(source_run / "weights" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "weights" / "model.safetensors"))
    for k in b:
        if k not in info["other_shape"]:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_bad_sources_are_one_line_errors(source_run: Path, tmp_path: Path) -> None:
    other = get_method("multimix").contract_recipe(3)  # another method and network: no name in common
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(other), encoding="utf-8")
    wider = tmp_path / "w.yaml"
    code, text = invoke("train", wider, "--out", tmp_path / "w", "--from", source_run)
    assert code == 2 and "train.init_from: no parameter of" in text, text
    assert not (tmp_path / "w").exists()
    code, text = invoke("train", wider, "--out", tmp_path / "x", "--from", tmp_path / "nowhere")
    assert code == 2 and "train.init_from" in text and "nowhere" in text, text
    code, text = invoke("train", "--resume", source_run, "--from", source_run)
    assert code == 2 and "--from" in text, text
