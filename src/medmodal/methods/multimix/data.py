"""MultiMix's data: whole images on one grid, the run's splits and label budgets, and the five training streams.

Spec ``shared/methods/multimix.md`` §2.4. Every image is read on its own grid, mapped to the model's intensity
space (per image and modality: percentiles → [0, 1] → [-1, 1]) and resized to ``image_size`` in its stored axis
order (2D X-rays keep their pixel grid's aspect only through the resize; ``predict`` resizes back). Masks become
one binary channel per region. The result is cached per data set and settings as a folder of ``.npy`` arrays that
are memory-mapped on read (DataLoader workers share them instead of receiving copies).

Splits (seeded by the recipe's seed): the cases of ``cross_sources`` are the cross-source test set; the others
are split into test (``test_fraction``), validation (``data.val_fraction``, for model selection) and training.
The label budgets keep the masks of ``seg_labels`` and the class labels of ``cls_labels`` training images (drawn
at random among those that have one); every other training image is unlabelled for that task.

Each optimiser step draws five global batches of ``data.batch_size`` (spec: 10): labelled and unlabelled
segmentation images, labelled classification images, and the weak and strong views of the same unlabelled
classification images. A stream walks through its pool in a seeded permutation, a fresh one per pass when
``reshuffle_streams`` (the released loaders keep one order); the weak and strong views of item ``i`` always come
from one pool index (invariant 7). Rank ``r`` of ``W`` takes its slice of every global batch, and every draw is a
function of ``(seed, step)``, so training is the same on any number of processes and resumes exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from medmodal.data.case import Case, CaseRecord, DataError, DatasetInfo
from medmodal.engine.distributed import ValidationShard, per_rank_batch

log = logging.getLogger("medmodal")

#: the five streams of a training step (spec §2.4), in order.
STREAMS = ("seg_labelled", "seg_unlabelled", "cls_labelled", "cls_unlabelled")
_CACHE_VERSION = 1


# -- one image -------------------------------------------------------------------------------------------------
def to_unit_range(array: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """``array`` (any shape) mapped by its own percentiles ``(lo, hi)`` to [0, 1] (clipped), float32."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(a, percentiles)
    if not hi > lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def resize(x: torch.Tensor, size: Sequence[int], *, mask: bool = False) -> torch.Tensor:
    """``x (C, *S)`` resized to ``size`` (bilinear / trilinear; antialiased when a 2D image shrinks). ``mask``:
    the channels are binary masks, resized as fractions and thresholded at 0.5."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return x.clone()
    mode = "bilinear" if len(size) == 2 else "trilinear"
    shrink = any(s < t for s, t in zip(size, x.shape[1:], strict=True))
    out = F.interpolate(x[None].float(), size=size, mode=mode, align_corners=False,
                        antialias=shrink and len(size) == 2)[0]
    return (out > 0.5).to(torch.uint8) if mask else out


def region_masks(label: np.ndarray, regions: dict[str, tuple[int, ...]]) -> np.ndarray:
    """``label (*S)`` → ``(R, *S) uint8``: one binary mask per region (its label values)."""
    return np.stack([np.isin(label, values) for values in regions.values()]).astype(np.uint8)


@dataclass
class ModelInput:
    """One case on the model's grid.

    Attributes:
        image: ``(M, *image_size)`` float32 in [-1, 1]; missing modalities hold zeros.
        available: ``(M,)`` bool.
        mask: ``(R, *image_size)`` uint8, or ``None``.
        shape: the case's own grid (the reference image's array shape), for resizing predictions back.
    """

    image: torch.Tensor
    available: torch.Tensor
    mask: torch.Tensor | None
    shape: tuple[int, ...]


def model_input(case: Case, *, modalities: Sequence[str], regions: dict[str, tuple[int, ...]],
                image_size: Sequence[int], percentiles: Sequence[float]) -> ModelInput:
    """``case`` resized onto the model's grid (see the module docstring)."""
    ref = case.reference
    if ref.spatial_dims != len(image_size):
        raise DataError(f"case {case.case_id!r}: a {ref.spatial_dims}D image ({ref.where}) for a model of "
                        f"{len(image_size)}D images (method.image_size {list(image_size)})")
    channels, available = [], []
    for m in modalities:
        vol = case.images.get(m)
        available.append(vol is not None)
        if vol is None:
            channels.append(torch.zeros(tuple(image_size)))
            continue
        unit = torch.from_numpy(to_unit_range(vol.array, percentiles))
        channels.append(resize(unit[None], image_size)[0].clamp(0.0, 1.0) * 2.0 - 1.0)
    mask = None
    if case.label is not None and regions:
        mask = resize(torch.from_numpy(region_masks(np.asarray(case.label.array), regions)), image_size, mask=True)
    return ModelInput(image=torch.stack(channels).float(), available=torch.tensor(available), mask=mask,
                      shape=tuple(ref.shape))


