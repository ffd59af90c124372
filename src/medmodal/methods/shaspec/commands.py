"""``medmodal quickstart``: the main job (ShaSpec vs the zero-fill baseline on the phantom), added by ShaSpec."""

from __future__ import annotations

from pathlib import Path

import typer

from medmodal.commands.common import console, parse_seeds, user_errors


def add_commands(app: typer.Typer) -> None:
    """Register ``quickstart`` on ``app``."""

    @app.command()
    @user_errors
    def quickstart(
        out: Path = typer.Option(Path("runs/quickstart"), file_okay=False,
                                 help="Folder for the run, the evaluation and report.md."),
        fast: bool = typer.Option(False, "--fast", help="A tiny version (one seed, 20 steps), for smoke tests."),
        overwrite: bool = typer.Option(False, help="Replace a finished quickstart in --out."),
        jobs: int | None = typer.Option(
            None, help="Runs trained at once, each in its own process (default: one per CPU core; 1 = one by one)."
        ),
        seeds: str | None = typer.Option(None, help="Comma-separated seeds (default 0,1,2,3,4; --fast: 0)."),
        set_: list[str] = typer.Option(  # noqa: B006
            [], "--set", help="Override a recipe field of both models: --set train.lr=0.002."
        ),
        references: bool = typer.Option(
            False, "--references", help="Also train dedicated U-Nets for all modalities and for the weakest one."
        ),
    ) -> None:
        """Phantom → train ShaSpec and the zero-fill U-Net (5 seeds) → evaluate all 15 modality subsets → report."""
        from medmodal.engine.recipe import parse_overrides
        from medmodal.methods.shaspec.quickstart import run_quickstart

        seed_list = None if seeds is None else parse_seeds(seeds)
        report = run_quickstart(out, fast=fast, overwrite=overwrite, jobs=jobs, seeds=seed_list,
                                overrides=parse_overrides(set_) if set_ else None, references=references)
        console.print(f"[bold green]done[/]: report at {report}")
