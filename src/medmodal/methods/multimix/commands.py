"""``medmodal experiment multimix``: the paper's table (label budgets × baselines × seeds) on the phantom."""

from __future__ import annotations

from pathlib import Path

import typer

from medmodal.commands.common import console, experiment_group, parse_seeds, user_errors


def add_commands(app: typer.Typer) -> None:
    """Register ``experiment multimix`` on ``app``."""
    experiment = experiment_group(app)

    @experiment.command("multimix")
    @user_errors
    def multimix(
        out: Path = typer.Option(Path("runs/multimix"), file_okay=False,
                                 help="Folder for the runs, tables, figures and report.md."),
        fast: bool = typer.Option(False, "--fast", help="A tiny version (a minute or two), for smoke tests."),
        overwrite: bool = typer.Option(False, help="Replace a finished experiment in --out."),
        seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (each: its own split, budget and training)."),
        variants: str = typer.Option("unet,enc,enc_ssl,umtl,umtl_ssl,multimix",
                                     help="Comma-separated models of the paper's table (method.variant)."),
        set_: list[str] = typer.Option(  # noqa: B006
            [], "--set", help="Override a field of every run's recipe: --set train.max_steps=600."
        ),
    ) -> None:
        """MultiMix and the baselines of the paper's table, trained on the same data and label budgets, scored
        in-source and cross-source (mean ± std over seeds)."""
        from medmodal.engine.recipe import parse_overrides
        from medmodal.methods.multimix.config import VARIANTS
        from medmodal.methods.multimix.experiment import run_multimix_experiment

        seed_list = parse_seeds(seeds)
        names = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            raise typer.BadParameter(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        report = run_multimix_experiment(out, seeds=seed_list, variants=names, fast=fast, overwrite=overwrite,
                                         overrides=parse_overrides(set_) if set_ else None)
        console.print(f"[bold green]report[/]: {report}")
