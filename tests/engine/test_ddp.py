"""Two CPU processes (DDP over gloo) train the same recipe and agree on the reduced metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


@pytest.mark.slow
def test_two_process_ddp_metrics_agree(tmp_path: Path, tiny_recipe_dict) -> None:
    recipe = tiny_recipe_dict(3, max_steps=4, val_every_steps=2, accelerator="cpu", threads=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "medmodal.cli", "train", str(tmp_path / "recipe.yaml"),
           "--out", str(tmp_path / "run"), "--devices", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((tmp_path / "run" / "logs" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] and set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        assert ranks[0][key] == pytest.approx(ranks[1][key], abs=1e-6), key
    assert (tmp_path / "run" / "weights" / "model.safetensors").is_file()
