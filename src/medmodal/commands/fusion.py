"""``medmodal fuse``: majority vote, STAPLE and data-parameter consensus of candidate labels."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import Progress
from rich.table import Table

from medmodal.commands.common import console, err_console, user_errors
from medmodal.data.case import DataError
from medmodal.fusion.files import DEFAULT_MAX_LABELS

if TYPE_CHECKING:
    from medmodal.fusion.files import FuseResult

_METHODS = ("majority", "staple", "dp")
_MAX_LABEL_COLUMNS = 8


def add_commands(app: typer.Typer) -> None:
    """Register ``fuse`` on ``app``."""
    app.command("fuse")(fuse)


@user_errors
def fuse(
    labels: list[Path] | None = typer.Argument(
        None, metavar="LABEL...", show_default=False,
        help="Label files to fuse, one per rater, on one grid (not with --method dp).",
    ),
    method: str = typer.Option(..., help="majority, staple or dp (DeepSTAPLE's data-parameter consensus)."),
    out: Path = typer.Option(..., help="Fused label file; with --method dp an output folder."),
    probability: Path | None = typer.Option(None, help="STAPLE: also write the probability map (float32) here."),
    multilabel: bool | None = typer.Option(
        None, "--multilabel/--binary", show_default=False,
        help="Fuse label maps or 0/1 masks (default: binary when every value is 0 or 1).",
    ),
    max_iter: int = typer.Option(200, min=1, help="STAPLE's iteration limit."),
    max_labels: int = typer.Option(
        DEFAULT_MAX_LABELS, min=2,
        help="Refuse a file with more distinct values than this (an intensity image passed by mistake); raise it "
             "for atlases with more labels.",
    ),
    undecided_label: int | None = typer.Option(
        None, show_default=False,
        help="Label written where a majority vote is tied or multi-label STAPLE is undecided (e.g. 0). Default: "
             "the smallest tied label (majority), the largest label + 1 (STAPLE).",
    ),
    run: Path | None = typer.Option(None, help="--method dp: the data-parameter run folder whose θ weight the votes."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs."),
) -> None:
    """Fuse candidate labels (raters, registered atlases) into one: majority vote, STAPLE, or DP consensus.

    A JSON sidecar is written next to the fused file: <out>.staple.json with every rater's sensitivity/specificity
    (or confusion matrix), or <out>.majority.json with the tie rule.

    Undecided voxels: multi-label STAPLE writes the largest input label + 1 (ITK's convention; not a class) where
    two labels share the largest posterior, and a majority vote gives a tie to the smallest tied label. The
    sidecar records the label and how many voxels got it; --undecided-label N writes N there instead.
    """
    if method not in _METHODS:
        raise DataError(f"--method: expected one of {', '.join(_METHODS)}, got {method!r}")
    if method == "dp":
        if labels:
            raise DataError("LABEL arguments are not used with --method dp: the candidate labels and their data "
                            "parameters come from the run folder given with --run")
        if run is None:
            raise DataError("--method dp needs --run RUN, a trained data-parameter (DeepSTAPLE) run folder")
        if probability is not None or multilabel is not None or undecided_label is not None:
            raise DataError("--probability, --multilabel, --binary and --undecided-label are not used with "
                            "--method dp")
        from medmodal.engine.plugin import get_method
        from medmodal.engine.runinfo import load_run

        loaded = load_run(run)
        written = get_method(loaded.info.method).fuse(loaded, out, overwrite=overwrite)
        console.print(f"[bold green]wrote[/] {len(written)} DP consensus label(s) to {out}")
        return
    if run is not None:
        raise DataError(f"--run is only used with --method dp (got --method {method})")
    if not labels:
        raise DataError(f"--method {method} needs the label files to fuse, e.g. "
                        "`medmodal fuse a.nii.gz b.nii.gz c.nii.gz --method staple --out fused.nii.gz`")
    from medmodal.fusion.files import fuse_label_files

    with _progress_bar("majority vote" if method == "majority" else "STAPLE EM pass") as progress:
        result = fuse_label_files(labels, method=method, out=out, overwrite=overwrite, probability_out=probability,
                                  multilabel=multilabel, max_iter=max_iter, max_labels=max_labels,
                                  undecided_label=undecided_label, progress=progress)
    _print_summary(result)


@contextmanager
def _progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr (only on a terminal) fed by ``progress(done, total)`` calls."""
    with Progress(*Progress.get_default_columns(), console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _print_summary(result: FuseResult) -> None:
    from medmodal.fusion import StapleResult

    kind = "multi-label" if result.multilabel else "binary"
    console.print(f"[bold green]fused[/] {len(result.paths)} {kind} label(s) by {result.method} → {result.out}")
    console.print(f"grid {'×'.join(map(str, result.shape))}, {result.foreground_voxels} foreground voxel(s)")
    s = result.staple
    if s is None:
        if result.multilabel or result.tied_voxels:
            where = "the smallest tied label" if result.undecided_label is None else f"label {result.undecided_label}"
            console.print(f"{result.tied_voxels} tied voxel(s), given {where}; tie rule in {result.sidecar}")
        return
    state = "converged" if s.converged else "[yellow]not converged[/] (raise --max-iter)"
    table = Table(box=None, pad_edge=False)
    table.add_column("rater", justify="right")
    table.add_column("file")
    if isinstance(s, StapleResult):
        console.print(f"STAPLE: {s.iterations} iteration(s), {state}, prior g = {s.prior:.4g}")
        table.add_column("sensitivity", justify="right")
        table.add_column("specificity", justify="right")
        for k, (path, p, q) in enumerate(zip(result.paths, s.sensitivity, s.specificity, strict=True), 1):
            table.add_row(str(k), path.name, f"{float(p):.4f}", f"{float(q):.4f}")
    else:
        kind = "a class" if s.undecided_label in s.labels.tolist() else "not a class, see the sidecar"
        console.print(f"multi-label STAPLE: {s.iterations} iteration(s), {state}, "
                      f"{int(s.undecided.sum())} undecided voxel(s) (label {s.undecided_label}: {kind})")
        agreement = s.confusion.diagonal(dim1=1, dim2=2)  # (K, L): P(rater says l | truth l)
        labels = s.labels.tolist()
        columns = [f"P({v}|{v})" for v in labels] if len(labels) <= _MAX_LABEL_COLUMNS else ["mean P(l|l)"]
        for name in columns:
            table.add_column(name, justify="right")
        for k, (path, row) in enumerate(zip(result.paths, agreement, strict=True), 1):
            cells = row.tolist() if len(labels) <= _MAX_LABEL_COLUMNS else [float(row.mean())]
            table.add_row(str(k), path.name, *(f"{c:.4f}" for c in cells))
    console.print(table)
    console.print(f"per-rater estimates: {result.sidecar}")
