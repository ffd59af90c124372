"""Patch sampling from a preprocessed cache (nnU-Net-style foreground oversampling) and whole-case datasets.

Both datasets return what :func:`medmodal.data.case.collate` stacks::

    {"image": (M, *S) float32, "available": (M,) bool, "label"?: (1, *S) long, "target"?: int, "case_id": str}

Arrays are memory-mapped lazily in each DataLoader worker (nothing is opened in ``__init__``), and a patch
reads only its own window of the present modalities from the map.

Augmentation plugs into :class:`PatchDataset` as any :class:`PatchTransform` (the data layer imports no
transform; :class:`medmodal.transforms.augment.PatchAugmentation` is the one the engine passes). It is a
deterministic function of the patch and a per-sample seed, so the patch draws and the augmentation of item
``i`` of epoch ``e`` both follow from ``(seed, e, i)`` alone: the same on any number of workers or ranks, and
again after a resume.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from medmodal.data.cache import CachedCase, CacheIndex
from medmodal.data.case import Batch, DataError, collate

#: cases whose memory maps (each holds a file descriptor) and foreground locations stay open per process.
MAX_OPEN_CASES = 64

_Opened = tuple[np.ndarray, np.ndarray | None, dict[int, np.ndarray]]
#: ``SeedSequence`` spawn key of the augmentation stream (the patch draws use the root sequence).
_AUGMENT_STREAM = 1


class PatchTransform(Protocol):
    """A random transform of training patches, deterministic given its seed.

    Attributes:
        patch_size: the spatial shape ``P`` it outputs.
        input_size: the spatial shape ``R >= P`` it reads, centred on the patch (``R - P`` even).
    """

    patch_size: tuple[int, ...]
    input_size: tuple[int, ...]

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None, *, available: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``image (M, *R) float32`` and ``label (*R)`` or ``None`` → ``(M, *P)`` and ``(*P)`` or ``None``."""
        ...


class _MappedCases:
    """Per-process LRU of ``(image map, label map, foreground locations)``; emptied when pickled."""

    def __init__(self, index: CacheIndex) -> None:
        self.index = index
        self._open: OrderedDict[int, _Opened] = OrderedDict()

    def __getitem__(self, i: int) -> _Opened:
        if i in self._open:
            self._open.move_to_end(i)
        else:
            case = self.index.cases[i]
            fg = {c: v for c, v in case.foreground().items() if len(v)}
            self._open[i] = (case.image(), case.label(), fg)
            if len(self._open) > MAX_OPEN_CASES:
                self._open.popitem(last=False)
        return self._open[i]

    def __getstate__(self) -> dict:
        return {"index": self.index, "_open": OrderedDict()}


def _sample_dict(case: CachedCase, image: np.ndarray, label: np.ndarray | None) -> dict:
    out: dict = {
        "image": torch.from_numpy(image),
        "available": torch.from_numpy(np.asarray(case.available, dtype=bool).copy()),
        "case_id": case.case_id,
    }
    if label is not None:
        out["label"] = torch.from_numpy(label.astype(np.int64))[None]
    if case.target is not None:
        out["target"] = int(case.target)
    return out


def _spatial_dims(index: CacheIndex) -> int:
    if len(index) == 0:
        raise DataError(f"{index.root}: the cache has no cases")
    dims = {c.geometry.spatial_dims for c in index.cases}
    if len(dims) != 1:
        raise DataError(f"{index.root}: cases mix spatial dimensions {sorted(dims)}; cache 2D and 3D apart")
    return dims.pop()


