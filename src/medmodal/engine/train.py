"""``train``: ask the recipe's method plug-in for its system and data, then run Lightning on them.

Generic: the method's package builds everything method-specific (:meth:`MethodPlugin.build`); this module owns
the run folder, checkpoints, the non-finite-loss guard, resuming and multi-process training.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from medmodal.atomic import atomic_write_text
from medmodal.engine.distributed import is_rank_zero
from medmodal.engine.plugin import Training, get_method
from medmodal.engine.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    resolve_paths,
)
from medmodal.engine.run import (
    DistributedReport,
    GracefulInterrupt,
    LastCheckpoint,
    MetricsCSV,
    NonFiniteGuard,
    NonFiniteLossError,
    ResumableLoader,
    RunError,
    SafetensorsWeights,
    StepProgressBar,
    attach_log_file,
    quiet_third_party,
    setup_run_folder,
)
from medmodal.engine.runinfo import RunInfo, training_data_description, write_run_info

log = logging.getLogger("medmodal")

#: recipe fields ``--resume`` may change: they alter neither the data seen nor the optimisation so far.
RESUME_SAFE = ("train.max_steps", "train.progress", "train.threads", "train.checkpoint_every_steps",
               "train.gradient_clip_norm", "train.accelerator", "eval.")


def build_training(recipe: Recipe) -> Training:
    """The method plug-in's system, data module and run description for ``recipe``."""
    return get_method(recipe.method.name).build(recipe)


def resume_overrides(stored: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """``stored`` with the ``--set`` options of a ``--resume`` applied, if they are safe to change mid-run.

    Safe: :data:`RESUME_SAFE` (``train.max_steps`` only upwards of the steps done is checked by the caller).
    ``train.devices`` and ``train.num_nodes`` may be repeated with their stored value only: each rank's random
    state is in the checkpoint. Anything else would make the resumed run a different run: a
    :class:`RecipeError` says so and what to do instead.
    """
    if not overrides:
        return stored
    refused = []
    for key, value in overrides.items():
        if key in ("train.devices", "train.num_nodes"):
            if int(value) != getattr(stored.train, key.split(".")[1]):
                refused.append(f"{key}={value} (the run trains on {stored.train.devices} device(s) × "
                               f"{stored.train.num_nodes} node(s); each rank's random state is in the checkpoint)")
        elif not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE):
            refused.append(key)
    if refused:
        raise RecipeError(
            "--resume cannot change " + ", ".join(refused) + "; resuming continues the same run. Allowed: "
            + ", ".join(k + ("*" if k.endswith(".") else "") for k in RESUME_SAFE)
            + ". Start a new run (`medmodal train RECIPE --set ...`) to change the rest."
        )
    data = apply_overrides(stored.model_dump(mode="json"), dict(overrides))
    return recipe_from_dict(data, where="--resume --set")


def align_names(offered: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """``offered`` renamed to ``own``'s names when one network is a submodule of the other: the prefix (one
    leading name component added to, or removed from, every offered name) that makes the most names and shapes
    match wins; unchanged when the names match as they are (or nothing does better). A pretrained backbone thereby
    loads into a fine-tuning wrapper (``vit.*``) and back."""

    def hits(names: Mapping[str, Any]) -> int:
        return sum(1 for k, v in names.items() if k in own and tuple(v.shape) == tuple(own[k].shape))

    best, best_hits = dict(offered), hits(offered)
    prefixes = {k.split(".", 1)[0] + "." for k in own if "." in k}
    candidates = [{p + k: v for k, v in offered.items()} for p in sorted(prefixes)]
    prefixes_off = {k.split(".", 1)[0] + "." for k in offered if "." in k}
    candidates += [{k[len(p):]: v for k, v in offered.items() if k.startswith(p)} for p in sorted(prefixes_off)]
    for names in candidates:
        n = hits(names)
        if n > best_hits:
            best, best_hits = names, n
    return best


def initialise_from(network: nn.Module, recipe: Recipe, plugin: Any) -> dict[str, Any]:
    """Copy into ``network`` every tensor of the run ``recipe.train.init_from`` whose name and shape match
    (:meth:`~medmodal.engine.plugin.MethodPlugin.initial_weights` names them, :func:`align_names` adds or removes a
    submodule prefix); returns what ``run.json`` records:
    the source run, the names loaded, and those left as initialised (absent from the source, or of another shape).
    A source that matches nothing is a :class:`RecipeError` (a run of another network, most likely)."""
    from medmodal.engine.runinfo import load_run

    path = recipe.train.init_from
    try:
        source = load_run(path)
    except RunError as err:
        raise RecipeError(f"train.init_from: {err}") from None
    own = network.state_dict()
    offered = align_names(plugin.initial_weights(recipe, source), own)
    loaded = {k: v for k, v in offered.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not loaded:
        raise RecipeError(f"train.init_from: no parameter of {path} ({source.info.network.get('name')}, method "
                          f"{source.info.method}) matches this recipe's network {recipe.model.name!r} by name and "
                          "shape; start from a run of the same network")
    other_shape = sorted(k for k, v in offered.items() if k in own and k not in loaded)
    fresh = sorted(k for k in own if k not in loaded)
    network.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in loaded.items()}})
    log.info("initialised %d of %d tensors from %s%s", len(loaded), len(own), path,
             f"; {len(fresh)} keep their initialisation (e.g. {fresh[0]})" if fresh else "")
    return {"run": str(path), "method": source.info.method, "network": source.info.network.get("name"),
            "loaded": len(loaded), "total": len(own), "not_loaded": fresh, "other_shape": other_shape}


