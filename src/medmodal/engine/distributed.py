"""Multi-process training helpers: ranks, how data is split between them, and exact metric reduction.

medmodal disables Lightning's automatic ``DistributedSampler`` and splits data itself, so that

* the same recipe sees the same samples per optimiser step on 1 or N ranks: ``data.batch_size`` is the global
  batch, and rank ``r`` of ``W`` takes its ``batch_size / W`` share of every global batch
  (:class:`RankShard`), so N ranks together see exactly the samples one process would;
* validation has no padded duplicates in its metrics: each rank evaluates every ``W``-th case, and ranks with
  fewer cases run placeholder items of weight 0 so that every rank runs the same number of steps
  (:class:`ValidationShard`); sums and counts are then all-reduced (:class:`MeanAccumulator`).

Rank and world size come from ``torch.distributed`` once it is initialised, and before that from the variables
torchrun, SLURM and Lightning's launcher set (``RANK``/``WORLD_SIZE``, ``SLURM_PROCID``/``SLURM_NTASKS``,
``LOCAL_RANK``/``NODE_RANK``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset


def global_rank() -> int:
    """This process's rank among all training processes (0 when there is one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return node * per_node + local


def is_rank_zero() -> bool:
    """True in the process that writes the run folder, logs and reports."""
    return global_rank() == 0


def per_rank_batch(batch_size: int, world_size: int, *, field: str = "data.batch_size") -> int:
    """``batch_size / world_size``; a :class:`ValueError` naming ``field`` when it does not divide evenly."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if batch_size % world_size:
        raise ValueError(f"{field} = {batch_size} is the global batch and must be a multiple of the "
                         f"{world_size} training processes (devices × nodes)")
    return batch_size // world_size


class RankShard(Dataset):
    """Rank ``rank``'s share of a map-style dataset whose items form consecutive global batches.

    Global batch ``j`` is items ``[j·B, (j+1)·B)`` of ``dataset``; rank ``r`` of ``W`` takes items
    ``j·B + r·b … j·B + (r+1)·b - 1`` of it, ``b = B / W``. A last, partial global batch of ``R`` items is
    split the same way after padding it to a multiple of ``W`` with the epoch's first items (at most ``W - 1``
    repeats), so that every rank runs the same number of steps.

    Args:
        dataset: the global sequence of samples of one epoch.
        rank, world_size: this process and the number of processes.
        batch_size: the global batch ``B`` (a multiple of ``world_size``).
    """

    def __init__(self, dataset: Any, *, rank: int, world_size: int, batch_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.batch_size = batch_size
        self.local_batch = per_rank_batch(batch_size, world_size)
        n = len(dataset)
        full, rest = divmod(n, batch_size)
        self._full = full
        self._rest_local = math.ceil(rest / world_size)  # items per rank in the last, partial batch
        self._rest = rest

    def __len__(self) -> int:
        return self._full * self.local_batch + self._rest_local

    def global_index(self, i: int) -> int:
        """The index in ``dataset`` of this rank's item ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items on rank {self.rank}")
        j, k = divmod(i, self.local_batch)
        if j < self._full:
            return j * self.batch_size + self.rank * self.local_batch + k
        k = i - self._full * self.local_batch
        pos = self.rank * self._rest_local + k  # position within the padded last batch
        return self._full * self.batch_size + pos if pos < self._rest else pos - self._rest

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.global_index(i)]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class ValidationShard(Dataset):
    """Every ``world_size``-th item of ``dataset`` from ``rank``, padded to the same length on every rank.

    Items are ``(item, weight)`` pairs through ``wrap``: ``wrap(item, 1.0)`` for a real item and
    ``wrap(dataset[0], 0.0)`` for padding (the default ``wrap`` sets ``item["weight"]``), so a system adds
    ``weight`` × its metric and no case is counted twice.
    """

    def __init__(self, dataset: Any, *, rank: int, world_size: int) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.own = list(range(rank, len(dataset), world_size))
        self.length = math.ceil(len(dataset) / world_size) if len(dataset) else 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        real = i < len(self.own)
        item = self.dataset[self.own[i] if real else 0]
        if isinstance(item, dict):
            item = {**item, "weight": 1.0 if real else 0.0}
        return item


class MeanAccumulator:
    """Weighted sums and counts of named metrics, all-reduced across ranks into exact means.

    ``add("dice_WT", values, weight)`` adds ``Σ weight·value`` and ``Σ weight`` (NaN values are skipped);
    :meth:`reduce` all-reduces both (one collective for all names) and returns ``{name: sum / count}``
    (NaN where the count is 0). Every rank must call :meth:`reduce` with the same names, in any order.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor | float, weight: torch.Tensor | float = 1.0) -> None:
        v = torch.as_tensor(value, dtype=torch.float64).detach().cpu().flatten()
        w = torch.as_tensor(weight, dtype=torch.float64).detach().cpu().flatten().expand_as(v)
        ok = torch.isfinite(v) & (w > 0)
        self.sums[name] = self.sums.get(name, 0.0) + float((v[ok] * w[ok]).sum())
        self.counts[name] = self.counts.get(name, 0.0) + float(w[ok].sum())

    def declare(self, names: Sequence[str]) -> None:
        """Make ``names`` known with zero count (a rank that saw no real item still takes part)."""
        for n in names:
            self.sums.setdefault(n, 0.0)
            self.counts.setdefault(n, 0.0)

    def reduce(self, strategy: Any | None = None, *, device: torch.device | str = "cpu") -> dict[str, float]:
        names = sorted(self.sums)
        t = torch.tensor([[self.sums[n] for n in names], [self.counts[n] for n in names]], dtype=torch.float64)
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            t = strategy.reduce(t.to(device), reduce_op="sum").cpu()
        self.sums, self.counts = {}, {}
        return {n: float(t[0, i] / t[1, i]) if t[1, i] > 0 else float("nan") for i, n in enumerate(names)}
