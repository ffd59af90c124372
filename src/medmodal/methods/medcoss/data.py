"""MedCoSS's data: each stage's items, the rehearsal buffers, and the modality-homogeneous batch slots.

* **Items** (:class:`TextItems`, :class:`ImageItems`, :class:`BufferItems`): a text stage's items are its reports,
  encoded once (ids, attention mask, word ids; ``medmodal.data.text``); an image stage's items are the images of
  its collection (``medmodal.engine.images``, cached as memory-mapped arrays in [0, 1] by the 0.5/99.5
  percentiles), each drawn as a random crop of the stage's input size with random flips (2D: grey replicated to
  RGB, colour kept; 3D: grey); a buffer's items are the arrays stored in a run folder (``buffers/<name>.npz``:
  texts as they were encoded, images as their centre crop).
* **Slots** (:class:`StageBatches`, spec §2.6): an epoch of slots holds ``max(1, ⌊n_m / B⌋)`` slots per source
  ``m`` (the current stage's data or a buffer; the spec's ``⌊n_m / B⌋`` gives a buffer smaller than a batch no
  slot, so medmodal gives it one [ours]), in a seeded random order; a slot draws ``B`` items of its source with
  replacement. Every batch holds one modality (invariant 11). Each process takes its share of every global batch
  (:class:`~medmodal.data.collection_sampler.RankBatches`), so 2 processes see the data of 1.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medmodal.data.case import DataError

log = logging.getLogger("medmodal")

_SLOT_ORDER, _SLOT_ITEMS, _ITEM = 11, 12, 13  # seed streams


# ----------------------------------------------------------------------------------------------------------- items


@dataclasses.dataclass
class TextItems:
    """Encoded texts: ``ids``, ``mask``, ``word_ids`` ``(N, L)`` int64, ``names`` (case ids), ``targets (N,)``
    (``-1``: none)."""

    ids: np.ndarray
    mask: np.ndarray
    word_ids: np.ndarray
    names: list[str]
    targets: np.ndarray
    kind: str = "text"

    def __len__(self) -> int:
        return len(self.names)

    def get(self, k: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        return {"ids": self.ids[k], "mask": self.mask[k], "word_ids": self.word_ids[k]}

    def fixed(self, k: int) -> dict[str, Any]:
        """The item as it is encoded for buffer features and stored in a buffer."""
        return self.get(k)

    def subset(self, keep: Sequence[int]) -> TextItems:
        keep = list(keep)
        return TextItems(self.ids[keep], self.mask[keep], self.word_ids[keep], [self.names[k] for k in keep],
                         self.targets[keep])


class ImageItems:
    """Random crops of a fixed input size from the images of a collection index.

    Args:
        index: the images (``(C, X, Y, Z)`` float16 memory maps in [0, 1]).
        kind: ``"image2d"`` (one-slice images; crops ``(3, X, Y)``, grey replicated) or ``"image3d"``
            (``(1, X, Y, Z)``, colour to grey).
        input_size: the crop, 2 or 3 sizes; an image smaller than it is zero-padded at the high end.
        targets: a class per image (``-1``: none).
        augment: random flips (2D: the first axis; 3D: each axis) on training draws.
    """

    def __init__(self, *, index: Any, kind: str, input_size: Sequence[int], targets: np.ndarray,
                 augment: bool = True) -> None:
        self.index, self.kind, self.input_size = index, kind, tuple(int(s) for s in input_size)
        self.images = list(index.images)
        self.names = [im.image_id for im in self.images]
        self.targets, self.augment = targets, augment
        self.channels = 3 if kind == "image2d" else 1
        for im in self.images:
            flat = im.shape[2] == 1
            if kind == "image2d" and not flat:
                raise DataError(f"{im.image_id}: a {im.shape} volume in a 2D (image2d) stage; list 2D images or "
                                "make the stage image3d")
            if kind == "image3d" and flat:
                raise DataError(f"{im.image_id}: a 2D image in a 3D (image3d) stage; list volumes or make the stage "
                                "image2d")

    def __len__(self) -> int:
        return len(self.images)

    def _crop(self, k: int, rng: np.random.Generator | None) -> np.ndarray:
        from medmodal.data.collections import to_channels

        data = self.images[k].data()  # (C, X, Y, Z) memory map
        spatial = data.shape[1:] if self.kind == "image3d" else data.shape[1:3]
        size = self.input_size
        if rng is None:  # centre
            corner = [max(s - c, 0) // 2 for s, c in zip(spatial, size, strict=True)]
        else:
            corner = [int(rng.integers(0, max(s - c, 0) + 1)) for s, c in zip(spatial, size, strict=True)]
        window = tuple(slice(a, a + c) for a, c in zip(corner, size, strict=True))
        crop = np.asarray(data[(slice(None), *window)] if self.kind == "image3d" else data[(slice(None), *window, 0)],
                          dtype=np.float32)
        crop = to_channels(crop, self.channels)
        if crop.shape[1:] != size:  # smaller than the input: zero-pad at the high end
            padded = np.zeros((self.channels, *size), dtype=np.float32)
            padded[(slice(None), *(slice(0, s) for s in crop.shape[1:]))] = crop
            crop = padded
        if rng is not None and self.augment:
            axes = (1,) if self.kind == "image2d" else (1, 2, 3)
            for axis in axes:
                if rng.random() < 0.5:
                    crop = np.flip(crop, axis=axis)
        return np.ascontiguousarray(crop)

    def get(self, k: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        return {"x": self._crop(k, rng)}

    def fixed(self, k: int) -> dict[str, Any]:
        """The centre crop (buffer features; what a buffer stores)."""
        return {"x": self._crop(k, None)}

    def subset(self, keep: Sequence[int]) -> ImageItems:
        keep = list(keep)
        index = dataclasses.replace(self.index, images=[self.images[k] for k in keep])
        return ImageItems(index=index, kind=self.kind, input_size=self.input_size, targets=self.targets[keep],
                          augment=self.augment)


@dataclasses.dataclass
class BufferItems:
    """A stored rehearsal buffer: ``arrays`` (texts: ``ids``/``mask``/``word_ids``; images: ``x (N, C, *S)``),
    ``names`` (the items' ids in their stage) and ``targets``."""

    kind: str
    arrays: dict[str, np.ndarray]
    names: list[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def get(self, k: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        if self.kind == "text":
            return {key: self.arrays[key][k] for key in ("ids", "mask", "word_ids")}
        return {"x": self.arrays["x"][k].astype(np.float32)}

    fixed = get


def stack_items(items: Any, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The fixed versions of ``items[indices]`` stacked into arrays (what a buffer file stores)."""
    rows = [items.fixed(int(k)) for k in indices]
    if not rows:
        raise ValueError("no item to stack")
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def save_buffer(path: Path, *, kind: str, arrays: dict[str, np.ndarray], names: Sequence[str],
                targets: np.ndarray) -> Path:
    """Write a buffer file atomically (``.npz``; images as float16)."""
    import io

    from medmodal.atomic import atomic_write_bytes

    store = {k: (v.astype(np.float16) if k == "x" else v) for k, v in arrays.items()}
    buf = io.BytesIO()
    np.savez(buf, kind=np.array(kind), names=np.array(list(names)), targets=np.asarray(targets, dtype=np.int64),
             **store)
    return atomic_write_bytes(path, buf.getvalue())


def load_buffer(path: Path) -> BufferItems:
    """Read a buffer file written by :func:`save_buffer`."""
    if not path.is_file():
        raise DataError(f"{path}: the rehearsal buffer is missing; the run folder is incomplete (re-run the stage "
                        "that made it)")
    with np.load(path, allow_pickle=False) as f:
        kind = str(f["kind"])
        arrays = {k: f[k] for k in f.files if k not in ("kind", "names", "targets")}
        return BufferItems(kind=kind, arrays=arrays, names=[str(n) for n in f["names"]],
                           targets=np.asarray(f["targets"]))


# ----------------------------------------------------------------------------------------------------------- slots


@dataclasses.dataclass(frozen=True)
class Source:
    """One source of batches: ``role`` ``"current"`` (pretext task) or ``"buffer"`` (distillation)."""

    name: str
    kind: str
    role: str
    items: Any


class StageBatches(Dataset):
    """Modality-homogeneous global batches of ``batch_size`` items (module doc; spec §2.6).

    ``batches_per_epoch`` global batches form a (virtual) epoch of the data loader; the slot order runs on across
    them. Item ``i`` of an epoch is item ``i mod B`` of global batch ``i // B``.
    """

    def __init__(self, *, sources: Sequence[Source], batch_size: int, batches_per_epoch: int, seed: int,
                 augment: bool = True) -> None:
        if not sources or any(len(s.items) == 0 for s in sources):
            raise ValueError("every source of batches needs items")
        self.sources, self.batch_size = list(sources), batch_size
        self.batches_per_epoch, self.seed, self.augment = batches_per_epoch, seed, augment
        self.slots = [i for i, s in enumerate(self.sources) for _ in range(max(1, len(s.items) // batch_size))]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batch_size * self.batches_per_epoch

    def plan(self, j: int) -> tuple[int, np.ndarray]:
        """``(source index, (B,) item indices)`` of global batch ``j`` of the current epoch."""
        g = self.epoch * self.batches_per_epoch + j
        cycle, pos = divmod(g, len(self.slots))
        order = np.random.default_rng([self.seed, _SLOT_ORDER, cycle]).permutation(len(self.slots))
        src = self.slots[int(order[pos])]
        items = np.random.default_rng([self.seed, _SLOT_ITEMS, g]).integers(0, len(self.sources[src].items),
                                                                          size=self.batch_size)
        return src, items

    def __getitem__(self, i: int) -> dict[str, Any]:
        j, p = divmod(i, self.batch_size)
        src, items = self.plan(j)
        g = self.epoch * self.batches_per_epoch + j
        source = self.sources[src]
        rng = np.random.default_rng([self.seed, _ITEM, g, p]) if self.augment else None
        out = source.items.get(int(items[p]), rng)
        return {**out, "source": source.name, "kind": source.kind, "role": source.role}


class FixedBatches(Dataset):
    """A fixed draw of ``batches`` global batches per source, without augmentation (validation)."""

    def __init__(self, *, sources: Sequence[Source], batch_size: int, batches: int, seed: int) -> None:
        self.sources, self.batch_size = list(sources), batch_size
        rng = np.random.default_rng([seed, 99])
        self.plans = [(s, rng.integers(0, len(src.items), size=batch_size))
                      for s, src in enumerate(self.sources) for _ in range(batches)]
        self.batches_per_epoch = len(self.plans)

    def set_epoch(self, epoch: int) -> None:  # one draw for every validation
        return None

    def __len__(self) -> int:
        return self.batch_size * len(self.plans)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j, p = divmod(i, self.batch_size)
        src, items = self.plans[j]
        source = self.sources[src]
        return {**source.items.fixed(int(items[p])), "source": source.name, "kind": source.kind,
                "role": source.role, "slot": j, "pos": p}


def collate_stage(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack one slot's items: texts ``ids``/``mask``/``word_ids`` ``(B, L)`` long, images ``x (B, C, *S)``."""
    sources = {(s["source"], s["role"]) for s in samples}
    if len(sources) != 1:
        raise ValueError(f"a batch must hold one source, got {sorted(sources)}")
    first = samples[0]
    out: dict[str, Any] = {"source": first["source"], "kind": first["kind"], "role": first["role"]}
    if first["kind"] == "text":
        for key in ("ids", "mask", "word_ids"):
            out[key] = torch.as_tensor(np.stack([s[key] for s in samples]), dtype=torch.long)
    else:
        out["x"] = torch.as_tensor(np.stack([s["x"] for s in samples]), dtype=torch.float32)
    if "slot" in first:  # validation: where each item sits in its global batch (per-item random draws)
        out["slot"] = torch.as_tensor([s["slot"] for s in samples], dtype=torch.long)
        out["pos"] = torch.as_tensor([s["pos"] for s in samples], dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------------------- module


class MedCoSSData(L.LightningDataModule):
    """The batches of one MedCoSS run: the current stage(s)' training items (pretext tasks) and the old modalities'
    buffers (distillation); validation on a fixed draw of each current stage's held-out items and each buffer.

    Args:
        current: ``name -> (kind, train items, val items)`` (one stage; every stage for ``joint``).
        buffers: ``name -> BufferItems`` of the earlier stages.
        batch_size: items per optimiser step over all processes; steps_per_epoch: global batches per epoch;
        val_batches: validation batches per source; seed: slot and item draws; num_workers: loader workers.
    """

    def __init__(self, *, current: dict[str, tuple[str, Any, Any]], buffers: dict[str, BufferItems],
                 batch_size: int, steps_per_epoch: int, val_batches: int, seed: int, num_workers: int) -> None:
        super().__init__()
        self.current, self.buffers = current, buffers
        self.batch_size, self.steps_per_epoch, self.val_batches = batch_size, steps_per_epoch, val_batches
        self.seed, self.num_workers = seed, num_workers
        self.train_ids = [f"{n}/{x}" for n, (_, tr, _) in current.items() for x in tr.names]
        self.val_ids = [f"{n}/{x}" for n, (_, _, va) in current.items() for x in va.names]

    def _sources(self, split: int) -> list[Source]:
        out = [Source(name, kind, "current", parts[split]) for name, (kind, *parts) in self.current.items()
               if len(parts[split])]
        return out + [Source(name, b.kind, "buffer", b) for name, b in self.buffers.items()]

    def _loader(self, data: Any, *, workers: int) -> DataLoader:
        from medmodal.data.collection_sampler import RankBatches

        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(data, batch_sampler=RankBatches(data, rank=rank, world_size=world),
                          collate_fn=collate_stage, num_workers=workers)

    def train_dataloader(self) -> DataLoader:
        data = StageBatches(sources=self._sources(0), batch_size=self.batch_size,
                            batches_per_epoch=self.steps_per_epoch, seed=self.seed)
        return self._loader(data, workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        data = FixedBatches(sources=self._sources(1), batch_size=self.batch_size, batches=self.val_batches,
                            seed=self.seed)
        return self._loader(data, workers=0)
