"""Crops of whole tokens from a cached image collection, batched so that every batch shares one token grid and DA.

A token is ``patch_size`` voxels in-plane and ``patch_size >> DA`` slices deep (at least 1), so a token covers about
the same physical depth as width whatever the slice thickness, and a spacing-adaptive network sees one anisotropy
state per batch (the pretraining spec, §2.1: "a bucketed batch sampler makes every batch share one DA"). Nothing is
resampled.

Crop of image ``k`` (shape ``(X, Y, Z)``, degree of anisotropy ``a``), with token size ``t = (p, p, max(p >> a, 1))``
and the configured grid ``G = (g_x, g_y, g_z)``:

* tokens per axis ``n_i = min(g_i, ceil(S_i / t_i))``; a 2D image and a DA-``max_da`` volume take one slice
  (``n_z = 1``, ``t_z = 1``): "at least 32x anisotropic is 2D";
* the crop is ``n_i * t_i`` voxels at a uniform random corner. Where the image is shorter than the crop, the
  crop is zero-padded at the far end and ``valid`` is ``False`` there. **Bound:** an axis pads only when
  ``n_i = ceil(S_i / t_i) >= 2`` (an image is at least one token long, so a one-token axis fits exactly), and then
  by less than one token: ``n_i * t_i - S_i < t_i``, under ``1 / n_i <= 1/2`` of that axis. So more than half of a
  crop's extent is image along every axis (more than 1/8 of its voxels in the worst case of three padded
  two-token axes), and an image at least ``G * t`` large is never padded;
* an image smaller than one token along an axis is refused (listed with its file).

The **bucket** of an image is ``(DA, (n_x, n_y, n_z))``. Batch ``j`` of epoch ``e`` is a pure function of
``(seed, e, j)``: a lead image is drawn with the per-image probability ``pi_k = w_g / (sum of weights) / |g|``
(``w_g`` the weight of the image's dataset, or modality, ``g``); the other ``B - 1`` images are drawn from the lead's
bucket with probabilities ``pi`` restricted to it. Every position of a batch is then distributed as ``pi`` (so the
DA histogram of batches follows the weights: spec invariant 9), and every batch holds one bucket.

**Channels.** Grey and colour images of one bucket share batches: every crop is converted to the ``channels`` the
network takes (:func:`~medmodal.data.collections.to_channels`: RGB -> grey by the BT.601 weights, grey -> RGB by
replication), so a batch is ``(B, channels, X, Y, Z)`` whatever its images hold.

Item ``i`` of the data set is position ``i mod B`` of global batch ``i // B``; a DataLoader with
:class:`RankBatches` gives rank ``r`` of ``W`` positions ``[r B/W, (r+1) B/W)`` of each global batch, so ``W`` ranks
together see exactly one process's batches. The crop corner of item ``i`` is drawn from ``(seed, e, i)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medmodal.data.case import DataError
from medmodal.data.collection_cache import CachedImage, CollectionIndex
from medmodal.data.collections import CHANNELS, MAX_DA, to_channels
from medmodal.data.io import DataErrors

__all__ = ["Bucket", "CollectionCrops", "RankBatches", "collate_crops", "crop_tokens", "token_size"]

#: ``SeedSequence`` spawn key of the crop-corner stream (the batch plans use the root sequence).
_CORNER_STREAM = 1
#: memory maps kept open per process.
MAX_OPEN_IMAGES = 64
Bucket = tuple[int, tuple[int, int, int]]


def token_size(da: int, *, patch_size: int = 16, max_da: int = MAX_DA) -> tuple[int, int, int]:
    """Voxels per token ``(p, p, max(p >> da, 1))``; ``(p, p, 1)`` at ``da == max_da`` (2D)."""
    depth = 1 if da >= max_da else max(patch_size >> da, 1)
    return patch_size, patch_size, depth


def crop_tokens(
    shape: Sequence[int], da: int, *, token_grid: Sequence[int], patch_size: int = 16, max_da: int = MAX_DA
) -> tuple[int, int, int]:
    """Tokens per axis of a crop of an ``(X, Y, Z)`` image: ``min(g_i, ceil(S_i / t_i))`` (``n_z = 1`` at 2D DA).

    Raises:
        ValueError: the image is smaller than one token along some axis.
    """
    t = token_size(da, patch_size=patch_size, max_da=max_da)
    if any(s < ti for s, ti in zip(shape, t, strict=True)):
        raise ValueError(f"shape {tuple(shape)} is smaller than one token {t} (DA {da})")
    n = [min(int(g), math.ceil(s / ti)) for s, ti, g in zip(shape, t, token_grid, strict=True)]
    if da >= max_da:
        n[2] = 1
    return n[0], n[1], n[2]


class _Maps:
    """Per-process LRU of memory maps; emptied when pickled (DataLoader workers open their own)."""

    def __init__(self, images: list[CachedImage]) -> None:
        self.images = images
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, k: int) -> np.ndarray:
        if k in self._open:
            self._open.move_to_end(k)
        else:
            self._open[k] = self.images[k].data()
            if len(self._open) > MAX_OPEN_IMAGES:
                self._open.popitem(last=False)
        return self._open[k]

    def __getstate__(self) -> dict:
        return {"images": self.images, "_open": OrderedDict()}


class CollectionCrops(Dataset):
    """Crops of whole tokens, laid out as consecutive global batches of one bucket each (see the module docstring).

    Items are dicts::

        {"image": (channels, X, Y, Z) float32 in [0, 1], "valid": (1, X, Y, Z) bool (False on padding),
         "da": int, "tokens": (n_x, n_y, n_z), "corner": (x0, y0, z0) in the image,
         "spacing": (3,) float32 mm, "image_id": str, "modality": str, "dataset": str,
         "source_channels": int (the image's own: 1 grey, 3 RGB)}

    with ``(X, Y, Z) = tokens * token_size(da)``; :func:`collate_crops` stacks them.

    Args:
        index: the collection cache.
        batch_size: the global batch ``B`` (all ranks together).
        batches_per_epoch: global batches per epoch; the data set has ``B * batches_per_epoch`` items.
        token_grid: the largest crop in tokens ``(g_x, g_y, g_z)`` (spec: 8x8x4 for the tokenizer, 10x10x5 for
            the ViT).
        patch_size: in-plane voxels per token (the network's total stride; 16 in the spec).
        weights: relative sampling weight of each group (``weight_by``), or ``None`` for equal weights. Every group
            of the collection must be named (0 leaves it out). A per-image weight ``w`` as in the reference
            code's dataset tables is the group weight ``w * (images in the group)``.
        weight_by: ``"dataset"`` or ``"modality"``: what ``weights`` names.
        seed: base seed.
        max_da: the DA of a 2D image.
        channels: the channels of every crop, 1 (a colour image becomes its BT.601 grey) or 3 (a grey image is
            replicated; PUMIT spec §2.2).

    Call :meth:`set_epoch` before each epoch's iterator so that epochs draw different batches.
    """

    def __init__(
        self,
        *,
        index: CollectionIndex,
        batch_size: int,
        batches_per_epoch: int,
        token_grid: Sequence[int] = (8, 8, 4),
        patch_size: int = 16,
        weights: Mapping[str, float] | None = None,
        weight_by: Literal["dataset", "modality"] = "dataset",
        seed: int = 0,
        max_da: int = MAX_DA,
        channels: int = 1,
    ) -> None:
        if channels not in CHANNELS:
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(f"batch_size ({batch_size}) and batches_per_epoch ({batches_per_epoch}) must be >= 1")
        grid = tuple(int(g) for g in token_grid)
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"token_grid must be 3 positive token counts (x, y, z), got {tuple(token_grid)}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if weight_by not in ("dataset", "modality"):
            raise ValueError(f"weight_by must be 'dataset' or 'modality', got {weight_by!r}")
        if len(index) == 0:
            raise DataError(f"{index.root}: the collection cache has no images")
        self.index, self.images = index, list(index.images)
        self.batch_size, self.batches_per_epoch = int(batch_size), int(batches_per_epoch)
        self.token_grid, self.patch_size, self.max_da = grid, int(patch_size), int(max_da)
        self.seed, self.epoch, self.channels = int(seed), 0, int(channels)
        problems, self.tokens = [], []
        for image in self.images:
            try:
                self.tokens.append(crop_tokens(image.shape, image.da, token_grid=grid, patch_size=self.patch_size,
                                               max_da=self.max_da))
            except ValueError:
                t = token_size(image.da, patch_size=self.patch_size, max_da=self.max_da)
                problems.append((image.image_id, image.source, f"{image.source}: is {image.shape} voxels (DA "
                                 f"{image.da}), smaller than one token {t}; leave it out of the collection"))
        if problems:
            raise DataErrors(problems, where=f"{index.root}: collection")
        self.probabilities = self._probabilities(weights, weight_by)
        self.buckets: list[Bucket] = [(im.da, t) for im, t in zip(self.images, self.tokens, strict=True)]
        members: dict[Bucket, list[int]] = {}
        for k, b in enumerate(self.buckets):
            if self.probabilities[k] > 0:
                members.setdefault(b, []).append(k)
        self._members = {b: np.asarray(ks) for b, ks in members.items()}
        self._member_p = {b: self.probabilities[ks] / self.probabilities[ks].sum() for b, ks in self._members.items()}
        self._plans: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._maps = _Maps(self.images)

    def _probabilities(self, weights: Mapping[str, float] | None, weight_by: str) -> np.ndarray:
        groups = [getattr(im, weight_by) for im in self.images]
        names = sorted(set(groups))
        if weights is None:
            weights = dict.fromkeys(names, 1.0)
        unknown = sorted(set(weights) - set(names))
        missing = [g for g in names if g not in weights]
        if unknown or missing:
            raise ValueError(f"weights must name every {weight_by} of the collection {names} (0 leaves one out); "
                             + (f"unknown: {unknown}" if unknown else f"missing: {missing}"))
        bad = {g: w for g, w in weights.items() if not (math.isfinite(float(w)) and float(w) >= 0)}
        if bad or not any(float(weights[g]) > 0 for g in names):
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {dict(weights)}")
        size = {g: groups.count(g) for g in names}
        total = sum(float(weights[g]) for g in names)
        return np.array([float(weights[g]) / total / size[g] for g in groups])

    def set_epoch(self, epoch: int) -> None:
        """Make the following draws those of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batch_size * self.batches_per_epoch

    def batch(self, j: int) -> np.ndarray:
        """``(B,)`` image indices of global batch ``j`` of the current epoch (all of one bucket; no array read)."""
        if not 0 <= j < self.batches_per_epoch:
            raise IndexError(f"batch {j} out of range for {self.batches_per_epoch} batches per epoch")
        key = (self.epoch, j)
        if key not in self._plans:
            rng = np.random.default_rng([self.seed, self.epoch, j])
            lead = int(rng.choice(len(self.images), p=self.probabilities))
            b = self.buckets[lead]
            rest = rng.choice(self._members[b], size=self.batch_size - 1, p=self._member_p[b])
            self._plans[key] = np.concatenate([[lead], rest]).astype(np.int64)
            if len(self._plans) > 4:
                self._plans.popitem(last=False)
        return self._plans[key]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items per epoch")
        j, pos = divmod(i, self.batch_size)
        k = int(self.batch(j)[pos])
        image, tokens = self.images[k], self.tokens[k]
        t = token_size(image.da, patch_size=self.patch_size, max_da=self.max_da)
        size = tuple(n * ti for n, ti in zip(tokens, t, strict=True))
        seq = np.random.SeedSequence([self.seed, self.epoch, i], spawn_key=(_CORNER_STREAM,))
        rng = np.random.default_rng(seq)
        corner = [int(rng.integers(0, max(s - c, 0) + 1)) for s, c in zip(image.shape, size, strict=True)]
        window = tuple(slice(c0, min(c0 + c, s)) for c0, c, s in zip(corner, size, image.shape, strict=True))
        data = to_channels(np.asarray(self._maps[k][(slice(None), *window)], dtype=np.float32), self.channels)
        out = np.zeros((self.channels, *size), dtype=np.float32)
        valid = np.zeros((1, *size), dtype=bool)
        filled = (slice(None), *(slice(0, d) for d in data.shape[1:]))
        out[filled], valid[filled] = data, True
        return {
            "image": torch.from_numpy(out),
            "valid": torch.from_numpy(valid),
            "da": image.da,
            "tokens": tokens,
            "corner": tuple(corner),
            "spacing": torch.tensor(image.spacing, dtype=torch.float32),
            "image_id": image.image_id,
            "modality": image.modality,
            "dataset": image.dataset,
            "source_channels": image.channels,
        }


class RankBatches(Sampler[list[int]]):
    """Rank ``rank``'s share of every global batch of a :class:`CollectionCrops`: a batch sampler for a DataLoader.

    Global batch ``j`` is items ``[j B, (j + 1) B)``; rank ``r`` of ``W`` gets items
    ``j B + r b ... j B + (r + 1) b - 1`` with ``b = B / W`` (the split of ``medmodal``'s multi-process training).

    Raises:
        ValueError: ``B`` is not a multiple of ``world_size``, or ``rank`` is outside ``0 .. W - 1``.
    """

    def __init__(self, crops: CollectionCrops, *, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in 0..{world_size - 1} (world size {world_size})")
        if crops.batch_size % world_size:
            raise ValueError(f"batch_size = {crops.batch_size} is the global batch and must be a multiple of the "
                             f"{world_size} training processes")
        self.crops, self.rank, self.world_size = crops, rank, world_size
        self.local = crops.batch_size // world_size

    def __len__(self) -> int:
        return self.crops.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        start = self.rank * self.local
        for j in range(self.crops.batches_per_epoch):
            base = j * self.crops.batch_size + start
            yield list(range(base, base + self.local))

    def set_epoch(self, epoch: int) -> None:
        self.crops.set_epoch(epoch)


def collate_crops(samples: Sequence[dict]) -> dict:
    """Stack crops of one bucket: ``image`` ``(B, channels, X, Y, Z)``, ``valid`` ``(B, 1, X, Y, Z)``,
    ``spacing (B, 3)``, ``da`` and ``tokens`` (one value each), ``corner``/``image_id``/``modality``/``dataset``/
    ``source_channels`` lists.

    Raises:
        ValueError: the samples mix DAs, token grids or channel counts (a sampler bug: batches are formed per
            bucket and every crop is converted to the data set's ``channels``).
    """
    buckets = {(s["da"], tuple(s["tokens"])) for s in samples}
    if len(buckets) != 1:
        raise ValueError(f"a batch must hold one (DA, token grid) bucket, got {sorted(buckets)}")
    counts = {int(s["image"].shape[0]) for s in samples}
    if len(counts) != 1:
        raise ValueError(f"a batch must hold crops of one channel count, got {sorted(counts)}")
    (da, tokens), = buckets
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "valid": torch.stack([s["valid"] for s in samples]),
        "spacing": torch.stack([s["spacing"] for s in samples]),
        "da": da,
        "tokens": tokens,
        "corner": [s["corner"] for s in samples],
        "image_id": [s["image_id"] for s in samples],
        "modality": [s["modality"] for s in samples],
        "dataset": [s["dataset"] for s in samples],
        "source_channels": [s.get("source_channels", 1) for s in samples],
    }
