"""``train``: build the data, network and training system of a recipe and run Lightning on it."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from medmodal.engine.datamodule import CacheDataModule, EpochSeeder, resolve_source
from medmodal.engine.recipe import Recipe, RecipeError, dump_recipe, load_recipe
from medmodal.engine.run import (
    LastCheckpoint,
    MetricsCSV,
    RankMetrics,
    RunError,
    SafetensorsWeights,
    StepProgressBar,
    atomic_write_text,
    attach_log_file,
    quiet_third_party,
    setup_run_folder,
)
from medmodal.methods.segmentation import SegmentationSystem
from medmodal.methods.shaspec import ShaSpecSystem
from medmodal.networks.registry import create_network

log = logging.getLogger("medmodal")


def network_kwargs(recipe: Recipe, modalities: Sequence[str], n_regions: int) -> dict:
    """Constructor arguments of the recipe's network: the shared vocabulary plus ``model.kwargs``."""
    classification = getattr(recipe.method, "task", "segmentation") == "classification"
    shared = {
        "spatial_dims": recipe.spatial_dims,
        "modalities": list(modalities),
        "out_channels": 0 if classification else n_regions,
    }
    clash = sorted(set(shared) & set(recipe.model.kwargs))
    if clash:
        raise RecipeError(f"model.kwargs: {clash} are set from the data; remove them from the recipe")
    if classification and int(recipe.model.kwargs.get("num_classes", 0)) < 2:
        raise RecipeError("model.kwargs.num_classes: a classification task needs num_classes >= 2")
    kw = recipe.model.kwargs
    if classification and kw.get("norm", "instance") == "instance" and kw.get("cls_pool", "avg") == "avg":
        log.warning(
            "model.kwargs: classification with instance norm and an average-pooled head sees only the shape of "
            "each feature's distribution (instance norm removes every sample's mean); on the phantom it learns a "
            "constant class. Set model.kwargs.norm=batch or model.kwargs.cls_pool=avgmax (docs/shaspec.md)."
        )
    return {**shared, **kw}


def build_system(recipe: Recipe, modalities: Sequence[str], regions: dict) -> tuple[L.LightningModule, dict]:
    """The training system of ``recipe`` with a freshly initialised network; also returns the network kwargs."""
    kwargs = network_kwargs(recipe, modalities, len(regions))
    try:
        network = create_network(recipe.model.name, **kwargs)
    except (KeyError, TypeError, ValueError) as err:
        raise RecipeError(f"model: {err}") from None
    t, m = recipe.train, recipe.method
    common = dict(
        network=network,
        regions=regions,
        roi_size=recipe.eval_roi_size,
        optimizer=t.optimizer,
        lr=t.lr,
        weight_decay=t.weight_decay,
        momentum=t.momentum,
        schedule=t.schedule,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        lambda_dice=m.lambda_dice,
        lambda_bce=m.lambda_bce,
        overlap=recipe.eval.overlap,
        sw_batch_size=recipe.eval.sw_batch_size,
        seed=recipe.seed,
        channels_last=t.channels_last,
    )
    if m.name == "zero_fill":
        return SegmentationSystem(modality_dropout=m.modality_dropout, **common), kwargs
    if m.name == "shaspec":
        try:
            system = ShaSpecSystem(
                task=m.task, alpha=m.alpha, beta=m.beta, dao_form=m.dao_form, dao_pairs=m.dao_pairs,
                aux_on_missing=m.aux_on_missing, subset_sampler=m.subset_sampler, sample_per=m.sample_per,
                dedicated=m.dedicated, phases=[(p.steps, p.sampler) for p in m.phases or []],
                phase_schedule=m.phase_schedule, **common,
            )
        except ValueError as err:
            raise RecipeError(f"method: {err}") from None
        return system, kwargs
    raise RecipeError(f"method.name: {m.name!r} cannot be trained on cases by this engine")


