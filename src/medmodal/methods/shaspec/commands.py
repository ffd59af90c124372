"""``medmodal quickstart``: the main job (ShaSpec vs the zero-fill baseline on the phantom), added by ShaSpec."""

from __future__ import annotations

from pathlib import Path

import typer

from medmodal.commands.common import console, user_errors


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
    ) -> None:
        """Phantom → train ShaSpec and the zero-fill U-Net (3 seeds) → evaluate all 15 modality subsets → report."""
        from medmodal.methods.shaspec.quickstart import run_quickstart

        report = run_quickstart(out, fast=fast, overwrite=overwrite, jobs=jobs)
        console.print(f"[bold green]done[/]: report at {report}")