# -- the whole data set on the model's grid ------------------------------------------------------------------
@dataclass
class ImageSet:
    """Every case of a data set on the model's grid (what training reads).

    Attributes:
        case_ids, sources: per case (source ``""`` when the data set names none).
        images: ``(N, M, *S)`` float32 in [-1, 1]; available: ``(N, M)`` bool.
        masks: ``(N, R, *S)`` uint8 (zeros where ``has_mask`` is False); has_mask: ``(N,)`` bool.
        targets: ``(N,)`` int64 class index, -1 where the case has no class label.
    """

    case_ids: list[str]
    sources: list[str]
    images: np.ndarray
    available: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.case_ids)

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        where = {c: i for i, c in enumerate(self.case_ids)}
        return np.array([where[c] for c in ids], dtype=np.int64)


def _cache_key(records: Sequence[CaseRecord], settings: dict[str, Any]) -> str:
    def stamp(p: Path | None) -> Any:
        if p is None:
            return None
        st = p.stat()
        return [str(p), st.st_size, st.st_mtime_ns]

    doc = {"v": _CACHE_VERSION, "settings": settings,
           "cases": [[r.case_id, r.source, r.target, stamp(r.label), {m: stamp(p) for m, p in sorted(r.images.items())}]
                     for r in records]}
    return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


_ARRAYS = ("images", "available", "masks", "has_mask", "targets")


def _read_cache(folder: Path) -> ImageSet:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    return ImageSet(case_ids=[str(c) for c in meta["case_ids"]], sources=[str(s) for s in meta["sources"]], **arrays)


