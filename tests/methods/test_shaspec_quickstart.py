"""An interrupted quickstart continues where it stopped instead of starting again."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch

from medmodal.engine.recipe import builtin_recipe_path, load_recipe
from medmodal.engine.run import RunError
from medmodal.engine.train import train
from medmodal.methods.shaspec.quickstart import run_quickstart


class Crash(L.Callback):
    """Ctrl-C at step 10: the run stops gracefully with last.ckpt at that step."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 10:
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_quickstart_resumes(tmp_path) -> None:
    recipe = load_recipe(builtin_recipe_path("quickstart_fast"))
    recipe.train.progress = False
    with pytest.raises(RunError, match="interrupted"):
        train(recipe, tmp_path / "qs" / "runs" / "zero_fill_seed0", callbacks=[Crash()])
    report = run_quickstart(tmp_path / "qs", fast=True, jobs=1)
    assert report.is_file() and "synthetic phantom" in report.read_text(encoding="utf-8")
    run = tmp_path / "qs" / "runs" / "zero_fill_seed0"
    assert "resuming from" in (run / "log.txt").read_text(encoding="utf-8")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == recipe.train.max_steps


def test_jobs_must_be_positive_and_default_to_the_cores(tmp_path) -> None:
    import os

    from medmodal.methods.shaspec.quickstart import default_jobs

    with pytest.raises(RunError, match="--jobs must be at least 1"):
        run_quickstart(tmp_path / "qs", fast=True, jobs=0)
    assert default_jobs(6) == min(6, len(os.sched_getaffinity(0)))
    assert default_jobs(1) == 1
