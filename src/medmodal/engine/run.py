"""Run folders: what a run writes, written atomically, and the callbacks that write it.

Layout of ``RUN/``::

    recipe.yaml              the resolved recipe (every default filled in)
    split.json               train / validation case ids
    log.txt                  the run's log
    metrics.csv              long format: step, name, value (appended, so it survives a resume)
    checkpoints/last.ckpt    full resumable Lightning state (optimiser, schedule, RNG); saved atomically
    weights/model.safetensors + weights/model.json   the network's weights and how to rebuild it
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger("medmodal")


class RunError(RuntimeError):
    """A run folder problem (exists already, nothing to resume, incomplete); the message says what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(network: nn.Module, folder: Path, *, name: str, kwargs: Mapping[str, Any]) -> Path:
    """Save ``network``'s state dict as safetensors plus a JSON of its registry name and constructor kwargs."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, folder / "model.safetensors")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def setup_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``run_dir``, refusing to overwrite someone's results unless asked."""
    if resume:
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise RunError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt); start it with `medmodal train`")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunError(
                f"{run_dir}: run folder exists and is not empty; use --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


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
    "persistent_workers=True",  # intended: EpochSeeder sets each epoch on the dataset, fresh workers copy it
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


def quiet_third_party() -> None:
    """Silence the known, harmless messages of Lightning and MONAI that would bury medmodal's own output."""
    import warnings

    for n in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(n)}.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors"):
        logging.getLogger(name).addFilter(_DropNoise())


class MetricsCSV(L.Callback):
    """Append logged metrics to ``metrics.csv`` as ``step,name,value`` rows (rank 0 only).

    Long format keeps appending valid when a resumed run logs the same or new metric names.
    """

    def __init__(self, path: Path, *, every_n_steps: int = 10) -> None:
        self.path = path
        self.every_n_steps = every_n_steps
        self._last_train_step = -1

    def _write(self, trainer: L.Trainer, prefix: str) -> None:
        if trainer.global_rank != 0:
            return
        rows = [
            (trainer.global_step, k, float(v))
            for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix) and torch.as_tensor(v).numel() == 1
        ]
        if not rows:
            return
        new = not self.path.exists()
        with self.path.open("a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "name", "value"])
            w.writerows(rows)

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


class LastCheckpoint(L.Callback):
    """Keep ``last.ckpt`` at the newest state: at the end of training, and when it stops on an exception.

    Lightning's periodic checkpoints miss the final steps when ``max_steps`` is not a multiple of their period,
    and a Ctrl-C would lose everything since the last one. The exception save is single-process only: in DDP
    one failing rank cannot join the collective a checkpoint needs; there the periodic checkpoints are the resume
    points.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.world_size == 1 and trainer.global_step > 0:
            log.warning("training stopped at step %d (%s); saving %s", trainer.global_step,
                        type(exception).__name__, self.path)
            trainer.save_checkpoint(self.path)


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


class RankMetrics(L.Callback):
    """In multi-process runs, each rank writes its final validation metrics to ``logs/rank<r>.json``.

    The metrics are reduced across ranks (``sync_dist``), so every file must hold the same numbers; the DDP
    test checks exactly that.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        atomic_write_text(self.folder / f"rank{trainer.global_rank}.json", json.dumps(metrics, indent=2))