def _write_cache(folder: Path, data: ImageSet) -> None:
    """Write ``data`` to ``folder`` (a private folder renamed into place: a reader never sees half of it)."""
    import os
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(data, name)))
        (tmp / "meta.json").write_text(json.dumps({"case_ids": data.case_ids, "sources": data.sources}),
                                       encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote the same cache first
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_image_set(records: Sequence[CaseRecord], info: DatasetInfo, *, modalities: Sequence[str],
                   regions: dict[str, tuple[int, ...]], image_size: Sequence[int], percentiles: Sequence[float],
                   cache_dir: Path | None, progress: bool = False) -> ImageSet:
    """Read and resize every case of ``records`` (cached in ``cache_dir/multimix-<key>/``, memory-mapped)."""
    from medmodal.data.io import read_case

    settings = {"modalities": list(modalities), "regions": {k: list(v) for k, v in regions.items()},
                "image_size": list(image_size), "percentiles": list(percentiles)}
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / f"multimix-{_cache_key(records, settings)}"
        if (folder / "meta.json").is_file():
            return _read_cache(folder)
    n, m, r = len(records), len(modalities), len(regions)
    images = np.zeros((n, m, *image_size), np.float32)
    available = np.zeros((n, m), bool)
    masks = np.zeros((n, r, *image_size), np.uint8)
    has_mask = np.zeros(n, bool)
    targets = np.full(n, -1, np.int64)
    sources = []
    it: Any = records
    if progress:
        from rich.progress import track

        it = track(records, description="reading images", transient=True)
    for i, record in enumerate(it):
        case = read_case(record, info)
        x = model_input(case, modalities=modalities, regions=regions, image_size=image_size, percentiles=percentiles)
        images[i], available[i] = x.image.numpy(), x.available.numpy()
        if x.mask is not None:
            masks[i], has_mask[i] = x.mask.numpy(), True
        if case.target is not None:
            targets[i] = int(case.target)
        sources.append(record.source or "")
    out = ImageSet(case_ids=[r.case_id for r in records], sources=sources, images=images, available=available,
                   masks=masks, has_mask=has_mask, targets=targets)
    if folder is not None:
        _write_cache(folder, out)
        return _read_cache(folder)
    return out


# -- splits and budgets ----------------------------------------------------------------------------------------
def make_splits(data: ImageSet, *, cross_sources: Sequence[str], val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, list[str]]:
    """``{"train", "val", "test", "cross_source"}`` case ids (see the module docstring)."""
    known = sorted(set(data.sources))
    unknown = sorted(set(cross_sources) - set(known))
    if unknown:
        raise DataError(f"method.cross_sources: {unknown} are not sources of the data set (it has "
                        f"{[s for s in known if s] or 'no source column'})")
    cross = [c for c, s in zip(data.case_ids, data.sources, strict=True) if s in set(cross_sources)]
    pool = sorted(c for c, s in zip(data.case_ids, data.sources, strict=True) if s not in set(cross_sources))
    if len(pool) < 3 and test_fraction > 0 or len(pool) < 2:
        raise DataError(f"{len(pool)} in-source case(s): too few to split into training, validation and test; "
                        "add cases or lower method.test_fraction")
    order = np.random.default_rng([seed, 1]).permutation(len(pool))
    n_test = max(1, round(test_fraction * len(pool))) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * len(pool)))
    if n_test + n_val >= len(pool):
        raise DataError(f"{len(pool)} in-source cases leave none for training with data.val_fraction "
                        f"{val_fraction} and method.test_fraction {test_fraction}; lower them or add cases")
    test = sorted(pool[i] for i in order[:n_test])
    val = sorted(pool[i] for i in order[n_test:n_test + n_val])
    train = sorted(pool[i] for i in order[n_test + n_val:])
    return {"train": train, "val": val, "test": test, "cross_source": sorted(cross)}


@dataclass
class Budget:
    """The training pools of the four image streams (indices into the :class:`ImageSet`)."""

    seg_labelled: np.ndarray
    seg_unlabelled: np.ndarray
    cls_labelled: np.ndarray
    cls_unlabelled: np.ndarray

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in dataclasses.asdict(self).items()}


def _draw(candidates: np.ndarray, budget: int | str, rng: np.random.Generator, *, field: str, what: str) -> np.ndarray:
    if budget == "all":
        return np.sort(candidates)
    if int(budget) > len(candidates):
        raise DataError(f"method.{field}: {budget} labelled images asked for, but only {len(candidates)} training "
                        f"images have {what}; lower it or use 'all'")
    return np.sort(rng.choice(candidates, size=int(budget), replace=False)) if int(budget) else candidates[:0]


