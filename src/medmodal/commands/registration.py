"""``medmodal register``: multi-atlas registration of labelled atlases onto targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import typer

from medmodal.commands.common import console, err_console, user_errors
from medmodal.data.case import DataError

#: exit code of ``register`` when some pairs failed and --allow-failures was not given
EXIT_PAIRS_FAILED = 3


@user_errors
def register(
    atlases: Path = typer.Option(..., help="Labelled data set (BraTS, nnU-Net or manifest) to take labels from."),
    targets: Path = typer.Option(..., help="Data set to put labels on (its own labels, if any, are only compared)."),
    out: Path = typer.Option(..., file_okay=False, help="Output folder: labels/<target>/<atlas>.nii.gz, manifest.csv."),
    atlas_modality: str | None = typer.Option(None, help="Atlas image to register (default: the first shared)."),
    target_modality: str | None = typer.Option(None, help="Target image to register; may be another contrast."),
    transform: str = typer.Option("bspline", help="affine, bspline (cross-contrast) or demons (same contrast)."),
    workers: int | None = typer.Option(None, min=1, help="Parallel pairs (default min(4, CPUs))."),
    seed: int = typer.Option(0, min=0, help="Seed of the metric sampling (same seed, same result)."),
    overwrite: bool = typer.Option(False, help="Replace the contents of a non-empty --out."),
    allow_failures: bool = typer.Option(
        False, "--allow-failures", help="Exit 0 even when some pairs failed (they are status=failed in the manifest)."
    ),
) -> None:
    """Register every atlas onto every target (affine + B-spline/demons, mutual information) and warp the labels.

    Exit codes: 0 every pair registered; 3 some pairs failed (the others are written, the failed ones listed in
    the manifest; --allow-failures makes this 0); 2 a user error or every pair failed (nothing written).
    """
    from medmodal.registration.atlases import register_atlases
    from medmodal.registration.sitk import TRANSFORMS

    if transform not in TRANSFORMS:
        raise DataError(f"--transform: expected one of {', '.join(TRANSFORMS)}, got {transform!r}")
    summary = register_atlases(atlases, targets, out, atlas_modality=atlas_modality, target_modality=target_modality,
                               transform=cast(Any, transform), workers=workers, overwrite=overwrite, progress=True,
                               seed=seed)
    n, failed = len(summary.pairs), len(summary.failed)
    line = f"[bold green]registered[/] {n - failed} of {n} pair(s)"
    if summary.median_seconds is not None:
        line += f", median {summary.median_seconds:.1f} s per pair"
    if summary.mean_dice is not None:
        line += f", mean Dice to the targets' labels {summary.mean_dice:.3f}"
    console.print(f"{line}; manifest at {summary.manifest}", highlight=False, soft_wrap=True)
    if failed:
        console.print(f"[yellow]{failed} of {n} pairs failed[/] (status=failed in the manifest):", highlight=False)
        for pair in summary.failed[:10]:
            console.print(f"  {pair.target} <- {pair.atlas}: {pair.error}", highlight=False, soft_wrap=True)
        if not allow_failures:
            err_console.print(f"[bold red]error:[/] {failed} of {n} registration pair(s) failed (exit code "
                              f"{EXIT_PAIRS_FAILED}); fix them and run again, or pass --allow-failures to accept "
                              "the pairs that worked", highlight=False, soft_wrap=True)
            raise typer.Exit(code=EXIT_PAIRS_FAILED)


def add_commands(app: typer.Typer) -> None:
    """Add ``register`` to ``app``."""
    app.command("register")(register)
