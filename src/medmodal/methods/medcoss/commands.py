"""``medmodal experiment medcoss``: the stage x task forgetting matrix of MedCoSS, plain sequential and joint
pretraining and the ablations, over seeds."""

from __future__ import annotations

from pathlib import Path

import typer

from medmodal.commands.common import console, experiment_group, parse_seeds, user_errors


def add_commands(app: typer.Typer) -> None:
    """Register ``experiment medcoss`` on ``app``."""
    experiment = experiment_group(app)

    @experiment.command("medcoss")
    @user_errors
    def medcoss(
        out: Path = typer.Option(Path("runs/medcoss_experiment"), file_okay=False,
                                 help="Folder for the runs, results.csv, forgetting.png and report.md."),
        recipe: str = typer.Option("medcoss_tiny", help="The stages (a recipe file or built-in name)."),
        fast: bool = typer.Option(False, "--fast", help="A tiny version (a few steps per stage), for smoke tests."),
        overwrite: bool = typer.Option(False, help="Replace a finished experiment in --out."),
        seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
        variants: str = typer.Option("medcoss,sequential,joint,random_buffer,no_mixup",
                                     help="Comma-separated variants: medcoss, sequential, joint, random_buffer, "
                                          "no_mixup."),
        jobs: int = typer.Option(0, min=0, help="Sequences trained at once (0: one per CPU core)."),
        set_: list[str] = typer.Option(  # noqa: B006
            [], "--set", help="Override a field of every stage's recipe: --set train.max_steps=120."
        ),
    ) -> None:
        """After each pretraining stage, linear probes on every modality seen so far: what MedCoSS, plain
        sequential and joint pretraining remember (mean ± std over seeds), with buffer and mixup ablations."""
        from medmodal.engine.recipe import parse_overrides
        from medmodal.methods.medcoss.experiment import VARIANTS, run_medcoss_experiment

        names = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            raise typer.BadParameter(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        report = run_medcoss_experiment(out, seeds=parse_seeds(seeds), variants=names, recipe=recipe, fast=fast,
                                        overwrite=overwrite, overrides=parse_overrides(set_) if set_ else None,
                                        jobs=jobs or None)
        console.print(f"[bold green]report[/]: {report}")