class PatchDataset(Dataset):
    """Random patches from cached cases, a fraction of them centred on foreground (nnU-Net oversampling).

    Item ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: a case drawn uniformly; with probability
    ``foreground_fraction`` (and if the case has labelled foreground) the patch contains a random voxel of a
    random present label class, otherwise its position is uniform. Cases smaller than the patch are padded
    with zeros (label 0).

    Args:
        index: the cache to sample from.
        patch_size: spatial patch shape, one entry per spatial dimension.
        samples_per_epoch: the dataset length.
        foreground_fraction: probability that a patch is centred on foreground.
        seed: base seed.
        augment: a :class:`PatchTransform` applied to the window of ``augment.input_size`` centred on the
            patch, with the seed ``SeedSequence([seed, epoch, i], spawn_key=(1,))`` (independent of the patch
            draws, so the patch positions are those of the same data set without ``augment``); ``None``: none.

    Call :meth:`set_epoch` before creating each epoch's DataLoader iterator (with the default
    ``persistent_workers=False``) so that epochs draw different patches.
    """

    def __init__(
        self,
        *,
        index: CacheIndex,
        patch_size: Sequence[int],
        samples_per_epoch: int,
        foreground_fraction: float = 1 / 3,
        seed: int = 0,
        augment: PatchTransform | None = None,
    ) -> None:
        dims = _spatial_dims(index)
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != dims or min(self.patch_size) < 1:
            raise ValueError(f"patch_size {tuple(patch_size)} must have {dims} positive entries (this cache)")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.index = index
        self.samples_per_epoch = int(samples_per_epoch)
        self.foreground_fraction = float(foreground_fraction)
        self.seed = int(seed)
        if augment is not None and tuple(augment.patch_size) != self.patch_size:
            raise ValueError(f"augment outputs patches of {augment.patch_size}, the data set {self.patch_size}")
        self.augment = augment
        self.epoch = 0
        self._maps = _MappedCases(index)

    def set_epoch(self, epoch: int) -> None:
        """Make the following draws those of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(f"sample {i} out of range for {self.samples_per_epoch} samples per epoch")
        rng = np.random.default_rng([self.seed, self.epoch, i])
        k = int(rng.integers(len(self.index)))
        case = self.index.cases[k]
        image, label, foreground = self._maps[k]
        start = self.patch_start(case.shape, foreground, rng)
        if self.augment is None:
            return _sample_dict(case, *self._read(case, image, label, start, self.patch_size))
        size = tuple(self.augment.input_size)
        wide = tuple(s - (r - p) // 2 for s, r, p in zip(start, size, self.patch_size, strict=True))
        window, seg = self._read(case, image, label, wide, size)
        seed = np.random.SeedSequence([self.seed, self.epoch, i], spawn_key=(_AUGMENT_STREAM,)).generate_state(1)
        return _sample_dict(case, *self.augment(window, seg, available=case.available, seed=int(seed[0])))

    def patch_start(
        self, shape: Sequence[int], foreground: dict[int, np.ndarray], rng: np.random.Generator
    ) -> tuple[int, ...]:
        """Corner of the patch in a case of spatial ``shape`` (negative / overhanging when it is smaller).

        Args:
            shape: the case's spatial shape ``S``.
            foreground: label value → ``(N, D)`` voxel coordinates (classes with no voxel left out).
            rng: the item's generator.
        """
        low = [min(0, s - p) for s, p in zip(shape, self.patch_size, strict=True)]
        high = [max(0, s - p) for s, p in zip(shape, self.patch_size, strict=True)]
        if rng.random() < self.foreground_fraction and foreground:
            classes = sorted(foreground)
            coords = foreground[classes[int(rng.integers(len(classes)))]]
            centre = [int(c) for c in coords[int(rng.integers(len(coords)))]]
            # the clip keeps the chosen voxel inside the patch (see the bounds above)
            return tuple(
                int(np.clip(c - p // 2, lo, hi))
                for c, p, lo, hi in zip(centre, self.patch_size, low, high, strict=True)
            )
        return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high, strict=True))

    @staticmethod
    def _read(
        case: CachedCase, image: np.ndarray, label: np.ndarray | None, start: Sequence[int], size: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Copy the window of ``size`` at ``start`` out of the maps, zero-padded where it leaves the case."""
        size = tuple(size)
        src, dst = [], []
        for s0, p, n in zip(start, size, case.shape, strict=True):
            a, b = max(s0, 0), min(s0 + p, n)
            src.append(slice(a, b))
            dst.append(slice(a - s0, b - s0))
        src_t, dst_t = tuple(src), tuple(dst)
        out = np.zeros((image.shape[0], *size), dtype=np.float32)
        for m in np.flatnonzero(case.available):  # missing channels stay zero and are never read
            out[(m, *dst_t)] = image[(m, *src_t)]
        seg = None
        if label is not None:
            seg = np.zeros(size, dtype=np.uint8)
            seg[dst_t] = label[src_t]
        return out, seg


class WholeCaseDataset(Dataset):
    """Whole cached cases, one per item (validation / sliding-window evaluation); same dict format.

    Args:
        index: the cache; item ``i`` is ``index.cases[i]`` with image ``(M, *S_i)``.
    """

    def __init__(self, *, index: CacheIndex) -> None:
        _spatial_dims(index)
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        case = self.index.cases[i]
        label = case.label()
        return _sample_dict(case, np.array(case.image()), None if label is None else np.array(label))


def make_collate(modalities: Sequence[str]) -> Callable[[Sequence[dict]], Batch]:
    """A picklable ``collate_fn`` for a DataLoader that stacks samples into a :class:`Batch`."""
    return functools.partial(collate, modalities=tuple(modalities))
