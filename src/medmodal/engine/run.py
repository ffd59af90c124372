"""Run folders: what a run writes, written atomically, and the callbacks that write it.

Layout of ``RUN/``::

    recipe.yaml              the resolved recipe (every default filled in, paths absolute)
    run.json                 what using the model needs: method, task, modalities, preprocessing, network
    split.json               train / validation case ids
    log.txt                  the run's log
    metrics.csv              long format: step, name, value (appended, so it survives a resume)
    checkpoints/last.ckpt    full resumable Lightning state (optimiser, schedule, every rank's RNG); atomic
    checkpoints/exception.ckpt   the state when training stopped on an error (never written over last.ckpt)
    distributed.json         multi-process runs: each rank's parameter checksum and validation metrics
    weights/model.safetensors + weights/model.json   the network's weights and how to rebuild it
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medmodal.atomic import atomic_path, atomic_write_text, csv_text

log = logging.getLogger("medmodal")


class RunError(RuntimeError):
    """A run folder problem (exists already, nothing to resume, incomplete); the message says what to do."""


def save_weights(network: nn.Module, folder: Path, *, name: str, kwargs: Mapping[str, Any]) -> Path:
    """Save ``network``'s state dict as safetensors plus a JSON of its registry name and constructor kwargs."""
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_text(folder / "model.json", json.dumps({"name": name, "kwargs": dict(kwargs)}, indent=2))
    return folder / "model.safetensors"


def load_network(folder: Path) -> nn.Module:
    """Rebuild a registered network from ``weights/`` (as written by :func:`save_weights`)."""
    from medmodal.networks.registry import create_network

    spec_path, weights_path = folder / "model.json", folder / "model.safetensors"
    for p in (spec_path, weights_path):
        if not p.is_file():
            raise RunError(f"{p}: not found; is this a finished medmodal run folder? (train it first)")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    network = create_network(spec["name"], **spec["kwargs"])
    network.load_state_dict(load_file(str(weights_path)))
    return network.eval()


def is_run_folder(path: Path) -> bool:
    """True if ``path`` looks like a medmodal run folder (a recipe plus a run description or checkpoints)."""
    return (path / "recipe.yaml").is_file() and ((path / "run.json").is_file() or (path / "checkpoints").is_dir())


