"""PUMIT's commands: its ``medmodal pretrain`` (the tokenizer, then the ViT by masked image modelling against it;
resumable, each run self-describing, with a report of both evaluations) and ``medmodal experiment pumit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from medmodal.commands.common import console, experiment_group, parse_seeds, user_errors
from medmodal.engine.plugin import PretrainRequest


def run_pretrain(out: Path, *, tokenizer: str, mim: str, overrides: dict[str, Any], fast: bool,
                 overwrite: bool) -> Path:
    """Train (or resume, or reuse) ``out/tokenizer`` and ``out/mim``, evaluate both, write ``out/report.md``."""
    from medmodal.atomic import atomic_write_text
    from medmodal.engine.evaluate import evaluate_run
    from medmodal.engine.recipe import builtin_recipe_path, load_recipe
    from medmodal.engine.run import RunError
    from medmodal.engine.train import train_or_resume

    if (out / "report.md").is_file() and not overwrite:
        raise RunError(f"{out}: holds a finished pretraining; pass --overwrite or choose another --out")
    small = {"train.max_steps": 10, "train.val_every_steps": 5, "train.checkpoint_every_steps": 5,
             "data.phantom.cases": 8} if fast else {}

    def recipe(name: str, extra: dict[str, Any]) -> Any:
        path = Path(name) if name.endswith((".yaml", ".yml")) else builtin_recipe_path(name)
        return load_recipe(path, overrides={**small, **overrides, **extra})

    from medmodal.engine.distributed import is_rank_zero

    runs = {"tokenizer": out / "tokenizer", "mim": out / "mim"}
    tok = recipe(tokenizer, {"method.stage": "tokenizer"})
    if is_rank_zero():
        console.print(f"stage 1/2: tokenizer ({tok.name}) -> {runs['tokenizer']}")
    train_or_resume(tok, runs["tokenizer"], overwrite=overwrite)
    vit = recipe(mim, {"method.stage": "mim", "method.tokenizer_run": str(runs["tokenizer"].resolve())})
    if is_rank_zero():
        console.print(f"stage 2/2: masked image modelling ({vit.name}) -> {runs['mim']}")
    train_or_resume(vit, runs["mim"], overwrite=overwrite)
    if not is_rank_zero():  # the other processes of a multi-process run trained; rank 0 evaluates and reports
        return out / "report.md"
    lines = ["# PUMIT pretraining", ""]
    for stage, run in runs.items():
        report = evaluate_run(run, out_dir=run / "eval", overwrite=True, progress=False,
                              model_name=f"{stage} stage")
        body = report.read_text(encoding="utf-8").split("\n", 1)[1]
        lines += [f"## {stage} stage: `{run}`", body.strip(), ""]
    if fast:
        lines.insert(2, "**FAST smoke version (10 steps per stage): not evidence.**\n")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def pretrain(request: PretrainRequest) -> Path:
    """``medmodal pretrain`` for PUMIT: ``[TOKENIZER_RECIPE MIM_RECIPE]`` (default: the tiny ones); ``--data`` is
    the image collection (a folder or manifest; ``method.collection``)."""
    from medmodal.engine.recipe import RecipeError

    if request.stage is not None or request.from_run is not None:
        raise RecipeError("PUMIT pretrains in two fixed stages (tokenizer, then the ViT); --stage and --from are "
                          "for methods that add stages; fine-tune a PUMIT run with medmodal train --from RUN")
    if len(request.recipes) not in (0, 2):
        raise RecipeError(f"PUMIT pretraining takes two recipes, the tokenizer's and the ViT's (MIM), got "
                          f"{len(request.recipes)}: {' '.join(request.recipes)}")
    tokenizer, mim = request.recipes or ("pumit_tokenizer_tiny", "pumit_mim_tiny")
    overrides = dict(request.overrides)
    if request.data is not None:
        overrides["method.collection"] = str(Path(request.data).resolve())
    out = Path(request.out) if request.out is not None else Path("runs") / "pumit"
    return run_pretrain(out, tokenizer=tokenizer, mim=mim, overrides=overrides, fast=request.fast,
                        overwrite=request.overwrite)


def add_commands(app: typer.Typer) -> None:
    """Register ``experiment pumit`` on ``app``."""

    experiment = experiment_group(app)

    @experiment.command("pumit")
    @user_errors
    def pumit(
        out: Path = typer.Option(Path("runs/pumit_experiment"), file_okay=False,
                                 help="Folder for the collection, the pretraining, the runs and report.md."),
        fast: bool = typer.Option(False, "--fast", help="A tiny version (a few minutes), for smoke tests."),
        overwrite: bool = typer.Option(False, help="Replace a finished experiment in --out."),
        seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (each: its own split, label subset and "
                                                "initialisation of the new layers)."),
        fractions: str = typer.Option("0.1,0.25,0.5,1", help="Comma-separated shares of the labelled training "
                                                             "cases (data.label_fraction)."),
        tasks: str = typer.Option("segmentation,classification", help="segmentation and/or classification."),
        jobs: int = typer.Option(0, min=0, help="Runs trained at once (0: one per CPU core)."),
        set_: list[str] = typer.Option(  # noqa: B006
            [], "--set", help="Override a field of every fine-tuning recipe: --set train.max_steps=300."
        ),
    ) -> None:
        """Does pretraining pay off with few labels? Pretrain PUMIT on an unlabelled phantom collection (2D slices
        and 3D volumes at several spacings), then fine-tune the ViT from it and from scratch on 10-100 % of the
        labels, for segmentation and classification, over seeds; label-efficiency curves and paired tests."""
        from medmodal.engine.recipe import parse_overrides
        from medmodal.methods.pumit.experiment import TASKS, run_pumit_experiment

        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        if not task_list or any(t not in TASKS for t in task_list):
            raise typer.BadParameter(f"--tasks: choose from {', '.join(TASKS)}, got {tasks!r}")
        try:
            shares = [float(f) for f in fractions.split(",") if f.strip()]
        except ValueError:
            raise typer.BadParameter(f"--fractions: comma-separated numbers in (0, 1], got {fractions!r}") from None
        if not shares or any(not 0 < f <= 1 for f in shares):
            raise typer.BadParameter(f"--fractions: comma-separated numbers in (0, 1], got {fractions!r}")
        report = run_pumit_experiment(out, seeds=parse_seeds(seeds), fractions=shares, tasks=task_list, fast=fast,
                                      overwrite=overwrite, overrides=parse_overrides(set_) if set_ else None,
                                      jobs=jobs or None)
        console.print(f"[bold green]report[/]: {report}")
