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

    from medmodal.engine.parallel import default_jobs

    with pytest.raises(RunError, match="--jobs must be at least 1"):
        run_quickstart(tmp_path / "qs", fast=True, jobs=0)
    assert default_jobs(6) == min(6, len(os.sched_getaffinity(0)))
    assert default_jobs(1) == 1


def test_set_max_steps_scales_shaspec_phases(tmp_path) -> None:
    """--set train.max_steps applies to both models; ShaSpec's warm-up phases follow in proportion."""
    from medmodal.methods.shaspec.quickstart import MODELS, _jobs_for

    jobs = _jobs_for(MODELS, [0], out=tmp_path, fast=True, overrides={"train.max_steps": 40}, threads=None, jobs=1)
    by_key = {j.model.key: j.recipe for j in jobs}
    assert by_key["zero_fill"].train.max_steps == 40
    shaspec = by_key["shaspec"]
    assert shaspec.train.max_steps == 40
    assert [(p.steps, p.sampler) for p in shaspec.method.phases] == [(10, "full"), (30, "random")]  # 5 + 15 -> x2


def test_references_train_dedicated_models_on_the_same_cases(tmp_path) -> None:
    """--references: dedicated U-Nets for all modalities and for the baseline's weakest single modality,
    evaluated on their own subset of the same held-out cases, in the report."""
    from medmodal.evaluation.report import read_rows

    report = run_quickstart(tmp_path / "qs", fast=True, jobs=1, references=True)
    text = report.read_text(encoding="utf-8")
    assert "## Dedicated upper references" in text
    rows = read_rows(tmp_path / "qs" / "subsets.csv")
    models = {r.model.split("@")[0] for r in rows}
    weakest = [m for m in models if m.startswith("dedicated U-Net (") and "+" not in m]
    assert "dedicated U-Net (t1+t1c+t2+flair)" in models and len(weakest) == 1
    single = weakest[0][len("dedicated U-Net ("):-1]
    # the weakest single modality is the baseline's lowest mean Dice among the single-modality subsets
    base = {}
    for r in rows:
        if r.model.startswith("zero-fill U-Net@") and r.n_modalities == 1:
            base.setdefault(r.subset, []).append(r.dice)
    assert single == min(base, key=lambda s: sum(base[s]) / len(base[s]))
    # same held-out cases as the compared models
    cases = lambda name: {r.case_id for r in rows if r.model.startswith(name)}  # noqa: E731
    assert cases(weakest[0]) == cases("zero-fill U-Net@") == cases("dedicated U-Net (t1+t1c+t2+flair)")
    dedicated_single = {r.subset for r in rows if r.model.startswith(weakest[0])}
    assert dedicated_single == {single}  # a one-modality model has one subset
    assert f"| {single} | WT |" in text
