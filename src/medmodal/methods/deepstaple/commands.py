"""``medmodal experiment deepstaple``: DeepSTAPLE's label-quality and consensus experiments on the phantom."""

from __future__ import annotations

from pathlib import Path

import typer

from medmodal.commands.common import console, experiment_group, user_errors


def add_commands(app: typer.Typer) -> None:
    """Register ``experiment deepstaple`` on ``app``."""
    experiment = experiment_group(app)

    @experiment.command("deepstaple")
    @user_errors
    def deepstaple(
        out: Path = typer.Option(Path("runs/deepstaple"), file_okay=False,
                                 help="Folder for the runs, tables, figures and report.md."),
        fast: bool = typer.Option(False, "--fast", help="A tiny version (about 30 s), for smoke tests."),
        overwrite: bool = typer.Option(False, help="Replace a finished experiment in --out."),
        seed: int = typer.Option(0, help="Seed of the phantom, the label noise and the training."),
    ) -> None:
        """Experiment I (disturbed labels: θ vs true Dice, OOL vs in-line) and multi-atlas consensus (synthetic)."""
        from medmodal.methods.deepstaple.experiments import run_deepstaple_experiments

        report = run_deepstaple_experiments(out, fast=fast, overwrite=overwrite, seed=seed)
        console.print(f"[bold green]done[/]: report at {report}")