def apply_budget(data: ImageSet, train_ids: Sequence[str], *, seg_labels: int | str, cls_labels: int | str,
                 segment: bool, classify: bool, semi_supervised: bool, seed: int) -> Budget:
    """Which training images keep their mask / class label, and the unlabelled pools of each task.

    An unlabelled pool is every other training image; when that is empty (every image labelled, "all" budgets),
    semi-supervision uses every training image with its labels ignored (FixMatch's own convention)."""
    train = np.sort(data.index_of(train_ids))
    rng = np.random.default_rng([seed, 2])
    with_mask = train[data.has_mask[train]]
    with_class = train[data.targets[train] >= 0]
    seg_l = _draw(with_mask, seg_labels, rng, field="seg_labels", what="a mask") if segment else train[:0]
    cls_l = _draw(with_class, cls_labels, rng, field="cls_labels", what="a class label") if classify else train[:0]
    if segment and not len(seg_l):
        raise DataError("no training image keeps a mask (method.seg_labels, or the data set has no masks); "
                        "a model that segments needs some, or choose method.variant enc / enc_ssl")
    if classify and not len(cls_l):
        raise DataError("no training image keeps a class label (method.cls_labels, or the data set has no "
                        "targets); a model that classifies needs some, or choose method.variant unet")
    if classify and len(np.unique(data.targets[cls_l])) < 2:
        log.warning("the labelled classification images hold one class only (%s)", np.unique(data.targets[cls_l]))
    seg_u = np.setdiff1d(train, seg_l) if segment and semi_supervised else train[:0]
    cls_u = np.setdiff1d(train, cls_l) if classify and semi_supervised else train[:0]
    if segment and semi_supervised and not len(seg_u):
        seg_u = train
    if classify and semi_supervised and not len(cls_u):
        cls_u = train
    return Budget(seg_labelled=seg_l, seg_unlabelled=seg_u, cls_labelled=cls_l, cls_unlabelled=cls_u)


