"""``medmodal experiment deepstaple``: DeepSTAPLE's label-quality and consensus experiments on the phantom."""

from __future__ import annotations

from pathlib import Path

import typer

from medmodal.commands.common import console, user_errors


def _experiment_group(app: typer.Typer) -> typer.Typer:
    """The ``experiment`` sub-command group of ``app``, created on first use (other methods add theirs to it)."""
    for group in app.registered_groups:
        if group.name == "experiment" and group.typer_instance is not None:
            return group.typer_instance
    group_app = typer.Typer(help="Reproduce the methods' experiments on the synthetic phantom.", no_args_is_help=True)
    app.add_typer(group_app, name="experiment")
    return group_app


def add_commands(app: typer.Typer) -> None:
    """Register ``experiment deepstaple`` on ``app``."""
    experiment = _experiment_group(app)

    @experiment.command("deepstaple")
    @user_errors
    def deepstaple(
        out: Path = typer.Option(Path("runs/deepstaple"), help="Folder for the runs, tables, figures and report.md."),
        fast: bool = typer.Option(False, "--fast", help="A tiny version (about 30 s), for smoke tests."),
        overwrite: bool = typer.Option(False, help="Replace a finished experiment in --out."),
        seed: int = typer.Option(0, help="Seed of the phantom, the label noise and the training."),
    ) -> None:
        """Experiment I (disturbed labels: θ vs true Dice, OOL vs in-line) and multi-atlas consensus (synthetic)."""
        from medmodal.engine.deepstaple_experiments import run_deepstaple_experiments

        report = run_deepstaple_experiments(out, fast=fast, overwrite=overwrite, seed=seed)
        console.print(f"[bold green]done[/]: report at {report}")
