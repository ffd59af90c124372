"""The ``medmodal`` command: data tools, train, evaluate, predict, register, fuse, and what each method plug-in
adds (``quickstart``, ``experiment ...``).

Every command exits 0 on success, 2 on a user error (bad data, recipe, run folder) with a one-paragraph
message that names the file or field, and 1 on an unexpected failure.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import typer

from medmodal.commands import fusion as _fusion_commands
from medmodal.commands import pretrain as _pretrain_commands
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
data_app = typer.Typer(
    help="Generate, validate and convert data sets.\n\n"
    "medmodal reads three layouts. A BraTS folder: <root>/<case>/<case>_t1.nii.gz, _t1ce (or _t1c), _t2, _flair and "
    "_seg.nii.gz (BraTS 2023 names -t1n, -t1c, -t2w, -t2f, -seg too); a missing modality file is a missing "
    "modality. An nnU-Net v2 raw folder: <root>/dataset.json (channel_names, labels, file_ending), "
    "imagesTr/<case>_0000.nii.gz, ... and labelsTr/<case>.nii.gz. A CSV manifest with a header "
    "case_id,<modality>,...,label[,target,report,source] (column names in any case; an empty cell is a missing "
    "modality or label; target is a class index or name, classes declared in a medmodal.json beside the CSV) "
    "or a JSON manifest {\"modalities\": [...], \"cases\": [{\"case_id\": ..., \"images\": {...}, "
    "\"label\": ...}]}; relative paths in a manifest start at the manifest's folder. Images may be NIfTI, NRRD, "
    "MHA or a DICOM series folder.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

def _setup_logging(verbose: bool) -> None:
    from medmodal.engine.run import quiet_third_party

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("medmodal").setLevel(logging.INFO)
    quiet_third_party()  # after basicConfig: it filters the console handlers that exist


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


# -- data -----------------------------------------------------------------------------------------------------
@data_app.command("phantom")
@user_errors
def data_phantom(
    out: Path = typer.Option(..., file_okay=False, help="Output folder."),
    kind: str = typer.Option("brain", help="brain (multi-modal brain tumour, BraTS labels) or chest_xray (2D chest "
                             "X-rays: lung masks, classes normal/opacity, several sources)."),
    cases: int = typer.Option(40, min=1, help="Number of cases."),
    dims: int | None = typer.Option(None, min=2, max=3, help="brain: 2 or 3 spatial dimensions (default 3)."),
    size: int = typer.Option(64, min=8, help="Voxels per axis (chest_xray: source A's pixels per side, >= 16)."),
    seed: int = typer.Option(0, min=0, help="Random seed (same seed, same data)."),
    spacing: str | None = typer.Option(None, help="brain: voxel spacing in mm, e.g. 1,1,3 (default isotropic 1 mm)."),
    missing_rate: float | None = typer.Option(None, min=0.0, max=0.99,
                                              help="brain: chance each modality file is left out (default 0)."),
    layout: str | None = typer.Option(None, help="brain: brats (default) or nnunet. chest_xray is always a "
                                      "manifest (manifest.csv, medmodal.json, images/, masks/)."),
    sources: str | None = typer.Option(None, help="chest_xray: a number of sources (default 3) or names, e.g. "
                                       "A,C (sources A-F)."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out."),
) -> None:
    """Write a procedural phantom (synthetic) as a data set: the multi-modal brain-tumour phantom, or the chest
    X-ray phantom (lung masks, a class, several sources)."""
    if kind == "chest_xray":
        from medmodal.data.phantom_xray import chest_source_names, write_chest_phantom

        given = {"--dims": dims not in (None, 2), "--spacing": spacing is not None,
                 "--missing-rate": missing_rate not in (None, 0.0), "--layout": layout not in (None, "manifest")}
        refused = [name for name, set_ in given.items() if set_]
        if refused:
            raise DataError(f"{', '.join(refused)}: not an option of the chest_xray phantom (2D, one modality, each "
                            "source with its own pixel spacing, a manifest data set); drop it")
        if size < 16:
            raise DataError(f"--size {size}: the chest_xray phantom needs at least 16 pixels per side")
        text = (sources or "3").strip()
        try:
            names = chest_source_names(int(text) if text.isdigit() else [s for s in text.split(",") if s.strip()])
        except DataError as err:
            raise DataError(f"--sources {text}: {err}") from None
        root = write_chest_phantom(out, cases=cases, seed=seed, size=size, sources=names, overwrite=overwrite,
                                   progress=True)
        console.print(f"wrote {cases} synthetic chest X-ray phantom case(s) (sources {', '.join(names)}; manifest "
                      f"layout) to {root}")
        return
    if kind != "brain":
        raise DataError(f"--kind: expected brain or chest_xray, got {kind!r}")
    if sources is not None:
        raise DataError("--sources: only the chest_xray phantom has sources; add --kind chest_xray or drop it")
    from medmodal.data.phantom import write_phantom

    dims = 3 if dims is None else dims
    layout = layout or "brats"
    if layout not in ("brats", "nnunet"):
        raise DataError(f"--layout: expected brats or nnunet, got {layout!r}")
    sp = _floats(spacing, option="--spacing")
    if sp is not None and len(sp) != dims:
        raise DataError(f"--spacing: {len(sp)} values for a {dims}D phantom")
    if sp is not None and not all(math.isfinite(v) and v > 0 for v in sp):
        raise DataError(f"--spacing {spacing}: voxel sizes must be finite positive numbers in mm, e.g. 1,1,3")
    root = write_phantom(out, cases=cases, seed=seed, spatial_dims=dims, size=size, spacing=sp,
                         missing_rate=missing_rate or 0.0, layout=layout, overwrite=overwrite, progress=True)
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
        # the case and the file, unless the message names them already (it usually starts with the file)
        where = " ".join(str(x) for x in (p.case_id, p.path) if x is not None and str(x) not in p.message)
        console.print(f"[{style}]{where}[/]: {p.message}" if where else f"[{style}]{p.message}[/]", highlight=False,
                      soft_wrap=True)
    if info is not None:
        _print_label_counts(info, records)
        console.print(f"{path}: {len(records)} case(s), modalities {list(info.modalities)}; "
                      f"{len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
    if errors:
        raise typer.Exit(code=2)


def _print_label_counts(info: Any, records: list) -> None:
    """A table per source: images, masks, class labels per class, unlabelled images (from the index)."""
    from rich.table import Table

    from medmodal.data.check import label_counts

    counts = label_counts(info, records)
    if not counts:
        return
    classes = list(counts[0].classes)
    table = Table(box=None, pad_edge=False)
    for col in ("source", "images", "masks", *(f"class {c}" for c in classes), "unlabelled"):
        table.add_column(col, justify="left" if col == "source" else "right")
    rows = [(c.source or "(none)", c.images, c.masks, *c.classes.values(), c.unlabelled) for c in counts]
    if len(counts) > 1:
        rows.append(("all", *(sum(r[i] for r in rows) for i in range(1, len(rows[0])))))
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


@data_app.command("convert")
@user_errors
def data_convert(
    src: Path = typer.Argument(..., help="Source data set."),
    dst: Path = typer.Argument(..., help="Destination folder; with --to manifest a .csv/.json file instead lists "
                               "the source's own files (paths relative to the manifest's folder), copying nothing."),
    to: str = typer.Option(..., help="brats, nnunet or manifest."),
    format: str = typer.Option("auto", help="Source format."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty destination."),
) -> None:
    """Convert a data set between the BraTS, nnU-Net v2 and manifest layouts."""
    from medmodal.data.check import convert_dataset

    out = convert_dataset(src, dst, to=to, src_format=format, overwrite=overwrite)
    console.print(f"converted {src} → {out} ({to})")


# -- train / evaluate / predict -------------------------------------------------------------------------------
@app.command()
@user_errors
def train(
    recipe: str | None = typer.Argument(
        None, help="A recipe YAML file or a built-in recipe name (default quickstart)."
    ),
    out: Path | None = typer.Option(None, file_okay=False, help="Run folder (default runs/<recipe name>)."),
    resume: Path | None = typer.Option(None, help="Continue the interrupted run in this folder."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field: --set train.max_steps=100."),
    devices: int | None = typer.Option(None, help="Processes per node (DDP when > 1)."),
    num_nodes: int | None = typer.Option(None, help="Nodes (DDP)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder (only a medmodal run)."),
    from_: Path | None = typer.Option(None, "--from", file_okay=False,
                                      help="Start from this run's weights (fine-tuning; recipe train.init_from)."),
) -> None:
    """Train a recipe (data, model, method) into a run folder; resumable.

    With --resume, --set may change what does not alter the run so far (train.max_steps, train.threads,
    train.progress, train.checkpoint_every_steps, train.gradient_clip_norm, eval.*); other changes are refused.
    """
    from medmodal.engine.recipe import builtin_recipe_path, load_recipe, parse_overrides
    from medmodal.engine.train import train as train_fn

    overrides = parse_overrides(set_)
    if devices is not None:
        overrides["train.devices"] = devices
    if num_nodes is not None:
        overrides["train.num_nodes"] = num_nodes
    if from_ is not None:
        if resume is not None:
            raise RunError("--from sets the starting weights of a new run; a resumed run continues from its own "
                           "checkpoint: drop --from")
        overrides["train.init_from"] = str(from_)
    if resume is not None:
        if recipe is not None:
            raise RecipeError(f"--resume takes the recipe stored in {resume}; drop the recipe argument {recipe!r}")
        if out is not None or overwrite:
            raise RunError("--resume continues the run in its own folder; drop --out and --overwrite")
        run = train_fn(None, resume, resume=True, overrides=overrides)
    else:
        recipe = recipe or "quickstart"
        path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else builtin_recipe_path(recipe)
        rec = load_recipe(path, overrides=overrides)
        run = train_fn(rec, out or Path("runs") / rec.name, overwrite=overwrite)
    from medmodal.engine.distributed import is_rank_zero

    if is_rank_zero():  # every rank of a multi-process run returns here; one line is enough
        console.print(f"[bold green]trained[/]: {run}")


@app.command()
@user_errors
def methods() -> None:
    """List the registered methods: name, what they do, spatial dimensions, and their recipe section's fields."""
    from rich.table import Table

    from medmodal.engine.plugin import get_method, method_names

    table = Table(box=None, pad_edge=False)
    for col in ("method", "what", "dims", "recipe fields (method.*)"):
        table.add_column(col)
    for name in method_names():
        p = get_method(name)
        fields = ", ".join(f for f in p.config.model_fields if f != "name")
        table.add_row(name + (" (default)" if p.default else ""), p.summary, "/".join(f"{d}D" for d in p.spatial_dims),
                      fields)
    console.print(table)