def train(
    recipe: Recipe | None,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Train ``recipe`` into ``run_dir`` (see :mod:`medmodal.engine.run` for the layout).

    With ``resume=True`` the run continues from ``run_dir/checkpoints/last.ckpt`` with the recipe stored in the
    run folder (``recipe`` must then be ``None``; ``overrides`` may change what :func:`resume_overrides`
    allows). An existing non-empty folder is replaced only with ``overwrite=True``, and only once the recipe has
    been validated and its data, network and system built. A run that fails before its first optimiser step
    leaves no folder behind.

    In multi-process training (``train.devices × train.num_nodes > 1``, launched by Lightning, torchrun or
    SLURM) every rank calls this function; rank 0 alone writes the run folder, its logs and reports.
    """
    run_dir = Path(run_dir).resolve()
    rank0 = is_rank_zero()
    if resume:
        if recipe is not None:
            raise RecipeError("--resume takes the recipe from the run folder; do not name a recipe as well")
        setup_run_folder(run_dir, resume=True, overwrite=False)
        stored = load_recipe(run_dir / "recipe.yaml")
        recipe = resume_overrides(stored, overrides or {})
        done = _checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
        if recipe.train.max_steps < done:
            raise RecipeError(f"train.max_steps={recipe.train.max_steps}: the run has done {done} steps already")
    elif recipe is None:
        raise RecipeError("train: a recipe is required unless resuming")
    elif overrides:
        raise RecipeError("train: overrides apply to --resume only; put them in the recipe")
    else:
        recipe = resolve_paths(recipe)
    _check_accelerator(recipe.train.accelerator)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    quiet_third_party()
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    plugin = get_method(recipe.method.name)
    built = plugin.build(recipe)  # validates data, network and system before anything is written or deleted
    initialised = None
    if not resume and recipe.train.init_from is not None:
        initialised = initialise_from(built.system.network, recipe, plugin)

    created = fresh = False
    if rank0 and not resume:
        created = setup_run_folder(run_dir, resume=False, overwrite=overwrite)
        fresh = True  # the folder is new or empty now (an --overwrite emptied it)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        attach_log_file(run_dir)
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        write_run_info(run_dir, RunInfo(
            method=recipe.method.name, task=built.task, spatial_dims=recipe.spatial_dims,
            modalities=list(built.modalities), preprocessing=built.preprocessing,
            network={"name": built.network_name, "kwargs": built.network_kwargs}, inference=built.inference,
            training_data=built.training_data or training_data_description(
                recipe, dataset_name=_dataset_name(built), synthetic=_synthetic(built)),
            initialised_from=initialised,
        ))

    t = recipe.train
    ckpt_dir = run_dir / "checkpoints"
    cbs: list[L.Callback] = [
        NonFiniteGuard(),
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=t.checkpoint_every_steps, save_last=True, save_top_k=0,
        ),
        LastCheckpoint(ckpt_dir / "last.ckpt"),
        GracefulInterrupt(ckpt_dir / "last.ckpt"),
        SafetensorsWeights(run_dir / "weights", name=built.network_name, kwargs=built.network_kwargs),
        MetricsCSV(run_dir / "metrics.csv"),
        DistributedReport(run_dir / "distributed.json"),
        *built.callbacks,
        *callbacks,
    ]
    if t.progress:
        cbs.append(StepProgressBar(leave=True))
    multi = recipe.world_size > 1
    strategy: Any = "auto"
    if multi:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=plugin.ddp_find_unused_parameters(recipe))
    trainer = L.Trainer(
        max_steps=t.max_steps,
        max_epochs=-1,  # max_steps ends training; an epoch is val_every_steps batches
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        callbacks=cbs,
        logger=False,
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        log_every_n_steps=1,
        default_root_dir=run_dir,
        use_distributed_sampler=False,  # the data modules split batches between ranks themselves
        gradient_clip_val=t.gradient_clip_norm if built.system.automatic_optimization else None,
    )
    make_loader = built.data.train_dataloader
    built.data.train_dataloader = lambda: ResumableLoader(make_loader(), lambda: built.data.trainer)  # type: ignore[method-assign]
    ckpt = ckpt_dir / "last.ckpt" if resume else None
    log.info("training %s (%s) into %s%s", recipe.model.name, recipe.method.name, run_dir,
             f", resuming from {ckpt}" if ckpt else "")
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(built.system, datamodule=built.data, ckpt_path=ckpt)
    except NonFiniteLossError as err:
        raise RunError(
            f"{err}. The last good state is {ckpt_dir / 'last.ckpt'} (step "
            f"{_checkpoint_step(ckpt_dir / 'last.ckpt') if (ckpt_dir / 'last.ckpt').is_file() else 0}); the state "
            f"at the failure is in {ckpt_dir / 'exception.ckpt'}. Lower train.lr or set train.gradient_clip_norm "
            "and train again, or resume with `--set train.gradient_clip_norm=1.0`."
        ) from None
    except SystemExit:  # Lightning turns Ctrl-C into a graceful shutdown followed by sys.exit(1)
        if trainer.interrupted:
            raise RunError(
                f"training was interrupted at step {trainer.global_step}; "
                f"continue with `medmodal train --resume {run_dir}`"
            ) from None
        raise
    except BaseException:
        if fresh and trainer.global_step == 0:  # nothing trained: leave nothing that blocks a retry
            _empty_run_folder(run_dir, remove=created)
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_sigint)  # Lightning leaves Ctrl-C ignored after an interrupt
    if trainer.global_rank == 0:
        atomic_write_text(
            run_dir / "split.json",
            json.dumps({"train": built.data.train_ids, "val": built.data.val_ids,
                        **getattr(built.data, "extra_splits", {})}, indent=2),
        )
    return run_dir


def _check_accelerator(accelerator: str) -> None:
    """A one-line :class:`RecipeError` for ``train.accelerator=gpu`` on a machine where torch sees no GPU (Lightning
    would raise deep inside the trainer, after the run folder was made)."""
    mps = getattr(torch.backends, "mps", None)
    if accelerator == "gpu" and not (torch.cuda.is_available() or (mps is not None and mps.is_available())):
        raise RecipeError("train.accelerator=gpu: torch sees no GPU on this machine (torch.cuda.is_available() is "
                          "False); use train.accelerator=auto (GPU when there is one) or cpu")


def _empty_run_folder(run_dir: Path, *, remove: bool) -> None:
    """Remove what a run that failed before its first step wrote: the folder itself if this run created it,
    else its contents (it was empty when the run began)."""
    for name in ("medmodal", "lightning.pytorch", "lightning.fabric"):  # release log.txt
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, "_medmodal_run_log", False)]:
            lg.removeHandler(h)
            h.close()
    if remove:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for p in run_dir.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def _dataset_name(built: Training) -> str:
    source = getattr(built.data, "source", None)
    return getattr(getattr(source, "info", None), "name", "") or ""


def _synthetic(built: Training) -> bool:
    source = getattr(built.data, "source", None)
    return bool(getattr(getattr(source, "info", None), "synthetic", False))


def is_finished_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that finished training (its split and final weights are written)."""
    run_dir = Path(run_dir)
    return (run_dir / "split.json").is_file() and (run_dir / "weights" / "model.safetensors").is_file()


def train_or_resume(recipe: Recipe, run_dir: Path, *, overwrite: bool = False) -> Path:
    """The run of ``recipe`` in ``run_dir`` for a command that trains several runs (an experiment): a finished run
    is reused, an interrupted one resumed from its ``last.ckpt``, anything else (or everything, with
    ``overwrite``) trained afresh. Returns ``run_dir``."""
    run_dir = Path(run_dir)
    if is_finished_run(run_dir) and not overwrite:
        log.info("%s is trained; reusing it", run_dir)
    elif (run_dir / "checkpoints" / "last.ckpt").is_file() and not overwrite:
        log.info("resuming the interrupted run in %s", run_dir)
        train(None, run_dir, resume=True)
    else:
        train(recipe, run_dir, overwrite=True)
    return run_dir
