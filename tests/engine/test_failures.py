"""Training failures: a non-finite loss, gradient clipping, a failure before the first step, a killed process."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.data.case import DataError
from medmodal.engine.recipe import RecipeError, recipe_from_dict
from medmodal.engine.run import RunError
from medmodal.engine.train import train


class Poison(L.Callback):
    """Fills one network parameter with NaN just before step ``at`` + 1, keeping the bytes of ``last.ckpt``."""

    def __init__(self, at: int, ckpt: Path) -> None:
        self.at, self.ckpt = at, ckpt
        self.last_bytes: bytes | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.at:
            self.last_bytes = self.ckpt.read_bytes()
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path, tiny_recipe_dict) -> None:
    run = tmp_path / "run"
    poison = Poison(at=4, ckpt=run / "checkpoints" / "last.ckpt")
    with pytest.raises(RunError, match=r"not finite at step 5\b.*last good state.*step 4"):
        train(recipe_from_dict(tiny_recipe_dict(2)), run, callbacks=[poison])
    last = run / "checkpoints" / "last.ckpt"
    assert poison.last_bytes is not None and last.read_bytes() == poison.last_bytes, "last.ckpt was written over"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    failed = torch.load(run / "checkpoints" / "exception.ckpt", weights_only=False)
    assert not all(torch.isfinite(v).all() for v in failed["state_dict"].values() if v.is_floating_point())


class OptimizerGradNorm(L.Callback):
    """Records the global gradient norm the optimiser's ``step`` used (after Lightning's clipping).

    A step post-hook: Lightning runs the closure (forward, backward, clipping) inside ``optimizer.step``, and the
    gradients stay until the next step's closure zeroes them."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def hook(optimizer: torch.optim.Optimizer, *args: object) -> None:
            grads = [p.grad.detach().flatten() for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            self.norms.append(float(torch.cat(grads).norm()))

        for opt in trainer.optimizers:
            opt.register_step_post_hook(hook)


def test_gradient_clip_norm_bounds_the_gradient_the_optimizer_sees(tmp_path, tiny_recipe_dict) -> None:
    seen = {}
    for clip in (None, 1e-3):
        spy = OptimizerGradNorm()
        train(recipe_from_dict(tiny_recipe_dict(2, max_steps=3, gradient_clip_norm=clip)), tmp_path / str(clip),
              callbacks=[spy])
        assert len(spy.norms) == 3
        seen[clip] = spy.norms
    assert min(seen[None]) > 1e-2, "the unclipped gradient must exceed the bound for the test to mean anything"
    assert max(seen[1e-3]) <= 1e-3 * (1 + 1e-4)


def _phantom(out: Path, **kw: object) -> Path:
    from medmodal.data.phantom import write_phantom

    return write_phantom(out, cases=6, seed=3, spatial_dims=2, size=33, progress=False, **kw)


def _path_recipe(data: Path, **model: object) -> dict:
    return {
        "name": "fails", "data": {"path": str(data), "patch_size": [24, 24], "batch_size": 2, "val_fraction": 0.34,
                                  "num_workers": 0, "cache_dir": str(data.parent / "cache")},
        "model": {"name": "unet", "kwargs": {"channels": [4, 8], **model}},
        "train": {"max_steps": 2, "val_every_steps": 2, "checkpoint_every_steps": 1, "progress": False},
        "eval": {"overlap": 0.0},
    }


@pytest.mark.parametrize("premade", [False, True], ids=["new-folder", "empty-folder"])
def test_a_data_error_before_the_first_step_leaves_nothing_that_blocks_the_retry(tmp_path, premade: bool) -> None:
    data = _phantom(tmp_path / "data")
    victim = next(data.glob("*/*_t2.nii.gz"))
    good = victim.read_bytes()
    victim.write_bytes(good[:100])  # truncated: the cache cannot be built
    run = tmp_path / "run"
    if premade:
        run.mkdir()
    with pytest.raises(DataError, match=victim.name):
        train(recipe_from_dict(_path_recipe(data)), run)
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())
    victim.write_bytes(good)
    train(recipe_from_dict(_path_recipe(data)), run)  # no --overwrite needed
    assert (run / "weights" / "model.safetensors").is_file()


def test_a_network_construction_error_creates_no_folder(tmp_path) -> None:
    data = _phantom(tmp_path / "data")
    with pytest.raises(RecipeError, match="model"):
        train(recipe_from_dict(_path_recipe(data, no_such_argument=1)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


KILLER = """
import os, signal, sys
import lightning as L, torch
from medmodal.engine.recipe import recipe_from_dict
from medmodal.engine.train import train
torch.set_num_threads(1)

class Kill(L.Callback):  # kill -9 once the validation rows of step 6 are in metrics.csv
    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step == 6:
            os.kill(os.getpid(), signal.SIGKILL)

train(recipe_from_dict({recipe!r}), sys.argv[1], callbacks=[Kill()])
"""


def test_metrics_have_each_step_once_after_kill_9_and_resume(tmp_path, tiny_recipe_dict) -> None:
    recipe = tiny_recipe_dict(2, max_steps=8, val_every_steps=3, checkpoint_every_steps=4)
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER.format(recipe=recipe)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(run)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    before = list(csv.DictReader((run / "metrics.csv").open()))
    assert max(int(r["step"]) for r in before) == 6, "the kill must leave rows after the checkpoint's step"

    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    dup = [k for k, n in Counter((r["step"], r["name"]) for r in rows).items() if n > 1]
    assert not dup, f"duplicate (step, name) rows: {dup}"
    for name in {r["name"] for r in rows}:
        steps = [int(r["step"]) for r in rows if r["name"] == name]
        assert steps == sorted(steps), (name, steps)
    assert [int(r["step"]) for r in rows if r["name"] == "val/dice_mean"] == [3, 6]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