@app.command()
@user_errors
def evaluate(
    run: Path = typer.Argument(..., help="A trained run folder."),
    out: Path | None = typer.Option(None, file_okay=False, help="Output folder (default RUN/eval)."),
    split: str = typer.Option("val", help="val (the run's held-out cases) or all."),
    data: Path | None = typer.Option(None, help="Evaluate on every case of this labelled data set instead."),
    overwrite: bool = typer.Option(False, help="Replace an existing evaluation in --out."),
    features: bool = typer.Option(
        False, "--features", help="Also a picture of the model's features, where the method has one (ShaSpec: "
        "t-SNE of shared vs specific features)."
    ),
    against: Path | None = typer.Option(None, help="Another run of the same method and data to score on the same "
                                                   "cases and test against (where the method compares runs)."),
) -> None:
    """Evaluate a run with its method's evaluation (segmentation: Dice and HD95 for every modality subset)."""
    from medmodal.engine.evaluate import evaluate_run

    if data is not None:
        from medmodal.data.formats import open_dataset
        from medmodal.engine.runinfo import load_run

        _warn_once(load_run(run).data_warning(data_synthetic=open_dataset(data)[0].synthetic))
    report = evaluate_run(run, out_dir=out, split=split, data=data, overwrite=overwrite, features=features,
                          against=against)
    console.print(f"[bold green]evaluated[/]: {report}")