# -- the training streams ----------------------------------------------------------------------------------------
def stream_positions(step: int, batch: int, pool: int, *, seed: int, stream: int, reshuffle: bool) -> np.ndarray:
    """Pool indices of global batch ``step`` of one stream: items ``step·B … step·B + B − 1`` of the stream's
    endless walk through its pool, one seeded permutation per pass (the same one every pass without
    ``reshuffle``)."""
    epochs, index = np.divmod(step * batch + np.arange(batch), pool)
    out = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(epochs):  # one permutation per pass the batch touches (one or two, not one per item)
        perm = np.random.default_rng([seed, 3, stream, int(epoch) if reshuffle else 0]).permutation(pool)
        at = epochs == epoch
        out[at] = perm[index[at]]
    return out


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor copy of (part of) a possibly read-only memory-mapped array."""
    return torch.from_numpy(np.array(a))


def item_generator(seed: int, step: int, stream: int, k: int) -> torch.Generator:
    """The generator of item ``k`` of ``stream`` at ``step`` (its augmentation): the same on every rank."""
    digest = hashlib.sha1(f"{seed}/{step}/{stream}/{k}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class StreamSteps(Dataset):
    """One epoch of training steps; item ``j`` is this rank's share of step ``epoch·steps + j``'s five streams.

    Keys of an item (``b = B / W`` images each, ``R`` regions): ``seg_labelled_image (b, M, *S)``,
    ``seg_labelled_mask (b, R, *S)`` float, ``seg_unlabelled_image``, ``cls_labelled_image``,
    ``cls_labelled_target (b,)``, ``cls_weak_image`` and ``cls_strong_image`` (the two views of the same images),
    plus ``<stream>_available (b, M)`` bool and ``cls_unlabelled_index (b,)`` (pool indices, for checks).
    A stream whose pool is empty is absent.
    """

    def __init__(self, *, data: ImageSet, budget: Budget, batch_size: int, steps_per_epoch: int, rank: int,
                 world_size: int, seed: int, reshuffle: bool, weak: Any, strong: Any, seg_augment: bool) -> None:
        self.data, self.budget = data, budget
        self.batch, self.steps_per_epoch = batch_size, steps_per_epoch
        self.local = per_rank_batch(batch_size, world_size)
        self.rank, self.seed, self.reshuffle = rank, seed, reshuffle
        self.weak, self.strong, self.seg_augment = weak, strong, seg_augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _indices(self, step: int, pool: np.ndarray, stream: int, reshuffle: bool) -> tuple[np.ndarray, range]:
        pos = stream_positions(step, self.batch, len(pool), seed=self.seed, stream=stream, reshuffle=reshuffle)
        ks = range(self.rank * self.local, (self.rank + 1) * self.local)
        return pool[pos[list(ks)]], ks

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        if not 0 <= j < self.steps_per_epoch:
            raise IndexError(j)
        step = self.epoch * self.steps_per_epoch + j
        d, out = self.data, {}
        # stream 0: labelled segmentation (image + mask), 1: unlabelled segmentation
        for s, name in enumerate(("seg_labelled", "seg_unlabelled")):
            pool = getattr(self.budget, name)
            if not len(pool):
                continue
            idx, ks = self._indices(step, pool, s, True)
            labelled = name == "seg_labelled"  # only its masks are read (an unlabelled image's mask is hidden)
            imgs, masks = [], []
            for i, k in zip(idx, ks, strict=True):
                x = _tensor(d.images[i])
                y = _tensor(d.masks[i]).float() if labelled else None
                if self.seg_augment:  # the mask, when given, follows the image's geometric ops
                    x, _, *rest = self.weak(x, item_generator(self.seed, step, s, k), mask=y)
                    y = rest[0] if rest else None
                imgs.append(x)
                masks.append(y)
            out[f"{name}_image"] = torch.stack(imgs)
            out[f"{name}_available"] = _tensor(d.available[idx])
            if labelled:
                out["seg_labelled_mask"] = torch.stack(masks)
        # stream 2: labelled classification (weak view)
        pool = self.budget.cls_labelled
        if len(pool):
            idx, ks = self._indices(step, pool, 2, self.reshuffle)
            out["cls_labelled_image"] = torch.stack([self.weak(_tensor(d.images[i]),
                                                               item_generator(self.seed, step, 2, k))[0]
                                                     for i, k in zip(idx, ks, strict=True)])
            out["cls_labelled_target"] = _tensor(d.targets[idx])
            out["cls_labelled_available"] = _tensor(d.available[idx])
        # streams 3 and 4: weak and strong views of the same unlabelled images
        pool = self.budget.cls_unlabelled
        if len(pool):
            idx, ks = self._indices(step, pool, 3, self.reshuffle)
            raw = [_tensor(d.images[i]) for i in idx]
            out["cls_weak_image"] = torch.stack([self.weak(x, item_generator(self.seed, step, 3, k))[0]
                                                 for x, k in zip(raw, ks, strict=True)])
            out["cls_strong_image"] = torch.stack([self.strong(x, item_generator(self.seed, step, 4, k))[0]
                                                   for x, k in zip(raw, ks, strict=True)])
            out["cls_unlabelled_available"] = _tensor(d.available[idx])
            out["cls_unlabelled_index"] = torch.from_numpy(idx)
        return out


class WholeImages(Dataset):
    """Validation items: ``image (M, *S)``, ``available (M,)``, ``mask (R, *S)`` float, ``has_mask``,
    ``target`` (-1: none), ``index``."""

    def __init__(self, data: ImageSet, indices: np.ndarray) -> None:
        self.data, self.indices = data, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i, d = int(self.indices[j]), self.data
        return {"image": _tensor(d.images[i]), "available": _tensor(d.available[i]),
                "mask": _tensor(d.masks[i]).float(), "has_mask": bool(d.has_mask[i]),
                "target": int(d.targets[i]), "index": i}


def _no_collate(item: Any) -> Any:
    return item


class MultiMixData(L.LightningDataModule):
    """The five training streams and the validation images of a MultiMix run (see the module docstring).

    After ``setup``: :attr:`data` (:class:`ImageSet`), :attr:`splits`, :attr:`budget`, ``train_ids``/``val_ids``
    and :attr:`extra_splits` (``test``, ``cross_source`` and the labelled ids of each task, for ``split.json``).
    """

    def __init__(self, *, records_fn: Any, modalities: Sequence[str], regions: dict[str, tuple[int, ...]],
                 image_size: Sequence[int], percentiles: Sequence[float], cache_dir: Path | None, batch_size: int,
                 steps_per_epoch: int, val_fraction: float, test_fraction: float, cross_sources: Sequence[str],
                 seg_labels: int | str, cls_labels: int | str, segment: bool, classify: bool,
                 semi_supervised: bool, reshuffle: bool, seg_augment: bool, num_workers: int, seed: int,
                 progress: bool = False) -> None:
        super().__init__()
        self.records_fn = records_fn
        self.modalities, self.regions = tuple(modalities), dict(regions)
        self.image_size, self.percentiles = tuple(image_size), tuple(percentiles)
        self.cache_dir, self.batch_size, self.steps_per_epoch = cache_dir, batch_size, steps_per_epoch
        self.val_fraction, self.test_fraction, self.cross_sources = val_fraction, test_fraction, list(cross_sources)
        self.seg_labels, self.cls_labels = seg_labels, cls_labels
        self.segment, self.classify, self.semi_supervised = segment, classify, semi_supervised
        self.reshuffle, self.seg_augment = reshuffle, seg_augment
        self.num_workers, self.seed, self.progress = num_workers, seed, progress
        self.data: ImageSet | None = None
        self.splits: dict[str, list[str]] = {}
        self.budget: Budget | None = None
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []
        self.extra_splits: dict[str, list[str]] = {}

    def _load(self) -> ImageSet:
        info, records = self.records_fn()
        return load_image_set(records, info, modalities=self.modalities, regions=self.regions,
                              image_size=self.image_size, percentiles=self.percentiles, cache_dir=self.cache_dir,
                              progress=self.progress)

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        self.data = d = self._load()
        self.splits = make_splits(d, cross_sources=self.cross_sources, val_fraction=self.val_fraction,
                                  test_fraction=self.test_fraction, seed=self.seed)
        self.budget = b = apply_budget(d, self.splits["train"], seg_labels=self.seg_labels,
                                       cls_labels=self.cls_labels, segment=self.segment, classify=self.classify,
                                       semi_supervised=self.semi_supervised, seed=self.seed)
        self.train_ids, self.val_ids = self.splits["train"], self.splits["val"]
        ids = np.array(d.case_ids)
        self.extra_splits = {"test": self.splits["test"], "cross_source": self.splits["cross_source"],
                             "seg_labelled": ids[b.seg_labelled].tolist(), "cls_labelled": ids[b.cls_labelled].tolist()}
        log.info("MultiMix data: %d train / %d val / %d test / %d cross-source images; streams %s",
                 len(self.train_ids), len(self.val_ids), len(self.splits["test"]), len(self.splits["cross_source"]),
                 ", ".join(f"{k} {v}" for k, v in b.counts().items()))
        weak, strong = self.views()
        log.info("augmentation: weak view %s; strong view %s (each item's draw is seeded by (seed, step, stream, "
                 "item))", weak.describe(), strong.describe())

    def views(self) -> tuple[Any, Any]:
        """The weak and strong views (:mod:`medmodal.transforms.views`) for this image size."""
        from medmodal.transforms.views import strong_views, weak_views

        dims = len(self.image_size)
        return (weak_views(spatial_dims=dims, size=self.image_size),
                strong_views(spatial_dims=dims, size=self.image_size))

    @property
    def unlabelled_epoch_steps(self) -> int:
        """Steps of one pass over the unlabelled classification images (the spec's epoch; else the labelled)."""
        assert self.budget is not None
        n = len(self.budget.cls_unlabelled) or len(self.budget.cls_labelled) or len(self.budget.seg_labelled)
        return max(1, math.ceil(n / self.batch_size))

    @property
    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        assert self.data is not None and self.budget is not None
        rank, world = self._ranks
        weak, strong = self.views()
        steps = StreamSteps(data=self.data, budget=self.budget, batch_size=self.batch_size,
                            steps_per_epoch=self.steps_per_epoch, rank=rank, world_size=world, seed=self.seed,
                            reshuffle=self.reshuffle, weak=weak, strong=strong, seg_augment=self.seg_augment)
        return DataLoader(steps, batch_size=None, shuffle=False, num_workers=self.num_workers,
                          collate_fn=_no_collate, persistent_workers=False)

    def val_dataloader(self) -> DataLoader:
        assert self.data is not None
        rank, world = self._ranks
        items = WholeImages(self.data, self.data.index_of(self.val_ids))
        return DataLoader(ValidationShard(items, rank=rank, world_size=world), batch_size=8, shuffle=False,
                          num_workers=0)
