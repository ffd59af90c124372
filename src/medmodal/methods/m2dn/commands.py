"""``medmodal experiment m2dn``: M2DN against its baselines and downstream segmentation, on the phantom."""

from __future__ import annotations

from pathlib import Path

import typer

from medmodal.commands.common import console, experiment_group, parse_seeds, user_errors


def add_commands(app: typer.Typer) -> None:
    """Register ``experiment m2dn`` on ``app``."""
    experiment = experiment_group(app)

    @experiment.command("m2dn")
    @user_errors
    def m2dn(
        out: Path = typer.Option(Path("runs/m2dn"), file_okay=False,
                                 help="Folder for the runs, tables, figures and report.md."),
        fast: bool = typer.Option(False, "--fast", help="A tiny version (about a minute), for smoke tests."),
        overwrite: bool = typer.Option(False, help="Replace a finished experiment in --out."),
        seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (each: its own split and training)."),
        set_: list[str] = typer.Option(  # noqa: B006
            [], "--set", help="Override a field of the M2DN and regression recipes: --set train.max_steps=600."
        ),
    ) -> None:
        """M2DN vs regression / zero / mean fill on every missing scenario, and segmentation Dice with the
        missing modalities left missing vs completed by M2DN (ShaSpec and zero-fill segmenters)."""
        from medmodal.engine.recipe import parse_overrides
        from medmodal.methods.m2dn.experiment import run_m2dn_experiment

        seed_list = parse_seeds(seeds)
        report = run_m2dn_experiment(out, seeds=seed_list, fast=fast, overwrite=overwrite,
                                     overrides=parse_overrides(set_) if set_ else None)
        console.print(f"[bold green]done[/]: report at {report}")