@app.command()
@user_errors
def predict(
    run: Path = typer.Argument(..., help="A trained run folder (its training data is not needed)."),
    out: Path = typer.Option(..., file_okay=False,
                             help="Output folder: <case>_seg.nii.gz per case, or predictions.csv."),
    data: Path | None = typer.Option(None, help="A data set (BraTS / nnU-Net / manifest) to process."),
    image: list[str] = typer.Option([], help="One case given as modality=file, repeated: --image t1=a.nii.gz."),
    case_id: str = typer.Option("case", help="Name of the --image case."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs."),
) -> None:
    """Apply a run's model to cases from whichever modalities they have; outputs land on each input's grid."""
    loaded, plugin, records, _fmt, _info = _run_inputs(run, data, image, case_id, operation="predict")
    written = plugin.predict(loaded, records, out, overwrite=overwrite, progress=True)
    console.print(f"[bold green]wrote[/] {len(written)} file(s) to {out}")


@app.command()
@user_errors
def synthesize(
    run: Path = typer.Argument(..., help="A trained run of a method that synthesises images."),
    out: Path = typer.Option(..., file_okay=False,
                             help="Output folder: the completed data set, in the input's layout."),
    data: Path | None = typer.Option(None, help="A data set (BraTS / nnU-Net / manifest) whose cases lack "
                                                "modalities."),
    image: list[str] = typer.Option([], help="One case given as modality=file, repeated: --image t1=a.nii.gz."),
    case_id: str = typer.Option("case", help="Name of the --image case."),
    sampler: str | None = typer.Option(None, help="ddpm or ddim (default: the run's)."),
    steps: int | None = typer.Option(None, min=1, help="Sampler steps (default: the run's)."),
    eta: float | None = typer.Option(None, min=0.0, max=1.0, help="DDIM eta (0: deterministic, 1: DDPM-like)."),
    seed: int | None = typer.Option(None, min=0, help="Seed of the sampling noise (default: the run's)."),
    batch_size: int | None = typer.Option(None, min=1, help="Slices or volumes per network call."),
    device: str = typer.Option("auto", help="auto (the GPU when there is one), cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Fill each case's missing modalities and write a complete data set (synthetic files marked as such)."""
    loaded, plugin, records, fmt, info = _run_inputs(run, data, image, case_id, operation="synthesize")
    options = {"sampler": sampler, "steps": steps, "eta": eta, "seed": seed, "batch_size": batch_size,
               "device": device}
    written = plugin.synthesize(loaded, records, out, source=data, source_format=fmt, source_info=info,
                                options=options, overwrite=overwrite, progress=True)
    console.print(f"[bold green]wrote[/] the completed data set to {written}")


def _run_inputs(run: Path, data: Path | None, image: list[str], case_id: str, *,
                operation: str) -> tuple[Any, Any, list, str, Any]:
    """``(loaded run, its plug-in, case records, data-set format)`` of a ``predict``-style call; a run whose
    method does not offer ``operation`` is refused before any input is read."""
    from medmodal.engine.plugin import get_method
    from medmodal.engine.predict import records_from_images
    from medmodal.engine.runinfo import load_run

    if (data is None) == (not image):
        raise DataError("give either --data DIR or one or more --image modality=file")
    if image:
        _check_case_id_option(case_id)
    loaded = load_run(run)
    plugin = get_method(loaded.info.method)
    if not plugin.offers(operation):
        raise plugin.not_offered(operation)
    fmt, info = "images", None
    if data is not None:
        from medmodal.data.formats import detect_format, open_dataset

        info, records = open_dataset(data)
        fmt = detect_format(data)
        data_synthetic = info.synthetic
    else:
        pairs = _image_pairs(image)
        unused = sorted(set(pairs) - set(loaded.info.modalities))
        if unused:  # a name typed on the command line is never silently dropped
            from medmodal.data.formats.brats import MODALITY_ALIASES

            what = ("unknown modality name(s)" if set(unused) - set(MODALITY_ALIASES.values())
                    else "modality(ies) this model does not use:")
            raise DataError(f"--image: {what} {unused}; the model of {run} uses {list(loaded.info.modalities)}")
        records = records_from_images(pairs, case_id=case_id)
        data_synthetic = False
    _warn_once(loaded.data_warning(data_synthetic=data_synthetic))
    return loaded, plugin, records, fmt, info


def _check_case_id_option(case_id: str) -> None:
    from medmodal.data.formats.brats import check_case_id

    try:
        check_case_id(case_id)
    except DataError:
        raise DataError(f"--case-id {case_id!r}: must be a plain file name (letters, digits, '-', '_'; no '/', "
                        "'\\' or leading '.'): the output is <case-id>_seg.nii.gz inside --out") from None


def _image_pairs(items: list[str]) -> dict[str, Path]:
    """``--image modality=file`` options as ``{modality: file}``; names normalised (``T1ce`` is ``t1c``)."""
    from medmodal.data.formats import canonical_modality

    pairs: dict[str, Path] = {}
    for item in items:
        if "=" not in item:
            raise DataError(f"--image {item!r}: expected modality=file, e.g. flair=case_flair.nii.gz")
        name, file = item.split("=", 1)
        mod = canonical_modality(name)
        if not mod:
            raise DataError(f"--image {item!r}: no modality name before '='; e.g. flair=case_flair.nii.gz")
        if not file.strip():
            raise DataError(f"--image {mod}=: no file after '='; give the image file (or DICOM series folder), "
                            f"e.g. {mod}=case_{mod}.nii.gz")
        if mod in pairs:
            raise DataError(f"--image {mod} is given twice ({pairs[mod]} and {file.strip()}); give each modality "
                            "once")
        pairs[mod] = Path(file.strip())
    return pairs


def _warn_once(message: str | None) -> None:
    if message:
        err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


# -- the label tools, then the commands each method plug-in adds --------------------------------------------
_registration_commands.add_commands(app)
_fusion_commands.add_commands(app)
_pretrain_commands.add_commands(app)


def _add_method_commands() -> None:
    from medmodal.engine.plugin import get_method, method_names

    for name in method_names():
        get_method(name).add_commands(app)


_add_method_commands()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # outside a command (commands report Ctrl-C themselves: user_errors)
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