def build_training(recipe: Recipe) -> tuple[L.LightningModule, L.LightningDataModule, dict]:
    """System, data module and network kwargs of ``recipe``, dispatched on ``method.name``.

    The data module exposes ``train_ids`` and ``val_ids`` once set up (written to ``split.json``).
    """
    if recipe.method.name == "deepstaple":
        from medmodal.engine.deepstaple import build_deepstaple

        return build_deepstaple(recipe)
    source = resolve_source(recipe.data)
    regions = dict(source.info.regions)
    system, kwargs = build_system(recipe, source.modalities, regions)
    t = recipe.train
    data = CacheDataModule(
        source=source,
        patch_size=tuple(recipe.data.patch_size),
        batch_size=recipe.data.batch_size,
        steps_per_epoch=min(t.val_every_steps, t.max_steps),
        foreground_fraction=recipe.data.foreground_fraction,
        num_workers=recipe.data.num_workers,
        val_fraction=recipe.data.val_fraction,
        seed=recipe.seed,
        progress=t.progress,
    )
    return system, data, kwargs


def train(
    recipe: Recipe | None,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Train ``recipe`` into ``run_dir`` (see :mod:`medmodal.engine.run` for the layout).

    With ``resume=True`` the run continues from ``run_dir/checkpoints/last.ckpt`` with the recipe stored in
    the run folder (``recipe`` may then be ``None``); an existing non-empty folder is never overwritten unless
    ``overwrite=True``.
    """
    run_dir = Path(run_dir)
    if resume:
        setup_run_folder(run_dir, resume=True, overwrite=False)
        recipe = load_recipe(run_dir / "recipe.yaml")
    elif not _is_ddp_child():  # DDP children re-run this function after rank 0 created the folder
        setup_run_folder(run_dir, resume=False, overwrite=overwrite)
    if recipe is None:
        raise RecipeError("train: a recipe is required unless resuming")
    run_dir.mkdir(parents=True, exist_ok=True)
    attach_log_file(run_dir)
    quiet_third_party()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    L.seed_everything(recipe.seed, workers=True, verbose=False)

    system, data, kwargs = build_training(recipe)
    t = recipe.train
    if not resume and not _is_ddp_child():
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))

    ckpt_dir = run_dir / "checkpoints"
    cbs: list[L.Callback] = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=t.checkpoint_every_steps, save_last=True, save_top_k=0,
        ),
        LastCheckpoint(ckpt_dir / "last.ckpt"),
        SafetensorsWeights(run_dir / "weights", name=recipe.model.name, kwargs=kwargs),
        MetricsCSV(run_dir / "metrics.csv"),
        RankMetrics(run_dir / "logs"),
        EpochSeeder(),
        *callbacks,
    ]
    if t.progress:
        cbs.append(StepProgressBar(leave=True))
    multi = t.devices * t.num_nodes > 1
    trainer = L.Trainer(
        max_steps=t.max_steps,
        max_epochs=-1,  # max_steps ends training; an epoch is val_every_steps batches
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy="ddp" if multi else "auto",
        precision=t.precision,
        callbacks=cbs,
        logger=False,
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        log_every_n_steps=1,
        default_root_dir=run_dir,
    )
    ckpt = ckpt_dir / "last.ckpt" if resume else None
    log.info("training %s (%s) into %s%s", recipe.model.name, recipe.method.name, run_dir,
             f", resuming from {ckpt}" if ckpt else "")
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(system, datamodule=data, ckpt_path=ckpt)
    except SystemExit:  # Lightning turns Ctrl-C into a graceful shutdown followed by sys.exit(1)
        if trainer.interrupted:
            raise RunError(
                f"training was interrupted at step {trainer.global_step}; "
                f"continue with `medmodal train --resume {run_dir}`"
            ) from None
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_sigint)  # Lightning leaves Ctrl-C ignored after an interrupt
    if trainer.global_rank == 0:
        atomic_write_text(
            run_dir / "split.json", json.dumps({"train": data.train_ids, "val": data.val_ids}, indent=2)
        )
    return run_dir


def _is_ddp_child() -> bool:
    """True in the processes Lightning's DDP launcher starts besides rank 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0