def setup_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Create ``run_dir``, refusing to overwrite someone's results unless asked; returns True if it created it.

    ``overwrite`` replaces only a medmodal run folder, never the working folder or one of its parents, and never
    a folder that holds anything else (delete such a folder yourself, or choose another ``--out``).
    """
    if resume:
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise RunError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt); start it with `medmodal train`")
        return False
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: exists and is not a folder; choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunError(
                f"{run_dir}: run folder exists and is not empty; use --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        here = Path.cwd().resolve()
        target = run_dir.resolve()
        if target == here or target in here.parents:
            raise RunError(f"{run_dir}: --overwrite would delete the working folder (or a folder above it); "
                           "choose another --out")
        if not is_run_folder(run_dir):
            raise RunError(f"{run_dir}: --overwrite replaces only a medmodal run folder, and this one holds other "
                           "files (no recipe.yaml with run.json or checkpoints/); choose another --out")
        shutil.rmtree(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return created


def attach_log_file(run_dir: Path) -> logging.Handler:
    """Send medmodal's and Lightning's log records to ``run_dir/log.txt`` (appending).

    The handler of a previous run in the same process is removed first, so each run logs only into its own file.
    """
    for name in ("medmodal", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, "_medmodal_run_log", False)]:
            lg.removeHandler(h)
            h.close()
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler._medmodal_run_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("medmodal", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    return handler


_NOISE = (
    "litlogger",  # an advertisement printed by every Trainer
    "ckpt_path",  # Lightning 2.6 warns about the default ckpt_path of a fresh fit
    "isinstance(treespec, LeafSpec)",  # internal deprecation inside Lightning
    "overridden `on_after_batch_transfer`",  # intended: the system moves channels-last batches
    "always_return_as_numpy",  # MONAI-internal deprecation in its HD95 helper
    "`weights_only` was not set",  # Lightning loading our own checkpoint on resume
    "persistent_workers=True",  # intended: ResumableLoader sets each epoch on the dataset, fresh workers copy it
    "when logging on epoch level in distributed setting",  # validation metrics are reduced exactly beforehand
    "all_gather is deprecated",  # Lightning's own all_gather on torch 2.13
    "Grad strides do not match bucket view strides",  # DDP with channels-last 3D weights: a speed note only
)


#: Lightning's console lines that say nothing a medmodal user acts on; they still go to the run's log.txt
_CONSOLE_NOISE = (
    "GPU available:", "TPU available:", "HPU available:",  # the device banner of every Trainer (run.json has it)
    "`Trainer.fit` stopped",  # medmodal prints its own end-of-training line
    "LOCAL_RANK:",  # the CUDA_VISIBLE_DEVICES line of every GPU run
    "Restoring states from the checkpoint", "Restored all states from the checkpoint",  # resume says so itself
)
#: loggers Lightning emits on; a logger's filter sees only its own records, never those of its children
_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.trainer.connectors.checkpoint_connector", "lightning.pytorch.trainer.connectors",
)


class _DropNoise(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.patterns)


_DROP_EVERYWHERE = _DropNoise(_NOISE)
_DROP_FROM_CONSOLE = _DropNoise(_NOISE + _CONSOLE_NOISE)


def quiet_third_party() -> None:
    """Silence the known, harmless messages of Lightning, MONAI and ITK that would bury medmodal's own output.

    Idempotent. :data:`_NOISE` is dropped everywhere (Python warnings and Lightning's loggers);
    :data:`_CONSOLE_NOISE` only from the console handlers present now (Lightning's own, the root logger's), so
    the run's ``log.txt`` keeps the device banner. ITK's C++ warnings (printed straight to the terminal) are
    turned off: medmodal checks what they would warn about itself and says so in its own words.
    """
    import warnings

    import SimpleITK as sitk

    for n in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(n)}.*")
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(_DROP_EVERYWHERE)  # adding the same filter twice is a no-op
    for name in ("lightning.pytorch", "lightning.fabric", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(_DROP_FROM_CONSOLE)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)


class MetricsCSV(L.Callback):
    """Append logged metrics to ``metrics.csv`` as ``step,name,value`` rows (rank 0 only).

    Long format keeps appending valid when a resumed run logs the same or new metric names. On resume, rows
    written after the checkpoint the run resumes from (the steps that are trained again) are dropped first, and a
    ``(step, name)`` pair is never written twice, so each step appears once after a crash and ``--resume``.
    """

    HEADER = ("step", "name", "value")

    def __init__(self, path: Path, *, every_n_steps: int = 10) -> None:
        self.path = path
        self.every_n_steps = every_n_steps
        self._last_train_step = -1
        self._written: set[tuple[int, str]] = set()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.global_rank != 0 or not self.path.is_file():
            return
        step = int(checkpoint["global_step"])
        with self.path.open(encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        atomic_write_text(self.path, csv_text(self.HEADER, ([r["step"], r["name"], r["value"]] for r in rows)))
        self._written = {(int(r["step"]), r["name"]) for r in rows}

    def _write(self, trainer: L.Trainer, prefix: str) -> None:
        if trainer.global_rank != 0:
            return
        rows = [
            (trainer.global_step, k, float(v))
            for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix) and torch.as_tensor(v).numel() == 1
            and (trainer.global_step, k) not in self._written
        ]
        if not rows:
            return
        new = not self.path.exists()
        with self.path.open("a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.HEADER)
            w.writerows(rows)
        self._written.update((step, name) for step, name, _ in rows)

    def _write_train(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._last_train_step:
            self._write(trainer, "train/")
            self._last_train_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._write_train(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write_train(trainer)  # so every validation row has the training loss beside it
            self._write(trainer, "val/")


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite; the message names the step."""


class NonFiniteGuard(L.Callback):
    """Stop training before a non-finite loss reaches the parameters.

    Checked before every backward pass (so no optimiser step is taken with it); in multi-process runs the ranks
    agree first (one all-reduce of a flag), so every rank stops at the same step instead of waiting for the rank
    that failed.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0, device=loss.device)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) > 0:
            raise NonFiniteLossError(
                f"the training loss is not finite at step {trainer.global_step + 1} "
                f"({float(loss.detach().float().mean()):.4g} on rank {trainer.global_rank}); training stopped "
                "before that step changed the model"
            )


class GracefulInterrupt(L.Callback):
    """The first Ctrl-C lets the current optimiser step finish, writes ``last.ckpt`` and stops; a second one
    stops at once (Lightning's own handling). Single-process runs only: in multi-process runs the ranks would
    see the signal at different steps, so there the periodic checkpoints are the resume points.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requested = False
        self._previous: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import signal
        import threading

        if trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.requested:  # second Ctrl-C: stop now
                signal.signal(signal.SIGINT, self._previous)
                raise KeyboardInterrupt
            self.requested = True
            log.warning("Ctrl-C: finishing this step, saving %s, then stopping (press again to stop at once)",
                        self.path)

        signal.signal(signal.SIGINT, handler)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.requested:
            trainer.save_checkpoint(self.path)
            raise KeyboardInterrupt

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class LastCheckpoint(L.Callback):
    """Keep ``last.ckpt`` at the newest good state: written at the end of training (Lightning's periodic
    checkpoints miss the final steps when ``max_steps`` is not a multiple of their period).

    When training stops on an exception the state is written to ``exception.ckpt`` beside it, never over it: the
    failure may have left the model or optimiser half-updated, and ``--resume`` starts from ``last.ckpt``. In
    multi-process runs only a non-finite loss (which every rank detects together) writes it: one failing rank
    cannot join the collective a checkpoint needs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def exception_path(self) -> Path:
        return self.path.with_name("exception.ckpt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        graceful = any(isinstance(c, GracefulInterrupt) and c.requested for c in trainer.callbacks)
        if trainer.global_step == 0 or graceful:  # a graceful stop has just written last.ckpt
            return
        if trainer.world_size == 1 or isinstance(exception, NonFiniteLossError):
            log.warning("training stopped at step %d (%s); its state is in %s, the last good one in %s",
                        trainer.global_step, type(exception).__name__, self.exception_path, self.path)
            trainer.save_checkpoint(self.exception_path)


class SafetensorsWeights(L.Callback):
    """Write ``weights/model.safetensors`` whenever a checkpoint is saved and at the end of training."""

    def __init__(self, folder: Path, *, name: str, kwargs: Mapping[str, Any]) -> None:
        self.folder, self.name, self.kwargs = folder, name, dict(kwargs)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            save_weights(pl_module.network, self.folder, name=self.name, kwargs=self.kwargs)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Any) -> None:
        self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)


class StepProgressBar(L.pytorch.callbacks.RichProgressBar):
    """Rich progress bar whose label counts optimiser steps (training is bounded by steps, not epochs)."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        return f"step {trainer.global_step}/{trainer.max_steps} (epoch {current_epoch})"


class DistributedReport(L.Callback):
    """In multi-process runs, rank 0 writes ``distributed.json`` at the end of training: the world size, each
    rank's parameter checksum and final validation metrics (gathered from every rank), so anyone can check that
    the ranks stayed in sync and agree on the reduced metrics."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        params = [p.detach().double().flatten() for p in pl_module.network.parameters()]
        flat = torch.cat(params) if params else torch.zeros(1, dtype=torch.float64)
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
        names = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        local = torch.tensor([float((flat * weights).sum()), float(flat.abs().sum()),
                              *(float(trainer.callback_metrics[k]) for k in names)], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(local.to(pl_module.device)).cpu()  # (world, 2 + len(names))
        if trainer.global_rank != 0:
            return
        doc = {"world_size": trainer.world_size,
               "ranks": [{"rank": r, "parameter_checksum": float(row[0]), "parameter_abs_sum": float(row[1]),
                          "val": {k: float(v) for k, v in zip(names, row[2:].tolist(), strict=True)}}
                         for r, row in enumerate(gathered)]}
        atomic_write_text(self.path, json.dumps(doc, indent=2))


class ResumableLoader:
    """A training loader that a resumed run continues where it stopped, mid-epoch included.

    Lightning restarts an epoch's loader from its first batch and calls no ``on_train_epoch_start`` when it
    resumes mid-epoch, so a resumed run would train again on the epoch's first batches (and, with a patch
    sampler told its epoch by that hook, on the first epoch's patches). This wrapper sets the dataset's epoch
    (``set_epoch``) and skips the batches the epoch has done already, both read from the trainer when the
    epoch's first batch is fetched (after Lightning has restored its loop state). It is ``_Stateful`` for
    Lightning, so resuming from a mid-epoch checkpoint raises no "dataloader is not resumable" warning.
    """

    def __init__(self, loader: Any, trainer: Any) -> None:
        self.loader, self._trainer = loader, trainer

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        return self._batches()

    def _batches(self) -> Any:
        import itertools

        trainer = self._trainer()
        done = 0
        if trainer is not None:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(trainer.current_epoch)
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        yield from itertools.islice(self.loader, done, None)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
