"""``medmodal pretrain`` for MedCoSS: run a recipe's stages one after the other, or add a stage to a model.

* ``medmodal pretrain medcoss_tiny --out runs/medcoss``: stage ``k`` trains into ``runs/medcoss/<k>_<name>`` from
  the run of stage ``k - 1`` (its encoder as the student's start and as the frozen teacher, its buffers); each stage
  is evaluated (linear probes) and ``report.md`` gathers them. An interrupted stage resumes; finished ones are kept.
* ``medmodal pretrain --from runs/medcoss/4_slices --stage pathology --data DIR``: the model continues with a new
  modality (MedCoSS#14, the step the official code never released): the recipe of the ``--from`` run gets the stage
  appended, and the new run carries every earlier buffer plus its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medmodal.engine.plugin import PretrainRequest
from medmodal.engine.recipe import Recipe, RecipeError, builtin_recipe_path, load_recipe
from medmodal.engine.run import RunError
from medmodal.methods.medcoss.config import KIND_OF_NAME

log = logging.getLogger("medmodal")

DEFAULT_RECIPE = "medcoss_tiny"
FAST = {"train.max_steps": 4, "train.val_every_steps": 2, "train.checkpoint_every_steps": 2,
        "train.warmup_steps": 1}


def tiny_recipe() -> dict[str, Any]:
    """A two-stage recipe that trains in seconds (the method contract test): phantom reports, then 2D slices."""
    phantom = {"cases": 12, "spatial_dims": 2, "size": [33, 34], "seed": 1}
    return {
        "name": "contract_medcoss",
        "seed": 0,
        "data": {"phantom": phantom, "patch_size": [32, 32], "batch_size": 4, "num_workers": 0},
        "model": {"name": "medcoss_vit", "kwargs": {"width": 16, "depth": 1, "heads": 2, "patch_size_2d": 8,
                                                     "patch_size_3d": 8, "pos_grid_2d": [2, 2],
                                                     "pos_grid_3d": [2, 2, 1], "drop_path": 0.1}},
        "method": {"name": "medcoss", "text_max_length": 64, "text_vocab_size": 60, "input_size_2d": [16, 16],
                   "input_size_3d": [16, 16, 8], "decoder_width": 8, "decoder_depth": 1, "decoder_heads": 2,
                   "val_fraction": 0.25, "val_batches": 1,
                   "stages": [{"name": "report", "kind": "text", "data": {"phantom": phantom}},
                              {"name": "slices", "kind": "image2d",
                               "data": {"phantom": phantom, "modalities": ["t1c", "flair"]}}]},
        "train": {"max_steps": 3, "val_every_steps": 3, "checkpoint_every_steps": 1, "progress": False,
                  "accelerator": "cpu", "threads": 1, "lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.05},
    }


def stage_dir(out: Path, index: int, name: str) -> Path:
    return Path(out) / f"{index}_{name}"


def _recipe_path(name: str) -> Path:
    return Path(name) if name.endswith((".yaml", ".yml")) else builtin_recipe_path(name)


def stage_recipe(base: Path | Recipe, *, index: int, previous: Path | None, overrides: dict[str, Any],
                 fast: bool) -> Recipe:
    """The recipe of stage ``index`` (1-based) of ``base`` continuing from ``previous``."""
    extra = {**(FAST if fast else {}), **overrides, "method.stage": index,
             "method.previous_run": None if previous is None else str(previous),
             "train.init_from": None if previous is None else str(previous)}
    if isinstance(base, Recipe):
        from medmodal.engine.recipe import apply_overrides

        data = apply_overrides(base.model_dump(mode="json", exclude_none=False), extra)
        try:
            return Recipe.model_validate(data)
        except Exception as err:  # pydantic's ValidationError: one line naming the field
            raise RecipeError(f"the recipe of stage {index}: {err}") from None
    return load_recipe(base, overrides=extra)


def _finish(out: Path, runs: list[Path], *, fast: bool) -> Path:
    from medmodal.atomic import atomic_write_text
    from medmodal.engine.distributed import is_rank_zero
    from medmodal.engine.evaluate import evaluate_run

    if not is_rank_zero():  # the other processes of a multi-process run trained; rank 0 evaluates and reports
        return out / "report.md"
    lines = ["# MedCoSS pretraining", ""]
    if fast:
        lines += ["**FAST smoke version (a few steps per stage): not evidence.**", ""]
    for run in runs:
        report = evaluate_run(run, out_dir=run / "eval", overwrite=True, progress=False, model_name=run.name)
        body = report.read_text(encoding="utf-8").split("\n", 1)[1]
        lines += [f"## stage `{run.name}`", body.strip(), ""]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def run_stages(out: Path, *, recipe: str, overrides: dict[str, Any], fast: bool, overwrite: bool) -> Path:
    """Train every stage of ``recipe`` into ``out`` (module doc)."""
    from medmodal.engine.train import train_or_resume

    out = Path(out)
    if (out / "report.md").is_file() and not overwrite:
        raise RunError(f"{out}: holds a finished pretraining; pass --overwrite or choose another --out")
    path = _recipe_path(recipe)
    first = load_recipe(path, overrides={**(FAST if fast else {}), **overrides})
    m = first.method
    if m.strategy == "joint":
        run = stage_dir(out, 1, "joint")
        train_or_resume(stage_recipe(path, index=1, previous=None, overrides=overrides, fast=fast), run,
                        overwrite=overwrite)
        return _finish(out, [run], fast=fast)
    runs: list[Path] = []
    previous: Path | None = None
    for index, stage in enumerate(m.stages, start=1):
        run = stage_dir(out, index, stage.name)
        log.info("stage %d/%d: %s (%s) -> %s", index, len(m.stages), stage.name, stage.kind, run)
        train_or_resume(stage_recipe(path, index=index, previous=previous, overrides=overrides, fast=fast), run,
                        overwrite=overwrite)
        runs.append(run)
        previous = run.resolve()
    return _finish(out, runs, fast=fast)


def stage_kind(name: str, data: Path) -> str:
    """The kind of a stage added by name: the name says it (``report``, ``xray``, ``ct``...), else the images of
    ``data`` do (2D pictures: image2d; volumes: image3d)."""
    from medmodal.data.collections import list_collection, read_collection_image

    if name.lower() in KIND_OF_NAME:
        return KIND_OF_NAME[name.lower()]
    records = list_collection(data, modality=name)
    dims = {len(read_collection_image(r.path).array.shape) for r in records[:8]}
    flat = {d for d in dims if d == 2}
    if len(dims) != 1:
        raise RecipeError(f"--stage {name}: {data} mixes 2D and 3D images; one stage is one kind of image")
    return "image2d" if flat else "image3d"


def add_stage(request: PretrainRequest) -> Path:
    """``--from RUN --stage NAME --data DIR``: continue a model with one more modality (module doc)."""
    from medmodal.engine.train import train_or_resume
    from medmodal.methods.medcoss.plugin import load_previous

    if request.stage is None or request.data is None:
        raise RecipeError("adding a stage needs --stage NAME and --data DIR (a folder or manifest of images; a data "
                          "set of cases with reports for a text stage)")
    if request.recipes:
        raise RecipeError("--from continues the recipe of that run; give no recipe with it")
    previous = Path(request.from_run).resolve()
    prev = load_previous(previous)
    base = prev.recipe
    m = base.method
    done = prev.info.inference["stages"]
    if prev.info.inference.get("strategy") == "joint":
        raise RecipeError(f"--from {previous}: a joint run has no stages to continue; continue a medcoss or "
                          "sequential model")
    if request.stage in [s.name for s in m.stages]:
        raise RecipeError(f"--stage {request.stage}: the model already has a stage of that name ({done}); name the "
                          "new modality differently")
    data = Path(request.data).resolve()
    if not data.exists():
        raise RecipeError(f"--data {data}: not found")
    kind = stage_kind(request.stage, data)
    source = {"path": str(data)} if kind == "text" else {"collection": str(data)}
    stages = [s.model_dump(mode="json") for s in m.stages[: len(done)]]
    stages.append({"name": request.stage, "kind": kind, "data": source})
    index = len(stages)
    out = Path(request.out) if request.out is not None else previous.parent
    run = stage_dir(out, index, request.stage)
    if (run / "weights").exists() and not request.overwrite:
        from medmodal.engine.train import is_finished_run

        if is_finished_run(run):
            raise RunError(f"{run}: the stage is trained; pass --overwrite or choose another --out")
    recipe = stage_recipe(base, index=index, previous=previous, fast=request.fast,
                          overrides={**request.overrides, "method.stages": stages})
    train_or_resume(recipe, run, overwrite=request.overwrite)
    return _finish(run, [run], fast=request.fast)


def pretrain(request: PretrainRequest) -> Path:
    """``medmodal pretrain`` for MedCoSS (module doc)."""
    if request.from_run is not None:
        return add_stage(request)
    if request.stage is not None:
        raise RecipeError("--stage adds a stage to an existing model: give it with --from RUN and --data DIR")
    if len(request.recipes) > 1:
        raise RecipeError(f"MedCoSS pretraining takes one recipe (its stages in order), got {len(request.recipes)}")
    recipe = request.recipes[0] if request.recipes else DEFAULT_RECIPE
    overrides = dict(request.overrides)
    if request.data is not None:
        raise RecipeError("--data names a stage's data when adding a stage with --from; a recipe lists each "
                          "stage's data (method.stages[].data)")
    out = Path(request.out) if request.out is not None else Path("runs") / "medcoss"
    return run_stages(out, recipe=recipe, overrides=overrides, fast=request.fast, overwrite=request.overwrite)
