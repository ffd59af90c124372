"""The ``medmodal`` command: quickstart, data tools, train, evaluate, predict, register, fuse, experiment.

Every command exits 0 on success, 2 on a user error (bad data, recipe, run folder) with a one-paragraph
message that names the file or field, and 1 on an unexpected failure.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from medmodal.commands import deepstaple as _deepstaple_commands
from medmodal.commands import fusion as _fusion_commands
from medmodal.commands import registration as _registration_commands
from medmodal.commands.common import console, err_console, user_errors
from medmodal.data.case import DataError
from medmodal.engine.recipe import RecipeError
from medmodal.engine.run import RunError

app = typer.Typer(
    name="medmodal",
    help="Learning from imperfect multi-modal medical images. Run `medmodal quickstart` to see it work.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Generate, validate and convert data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

def _setup_logging(verbose: bool) -> None:
    from medmodal.engine.run import quiet_third_party

    quiet_third_party()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("medmodal").setLevel(logging.INFO)


def _floats(text: str | None, *, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise DataError(f"{option}: expected numbers like 1,1,3, got {text!r}") from None


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more.")) -> None:
    _setup_logging(verbose)


# -- quickstart -----------------------------------------------------------------------------------------------
@app.command()
@user_errors
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Folder for the run, the evaluation and report.md."),
    fast: bool = typer.Option(False, "--fast", help="A tiny version (one seed, 20 steps), for smoke tests."),
    overwrite: bool = typer.Option(False, help="Replace a finished quickstart in --out."),
    jobs: int | None = typer.Option(
        None, help="Runs trained at once, each in its own process (default: one per CPU core; 1 = one by one)."
    ),
) -> None:
    """Phantom → train ShaSpec and the zero-fill U-Net (3 seeds) → evaluate all 15 modality subsets → report."""
    from medmodal.engine.quickstart import run_quickstart

    report = run_quickstart(out, fast=fast, overwrite=overwrite, jobs=jobs)
    console.print(f"[bold green]done[/]: report at {report}")


# -- data -----------------------------------------------------------------------------------------------------
@data_app.command("phantom")
@user_errors
def data_phantom(
    out: Path = typer.Option(..., help="Output folder."),
    cases: int = typer.Option(40, min=1, help="Number of cases."),
    dims: int = typer.Option(3, min=2, max=3, help="2 or 3 spatial dimensions."),
    size: int = typer.Option(64, min=8, help="Voxels per axis."),
    seed: int = typer.Option(0, help="Random seed (same seed, same data)."),
    spacing: str | None = typer.Option(None, help="Voxel spacing in mm, e.g. 1,1,3 (default isotropic 1 mm)."),
    missing_rate: float = typer.Option(0.0, min=0.0, max=0.99, help="Chance each modality file is left out."),
    layout: str = typer.Option("brats", help="brats or nnunet."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out."),
) -> None:
    """Write the procedural multi-modal brain-tumour phantom (synthetic) as a data set."""
    from medmodal.data.phantom import write_phantom

    if layout not in ("brats", "nnunet"):
        raise DataError(f"--layout: expected brats or nnunet, got {layout!r}")
    sp = _floats(spacing, option="--spacing")
    if sp is not None and len(sp) != dims:
        raise DataError(f"--spacing: {len(sp)} values for a {dims}D phantom")
    root = write_phantom(out, cases=cases, seed=seed, spatial_dims=dims, size=size, spacing=sp,
                         missing_rate=missing_rate, layout=layout, overwrite=overwrite, progress=True)
    console.print(f"wrote {cases} synthetic phantom case(s) ({dims}D, {layout} layout) to {root}")


@data_app.command("check")
@user_errors
def data_check(
    path: Path = typer.Argument(..., help="Data set folder or manifest file."),
    format: str = typer.Option("auto", help="auto, brats, nnunet or manifest."),
) -> None:
    """Validate a data set: read every file and list every problem found (exit 2 if any error)."""
    from medmodal.data.check import check_dataset

    info, records, problems = check_dataset(path, format=format, progress=True)
    errors = [p for p in problems if not p.message.startswith("warning:")]
    for p in problems:
        style = "yellow" if p.message.startswith("warning:") else "red"
        where = " ".join(str(x) for x in (p.case_id, p.path) if x is not None)
        console.print(f"[{style}]{where}[/]: {p.message}", highlight=False, soft_wrap=True)
    if info is not None:
        console.print(f"{path}: {len(records)} case(s), modalities {list(info.modalities)}; "
                      f"{len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    if errors:
        raise typer.Exit(code=2)


@data_app.command("convert")
@user_errors
def data_convert(
    src: Path = typer.Argument(..., help="Source data set."),
    dst: Path = typer.Argument(..., help="Destination folder (or manifest file)."),
    to: str = typer.Option(..., help="brats, nnunet or manifest."),
    format: str = typer.Option("auto", help="Source format."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty destination."),
) -> None:
    """Convert a data set between the BraTS, nnU-Net v2 and manifest layouts."""
    from medmodal.data.check import convert_dataset

    out = convert_dataset(src, dst, to=to, src_format=format, overwrite=overwrite)
    console.print(f"converted {src} → {out} ({to})")


# -- train / evaluate / predict -------------------------------------------------------------------------------
def _parse_sets(sets: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for s in sets:
        if "=" not in s:
            raise RecipeError(f"--set {s!r}: expected key=value, e.g. train.max_steps=100")
        key, value = s.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
@user_errors
def train(
    recipe: str = typer.Argument("quickstart", help="A recipe YAML file or a built-in recipe name."),
    out: Path | None = typer.Option(None, help="Run folder (default runs/<recipe name>)."),
    resume: Path | None = typer.Option(None, help="Continue the interrupted run in this folder."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field: --set train.max_steps=100."),
    devices: int | None = typer.Option(None, help="Processes per node (DDP when > 1)."),
    num_nodes: int | None = typer.Option(None, help="Nodes (DDP)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
) -> None:
    """Train a recipe (data, model, method) into a run folder; resumable."""
    from medmodal.engine.recipe import builtin_recipe_path, load_recipe
    from medmodal.engine.train import train as train_fn

    if resume is not None:
        run = train_fn(None, resume, resume=True)
    else:
        overrides = _parse_sets(set_)
        if devices is not None:
            overrides["train.devices"] = devices
        if num_nodes is not None:
            overrides["train.num_nodes"] = num_nodes
        path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else builtin_recipe_path(recipe)
        rec = load_recipe(path, overrides=overrides)
        run = train_fn(rec, out or Path("runs") / rec.name, overwrite=overwrite)
    console.print(f"[bold green]trained[/]: {run}")


@app.command()
@user_errors
def evaluate(
    run: Path = typer.Argument(..., help="A trained run folder."),
    out: Path | None = typer.Option(None, help="Output folder (default RUN/eval)."),
    split: str = typer.Option("val", help="val (the run's held-out cases) or all."),
    overwrite: bool = typer.Option(False, help="Replace an existing evaluation in --out."),
    features: bool = typer.Option(
        False, "--features", help="ShaSpec runs: also a t-SNE picture of shared vs specific features (features.png)."
    ),
) -> None:
    """Dice and HD95 per region for every non-empty subset of modalities; CSV, report.md, heatmap."""
    from medmodal.engine.evaluate import evaluate_run

    if split not in ("val", "all"):
        raise RunError(f"--split: expected val or all, got {split!r}")
    evaluate_run(run, out_dir=out, split=split, overwrite=overwrite, features=features)
    console.print(f"[bold green]evaluated[/]: {(out or run / 'eval') / 'report.md'}")


@app.command()
@user_errors
def predict(
    run: Path = typer.Argument(..., help="A trained run folder."),
    out: Path = typer.Option(..., help="Output folder for <case>_seg.nii.gz."),
    data: Path | None = typer.Option(None, help="A data set (BraTS / nnU-Net / manifest) to segment."),
    image: list[str] = typer.Option([], help="One case given as modality=file, repeated: --image t1=a.nii.gz."),
    case_id: str = typer.Option("case", help="Name of the --image case."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs."),
) -> None:
    """Segment cases from whichever modalities they have; outputs land on each input's own grid."""
    from medmodal.engine.predict import predict_run, records_from_images

    if (data is None) == (not image):
        raise DataError("give either --data DIR or one or more --image modality=file")
    if data is not None:
        from medmodal.data.formats import open_dataset

        _, records = open_dataset(data)
    else:
        pairs = {}
        for item in image:
            if "=" not in item:
                raise DataError(f"--image {item!r}: expected modality=file, e.g. flair=case_flair.nii.gz")
            mod, file = item.split("=", 1)
            pairs[mod.strip().lower()] = Path(file)
        records = records_from_images(pairs, case_id=case_id)
    written = predict_run(run, records, out, overwrite=overwrite)
    console.print(f"[bold green]wrote[/] {len(written)} segmentation(s) to {out}")


# -- commands defined next to their method (medmodal.commands.*) ----------------------------------------------
_registration_commands.add_commands(app)
_fusion_commands.add_commands(app)
_deepstaple_commands.add_commands(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
