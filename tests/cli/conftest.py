"""A tiny phantom data set and a tiny trained run shared by the command-line tests of this folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """5 synthetic phantom cases, 17³ voxels, BraTS layout."""
    out = tmp_path_factory.mktemp("tiny") / "phantom"
    code, text = run_cli("data", "phantom", "--out", out, "--cases", 5, "--dims", 3, "--size", 17, "--seed", 4)
    assert code == 0, text
    return out


@pytest.fixture(scope="session")
def tiny_recipe_file(tmp_path_factory, tiny_phantom: Path) -> Path:
    """A recipe of two modalities written ``T1ce`` and ``T2`` (normalised to t1c, t2) that trains in seconds."""
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "two_modalities",
        "data": {"path": str(tiny_phantom), "modalities": ["T1ce", "T2"], "patch_size": [16, 16, 16],
                 "batch_size": 2, "val_fraction": 0.4, "num_workers": 0},
        "model": {"name": "unet", "kwargs": {"channels": [4, 8]}},
        "train": {"max_steps": 2, "val_every_steps": 2, "checkpoint_every_steps": 2, "progress": False},
        "eval": {"overlap": 0.0, "sw_batch_size": 1},
    }))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_recipe_file: Path) -> Path:
    """A t1c + t2 model trained for 2 steps on the synthetic phantom."""
    out = tmp_path_factory.mktemp("tinyrun") / "run"
    code, text = run_cli("train", tiny_recipe_file, "--out", out)
    assert code == 0, text
    return out


@pytest.fixture(scope="session")
def tiny_m2dn_run(tmp_path_factory) -> Path:
    """An M2DN model (method m2dn's 3D contract recipe) trained for 2 steps on the synthetic phantom."""
    import yaml

    from medmodal.engine.plugin import get_method

    root = tmp_path_factory.mktemp("tinym2dn")
    recipe = get_method("m2dn").contract_recipe(3)
    recipe["train"].update(max_steps=2, val_every_steps=2)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, text = run_cli("train", root / "recipe.yaml", "--out", root / "run")
    assert code == 0, text
    return root / "run"
