"""The training engine: run folder contents, refusal to overwrite, resume after an interruption, 2D and 3D."""

from __future__ import annotations

import csv
import json
import os
import signal

import lightning as L
import pytest
import torch

from medmodal.engine.recipe import recipe_from_dict
from medmodal.engine.run import RunError, load_network
from medmodal.engine.train import train


class Crash(L.Callback):
    """Simulates Ctrl-C: sends SIGINT to this process once training reaches ``at`` steps."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.sent = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


class Fail(L.Callback):
    """Raises an error once training reaches ``at`` steps."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.at:
            raise RuntimeError("disk on fire")


class FirstStep(L.Callback):
    def __init__(self) -> None:
        self.first: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.first is None:
            self.first = trainer.global_step


@pytest.mark.parametrize("dims", [2, 3])
def test_train_writes_a_complete_run_folder(tmp_path, tiny_recipe_dict, dims: int) -> None:
    run = train(recipe_from_dict(tiny_recipe_dict(dims)), tmp_path / "run")
    for f in ("recipe.yaml", "split.json", "log.txt", "metrics.csv", "checkpoints/last.ckpt",
              "weights/model.safetensors", "weights/model.json"):
        assert (run / f).is_file(), f
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 4 and len(split["val"]) == 2 and not set(split["train"]) & set(split["val"])
    names = {row["name"] for row in csv.DictReader((run / "metrics.csv").open())}
    assert {"train/loss", "val/dice_WT", "val/dice_ET", "val/dice_mean"} <= names
    net = load_network(run / "weights")
    shape = (16, 16, 16) if dims == 3 else (24, 24)
    assert net(torch.zeros(2, 4, *shape), torch.ones(2, 4, dtype=torch.bool)).shape == (2, 3, *shape)
    assert not list(run.rglob("*.tmp")), "temporary files left behind"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_existing_run_is_not_overwritten(tmp_path, tiny_recipe) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("results")
    with pytest.raises(RunError, match="--resume.*--overwrite"):
        train(tiny_recipe, tmp_path / "run")
    assert (tmp_path / "run" / "precious.txt").exists()
    with pytest.raises(RunError, match="nothing to resume"):
        train(None, tmp_path / "run", resume=True)


def test_interrupted_run_resumes_and_finishes(tmp_path, tiny_recipe) -> None:
    run = tmp_path / "run"
    with pytest.raises(RunError, match="interrupted at step 4.*--resume"):
        train(tiny_recipe, run, callbacks=[Crash(at=4)])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    first = FirstStep()
    train(None, run, resume=True, callbacks=[first])
    assert first.first == 4, "the resumed run restarted instead of continuing"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open()) if r["name"] == "val/dice_mean"]
    assert steps == [3, 6]


def _weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "weights" / "model.safetensors"))


@pytest.mark.parametrize("method", ["zero_fill", "shaspec"])
@pytest.mark.parametrize("at", [3, 4], ids=["epoch-end", "mid-epoch"])
def test_interrupted_run_resumes_exactly(tmp_path, method: str, at: int) -> None:
    """Ctrl-C + --resume reaches the weights of the uninterrupted run: same batches, patches, RNG streams (the
    ShaSpec subset sampler draws from the per-rank generator restored from the checkpoint)."""
    from medmodal.engine.cases import tiny_case_recipe

    model = {"name": "shaspec", "kwargs": {"channels": [4, 8]}} if method == "shaspec" else None
    d = tiny_case_recipe(2, method={"name": method}, model=model)
    d["train"].update(max_steps=6, checkpoint_every_steps=2)  # val (an epoch) every 3 steps
    whole = train(recipe_from_dict(d), tmp_path / "whole")
    with pytest.raises(RunError, match=f"interrupted at step {at}"):
        train(recipe_from_dict(d), tmp_path / "cut", callbacks=[Crash(at=at)])
    cut = train(None, tmp_path / "cut", resume=True)
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
