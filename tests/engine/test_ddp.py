"""Two CPU processes (DDP over gloo) train every registered method as one process would.

Each method's 3D contract recipe is trained with ``medmodal train --devices 2`` in a subprocess (Lightning
launches the second process). The ranks must stay in sync, agree on the validation metrics, and those metrics
must equal a one-process validation of the final weights on the same cases; the run folder is written by rank 0
alone. The runs start together (module fixture) so that the file takes the time of the slowest run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from medmodal.engine.plugin import get_method, method_names
from medmodal.engine.recipe import load_recipe

#: a DeepSTAPLE epoch is one pass over its 6 training labels (3 batches of 2) and it validates once per epoch,
#: so 3 steps end every method's run with a validation
MAX_STEPS = 3
TIMEOUT = 300


def _recipe(method: str, **train: Any) -> dict[str, Any]:
    recipe = get_method(method).contract_recipe(3)
    recipe["train"].update({"max_steps": MAX_STEPS, "val_every_steps": MAX_STEPS, "checkpoint_every_steps": 2,
                            "accelerator": "cpu", "threads": 1, "progress": False, **train})
    return recipe


def _loss_recipe() -> dict[str, Any]:
    """zero_fill with every modality and a per-sample loss (BCE): the mean of the ranks' losses over their
    halves of a batch is then the one-process loss of the whole batch, if the ranks see the same samples."""
    recipe = _recipe("zero_fill", max_steps=1, val_every_steps=1)
    recipe["method"].update(modality_dropout=0.0, lambda_dice=0.0, lambda_bce=1.0)
    return recipe


class Launch:
    def __init__(self, root: Path, name: str, recipe: dict[str, Any], devices: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.run = root / "run"
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        env.pop("MASTER_PORT", None)  # each launch picks its own free port
        cmd = [sys.executable, "-m", "medmodal.cli", "train", str(root / "recipe.yaml"), "--out", str(self.run),
               "--devices", str(devices)]
        self.name = name
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=root, start_new_session=True)
        self.returncode: int | None = None
        self.output = ""

    def wait(self) -> None:
        try:
            self.output, _ = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and the rank it started (its own session)
            self.output = self.proc.communicate()[0] + f"\n[timed out after {TIMEOUT} s]"
        self.returncode = self.proc.returncode


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Launch]:
    root = tmp_path_factory.mktemp("ddp")
    runs = {m: Launch(root / m, m, _recipe(m), devices=2) for m in method_names()}
    runs["loss@1"] = Launch(root / "loss1", "loss@1", _loss_recipe(), devices=1)
    runs["loss@2"] = Launch(root / "loss2", "loss@2", _loss_recipe(), devices=2)
    for launch in runs.values():
        launch.wait()
    return runs


def _metrics(run: Path) -> list[tuple[int, str, float]]:
    with (run / "metrics.csv").open(newline="") as f:
        return [(int(r["step"]), r["name"], float(r["value"])) for r in csv.DictReader(f)]


def _one_process_validation(run: Path) -> dict[str, float]:
    """The run's validation recomputed in this process (world size 1) with the final weights of ``last.ckpt``."""
    from medmodal.engine.run import quiet_third_party

    quiet_third_party()
    recipe = load_recipe(run / "recipe.yaml")
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"devices": 1, "num_nodes": 1})})
    built = get_method(recipe.method.name).build(recipe)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    built.system.load_state_dict(state)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, enable_checkpointing=False)
    (metrics,) = trainer.validate(built.system, datamodule=built.data, verbose=False)
    assert built.data.val_ids == json.loads((run / "split.json").read_text())["val"]
    return {k: float(v) for k, v in metrics.items() if k.startswith("val/")}


@pytest.mark.parametrize("method", method_names())
def test_two_processes_train_as_one(launches: dict[str, Launch], method: str) -> None:
    launch = launches[method]
    assert launch.returncode == 0, launch.output[-4000:]
    run = launch.run

    # the ranks stayed in sync and agree on the reduced validation metrics
    doc = json.loads((run / "distributed.json").read_text())
    assert doc["world_size"] == 2 and [r["rank"] for r in doc["ranks"]] == [0, 1]
    r0, r1 = doc["ranks"]
    assert r0["parameter_checksum"] == r1["parameter_checksum"]
    assert r0["parameter_abs_sum"] == r1["parameter_abs_sum"] > 0
    assert r0["val"] and r0["val"] == r1["val"]

    # the reduced metrics are those of one process validating the same weights on the same cases
    single = _one_process_validation(run)
    assert set(single) == set(r0["val"])
    for name, value in r0["val"].items():
        assert value == pytest.approx(single[name], abs=1e-5), name

    # same cadence as one process: max_steps optimiser steps, a validation at the end
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)["global_step"] == MAX_STEPS
    rows = _metrics(run)
    assert max(s for s, _, _ in rows) == MAX_STEPS
    keys = [(s, n) for s, n, _ in rows]
    assert len(keys) == len(set(keys))
    logged_val = {n: v for s, n, v in rows if s == MAX_STEPS and n.startswith("val/")}
    assert logged_val, f"no validation at step {MAX_STEPS}: {sorted({(s, n) for s, n, _ in rows})}"
    assert logged_val == pytest.approx(r0["val"], abs=1e-6)

    # rank 0 alone wrote the run folder
    files = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()]
    assert not [f for f in files if re.search(r"rank_?\d|_1\.|\.1$|-v\d", f)], files
    log = (run / "log.txt").read_text(encoding="utf-8")
    assert "GLOBAL_RANK: 0" in log and "GLOBAL_RANK: 1" not in log
    records = [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line) for line in log.splitlines()
               if re.match(r"^\d{4}-\d\d-\d\d ", line)]
    assert records, log
    dup = [line for line, n in Counter(records).items() if n > 1]
    assert not dup, dup


def test_same_samples_per_step_on_one_or_two_processes(launches: dict[str, Launch]) -> None:
    one, two = launches["loss@1"], launches["loss@2"]
    assert one.returncode == 0, one.output[-4000:]
    assert two.returncode == 0, two.output[-4000:]
    loss = [{n: v for s, n, v in _metrics(x.run) if s == 1}["train/loss"] for x in (one, two)]
    # train/loss is logged with sync_dist: the mean over ranks of each rank's loss on its share of the global
    # batch. With a per-sample loss (BCE, no modality dropout) that is the one-process loss of the same batch only
    # if the two ranks together saw exactly the samples one process saw at step 1.
    assert loss[1] == pytest.approx(loss[0], rel=1e-5, abs=1e-6), loss
    ckpt = [torch.load(x.run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False) for x in (one, two)]
    assert ckpt[0]["global_step"] == ckpt[1]["global_step"] == 1
    # ...and after the step on the same batch (averaged gradients) the weights agree too
    for k, v in ckpt[0]["state_dict"].items():
        assert torch.allclose(v, ckpt[1]["state_dict"][k], atol=1e-5), k
