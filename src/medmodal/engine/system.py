"""What every training system shares: optimiser and schedule factories, per-rank random streams that resume
exactly, and validation metrics reduced exactly across ranks.

A method's system subclasses :class:`MethodSystem` (a ``LightningModule``) and keeps its method-specific logic;
it draws its random decisions (modality dropout, subset sampling, augmentation) from :attr:`generator`, adds
validation values with :meth:`add_val_metric`, and the base class does the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from medmodal.engine.distributed import MeanAccumulator

RNG_KEY = "medmodal_rng"


def lr_factor(step: int, *, schedule: str, total: int) -> float:
    """Learning-rate multiplier at ``step`` of ``total``: ``"poly"`` (nnU-Net, exponent 0.9), ``"cosine"``
    (to zero) or ``"constant"``."""
    frac = min(step, total) / total
    if schedule == "poly":
        return (1.0 - frac) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; expected poly, cosine or constant")


def make_optimizer(
    params: Iterable[nn.Parameter], *, name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """``"sgd"`` (Nesterov, as nnU-Net and ShaSpec) or ``"adamw"`` over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd or adamw")


def stepped_schedule(optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float], *,
                     warmup_steps: int = 0) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: ``optimizer`` with a per-step learning-rate factor
    ``multiplier(step)``, after a linear warm-up from ``lr / warmup_steps`` over the first ``warmup_steps``."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * multiplier(step)

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MethodSystem(L.LightningModule):
    """Base of medmodal's training systems.

    * :attr:`generator`: a ``torch.Generator`` seeded by ``(seed, global rank)``. Checkpoints hold the state of
      every rank's generator (gathered from all ranks; Lightning itself saves rank 0's module state only), and a
      resumed run restores each rank's own, so random decisions continue exactly.
    * :meth:`add_val_metric` / :meth:`val_metric_names`: weighted sums and counts per name, all-reduced at the
      end of validation and logged as ``val/<name>`` means: a 2-rank validation equals the 1-rank one on the
      same cases (padding items of weight 0 count nothing).

    Args:
        seed: base seed of :attr:`generator`.
    """

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._val = MeanAccumulator()

    # -- randomness -----------------------------------------------------------------------------------------
    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            rank = self.global_rank if self._trainer is not None else 0
            self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank)
        return self._generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self.generator.get_state().to(torch.int64)
        if self._trainer is not None and self.trainer.world_size > 1:
            states = self.trainer.strategy.all_gather(state.to(self.device)).cpu()  # (world, n)
        else:
            states = state[None]
        checkpoint[RNG_KEY] = {"world_size": int(states.shape[0]),
                               "states": [s.to(torch.uint8) for s in states]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(RNG_KEY)
        if saved is None:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        if saved["world_size"] != world:
            raise ValueError(f"the checkpoint was written by {saved['world_size']} training process(es) and "
                             f"this run has {world}; resume with the same --devices and --num-nodes")
        self.generator.set_state(saved["states"][self.global_rank if self._trainer is not None else 0])

    # -- validation metrics ---------------------------------------------------------------------------------
    def val_metric_names(self) -> Sequence[str]:
        """Names this system validates (every rank declares them, so ranks with no real case take part)."""
        return ()

    def add_val_metric(self, name: str, value: torch.Tensor | float, weight: torch.Tensor | float = 1.0) -> None:
        """Add one case's (or several cases') value of metric ``name`` with ``weight`` (0: padding)."""
        self._val.add(name, value, weight)

    def on_validation_epoch_start(self) -> None:
        self._val = MeanAccumulator()

    def on_validation_epoch_end(self) -> None:
        self._val.declare(self.val_metric_names())
        strategy = self.trainer.strategy if self._trainer is not None else None
        means = self._val.reduce(strategy, device=self.device)
        for name, value in means.items():
            if math.isfinite(value):
                self.log(f"val/{name}", value, prog_bar=name in self.progress_metrics, batch_size=1)

    #: validation metrics shown in the progress bar
    progress_metrics: tuple[str, ...] = ()
