"""Where a recipe's data comes from, and the Lightning data module over the preprocessed cache.

The cache is built once in ``prepare_data`` (one process per node, as Lightning guarantees), then every rank
memory-maps it in ``setup``; training patches come from :class:`~medmodal.data.sampling.PatchDataset`
(augmented by :class:`~medmodal.transforms.augment.PatchAugmentation` when ``data.augmentation.enabled``),
validation uses whole cases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from medmodal.data.case import CaseRecord, DataError, DatasetInfo
from medmodal.data.preprocess import HistogramClip
from medmodal.engine.distributed import RankShard, ValidationShard
from medmodal.engine.recipe import AugmentationConfig, DataConfig, PhantomConfig

log = logging.getLogger("medmodal")


def cache_root() -> Path:
    """``$MEDMODAL_CACHE`` or ``~/.cache/medmodal``: generated phantoms and preprocessed arrays."""
    return Path(os.environ.get("MEDMODAL_CACHE", Path.home() / ".cache" / "medmodal")).expanduser()


def cache_key(obj: Any) -> str:
    """A short stable hash of ``obj`` (JSON) naming a cache folder."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def phantom_key(cfg: PhantomConfig) -> dict[str, Any]:
    """The settings that identify a phantom; a brain phantom's leave out ``kind`` and ``sources``, so its cache
    folders keep the names they had before the chest phantom existed."""
    key = cfg.model_dump(mode="json")
    if cfg.kind == "brain":
        for name in ("kind", "sources"):
            key.pop(name)
    else:  # a new version of the generator is a new data set, never a stale cache
        from medmodal.data.phantom_xray import CHEST_PHANTOM_VERSION

        key["version"] = CHEST_PHANTOM_VERSION
    return key


def phantom_dir(cfg: PhantomConfig) -> Path:
    """The cached location of the phantom data set described by ``cfg``."""
    prefix = "xray" if cfg.kind == "chest_xray" else ""
    return cache_root() / "phantom" / f"{prefix}{cfg.spatial_dims}d-{cfg.cases}c-{cache_key(phantom_key(cfg))}"


def ensure_phantom(cfg: PhantomConfig, *, progress: bool = False) -> Path:
    """Write the phantom described by ``cfg`` unless it is already in the cache; return its folder.

    The phantom is written into a private folder next to its place and renamed into place when complete, so
    processes that need the same phantom at once (two ``train`` commands, parallel runs) never read a half-written
    one: the first rename wins, the others discard their copy.
    """
    import shutil

    from medmodal.data.phantom import write_phantom
    from medmodal.data.phantom_xray import write_chest_phantom

    root = phantom_dir(cfg)
    if (root / ".complete").is_file():
        return root
    log.info("generating the synthetic %s phantom (%d cases, %dD) in %s", cfg.kind, cfg.cases, cfg.spatial_dims,
             root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if cfg.kind == "chest_xray":
            assert isinstance(cfg.size, int)  # PhantomConfig checks it
            write_chest_phantom(tmp, cases=cfg.cases, seed=cfg.seed, size=cfg.size, sources=cfg.sources,
                                overwrite=True, progress=progress)
        else:
            write_phantom(
                tmp,
                cases=cfg.cases,
                seed=cfg.seed,
                spatial_dims=cfg.spatial_dims,
                size=cfg.size,
                spacing=tuple(cfg.spacing) if cfg.spacing else None,
                missing_rate=cfg.missing_rate,
                layout="brats",
                overwrite=True,
                progress=progress,
            )
        (tmp / ".complete").touch()
        if root.exists() and not (root / ".complete").is_file():
            shutil.rmtree(root, ignore_errors=True)  # a copy left half-written by an older, killed process
        try:
            os.rename(tmp, root)
        except OSError:  # another process put a complete copy there first
            if not (root / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@dataclass
class DataSource:
    """A resolved data set: its info, the modality order to train on, and where its cache lives."""

    info: DatasetInfo
    modalities: tuple[str, ...]
    dataset_dir: Path | None
    format: str
    phantom: PhantomConfig | None
    cache_dir: Path
    target_spacing: tuple[float, ...] | None
    histogram_clip: HistogramClip | None = None

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing settings a run records in ``run.json`` (``predict`` repeats them; see
        :meth:`medmodal.engine.runinfo.RunInfo.preprocessing_options`)."""
        clip = self.histogram_clip
        out: dict[str, Any] = {"target_spacing": list(self.target_spacing or []) or None,
                               "histogram_clip": None if clip is None else clip.to_dict()}
        if clip is not None:
            out["normalisation"] = (f"per-modality clip at the upper edge of the highest of {clip.bins} histogram "
                                    f"bins holding >= {clip.min_count} non-zero voxels, then z-score over the "
                                    "foreground")
        return out

    def records(self) -> tuple[DatasetInfo, list[CaseRecord]]:
        from medmodal.data.formats import open_dataset

        root = self.dataset_dir if self.phantom is None else ensure_phantom(self.phantom)
        assert root is not None
        if self.phantom is None:
            return open_dataset(root, format=self.format)
        return open_dataset(root, format="manifest" if self.phantom.kind == "chest_xray" else "brats")


def resolve_source(cfg: DataConfig) -> DataSource:
    """Read what a recipe's ``data`` section points at (cheap: no image is decoded)."""
    from medmodal.data.phantom import phantom_info
    from medmodal.data.phantom_xray import chest_phantom_info

    if cfg.path is None:
        info = chest_phantom_info() if cfg.phantom.kind == "chest_xray" else phantom_info()
        source_key: Any = phantom_key(cfg.phantom)
        dataset_dir = None
    else:
        from medmodal.data.formats import open_dataset

        if not cfg.path.exists():
            raise DataError(f"data.path: {cfg.path} does not exist")
        info, _ = open_dataset(cfg.path, format=cfg.format)
        source_key = str(cfg.path.resolve())
        dataset_dir = cfg.path
    modalities = tuple(cfg.modalities) if cfg.modalities else tuple(info.modalities)
    info.check_modalities(modalities, where="data.modalities")
    spacing = tuple(float(s) for s in cfg.target_spacing) if cfg.target_spacing else None
    clip = None if cfg.histogram_clip is None else HistogramClip(**cfg.histogram_clip.model_dump())
    key: dict[str, Any] = {"source": source_key, "modalities": modalities, "spacing": spacing}
    if clip is not None:  # absent when off: the caches built before the option keep their folder
        key["histogram_clip"] = clip.to_dict()
    cache_dir = cfg.cache_dir or cache_root() / "preprocessed" / cache_key(key)
    return DataSource(
        info=info,
        modalities=modalities,
        dataset_dir=dataset_dir,
        format=cfg.format,
        phantom=cfg.phantom if cfg.path is None else None,
        cache_dir=cache_dir,
        target_spacing=spacing,
        histogram_clip=clip,
    )


class MappedDataset(Dataset):
    """``dataset`` with ``transform(dataset.index, item)`` applied to each item (``set_epoch`` passed on)."""

    def __init__(self, dataset: Any, transform: Callable[[Any, dict], dict]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.dataset.index, self.dataset[i])

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def select_modalities(record: CaseRecord, modalities: tuple[str, ...]) -> CaseRecord:
    """``record`` with only the files of ``modalities``: a model trained on a subset never reads the others."""
    return dataclasses.replace(record, images={m: p for m, p in record.images.items() if m in modalities})


def prepare_cache(source: DataSource, *, progress: bool = False) -> Any:
    """Build (or reuse) the preprocessed cache of ``source``; returns the :class:`CacheIndex`."""
    from medmodal.data.cache import build_cache

    info, records = source.records()
    info = dataclasses.replace(info, modalities=source.modalities)
    records = [select_modalities(r, source.modalities) for r in records]
    return build_cache(records, info, source.cache_dir, target_spacing=source.target_spacing,
                       histogram_clip=source.histogram_clip, progress=progress)


def split_cases(case_ids: list[str], *, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of sorted ids (at least one case on each side)."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise DataError(f"need at least 2 labelled cases to split into training and validation, got {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def label_subset(case_ids: list[str], *, fraction: float, seed: int) -> list[str]:
    """The training cases kept at ``fraction`` of the labels: the first ``max(1, round(fraction * n))`` of a seeded
    permutation of the sorted ids, so the subsets of one seed are nested (10 % within 25 % within 50 %)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must lie in (0, 1], got {fraction}")
    ids = sorted(case_ids)
    if fraction == 1.0:
        return ids
    order = np.random.default_rng([seed, 1]).permutation(len(ids))  # independent of split_cases' draw
    keep = max(1, round(fraction * len(ids)))
    return sorted(ids[i] for i in order[:keep])


class CacheDataModule(L.LightningDataModule):
    """Patches from the cached training cases; whole validation cases.

    In multi-process training each rank takes its share of every global batch (``batch_size`` is the global
    batch; :class:`~medmodal.engine.distributed.RankShard`) and every ``W``-th validation case
    (:class:`~medmodal.engine.distributed.ValidationShard`), so an epoch has ``steps_per_epoch`` optimiser steps
    on any number of ranks.

    Args:
        source: the resolved data set.
        patch_size: training patch size, one entry per spatial axis.
        batch_size: patches per optimiser step, over all processes (a multiple of their number).
        steps_per_epoch: batches in one (virtual) epoch; validation runs after each.
        foreground_fraction: share of patches centred on foreground (nnU-Net: 1/3).
        num_workers: DataLoader workers.
        val_fraction: share of labelled cases held out for validation.
        label_fraction: share of the training cases that train (:func:`label_subset`; 1 = all).
        seed: split, sampling and augmentation seed.
        augmentation: the recipe's ``data.augmentation`` (``None`` or not ``enabled``: none).
        item_transform: a picklable ``(index, item) -> item`` applied to every training and validation item
            after sampling (a method's own intensity mapping, say); it receives the :class:`CacheIndex` the item
            came from, so it can read the whole case. ``None``: none.
    """

    def __init__(
        self,
        *,
        source: DataSource,
        patch_size: tuple[int, ...],
        batch_size: int,
        steps_per_epoch: int,
        foreground_fraction: float = 1 / 3,
        num_workers: int = 1,
        val_fraction: float = 0.2,
        label_fraction: float = 1.0,
        seed: int = 0,
        progress: bool = False,
        augmentation: AugmentationConfig | None = None,
        item_transform: Callable[[Any, dict], dict] | None = None,
    ) -> None:
        super().__init__()
        self.item_transform = item_transform
        self.source = source
        self.patch_size = tuple(patch_size)
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.foreground_fraction, self.num_workers = foreground_fraction, num_workers
        self.val_fraction, self.seed, self.progress = val_fraction, seed, progress
        self.label_fraction = label_fraction
        self.augmentation = augmentation
        self.index: Any = None
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []

    def prepare_data(self) -> None:
        prepare_cache(self.source, progress=self.progress)

    def setup(self, stage: str | None = None) -> None:
        from medmodal.data.cache import CacheIndex

        self.index = CacheIndex.load(self.source.cache_dir)
        labelled = [c.case_id for c in self.index.cases if "label" in c.paths]
        if len(labelled) < len(self.index.cases):
            log.info("%d unlabelled case(s) are not used for supervised training",
                     len(self.index.cases) - len(labelled))
        self.train_ids, self.val_ids = split_cases(labelled, val_fraction=self.val_fraction, seed=self.seed)
        if self.label_fraction < 1.0:
            n = len(self.train_ids)
            self.train_ids = label_subset(self.train_ids, fraction=self.label_fraction, seed=self.seed)
            log.info("data.label_fraction %.2f: %d of %d training cases train", self.label_fraction,
                     len(self.train_ids), n)
        if stage in (None, "fit"):
            augment = self._augment()
            cfg = self.augmentation
            log.info("augmentation of training patches: %s", "off" if augment is None else
                     f"preset {cfg.preset if cfg else '-'}: {augment.describe()}")

    def _augment(self) -> Any:
        """The :class:`~medmodal.transforms.augment.PatchAugmentation` of the recipe, or ``None``."""
        if self.augmentation is None or not self.augmentation.enabled:
            return None
        from medmodal.transforms.augment import PatchAugmentation

        augment = PatchAugmentation(spatial_dims=len(self.patch_size), patch_size=self.patch_size,
                                    **self.augmentation.transform_kwargs())
        return augment if augment.active else None

    @property
    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Any, batch_size: int, shuffle: bool) -> DataLoader:
        from medmodal.data.sampling import make_collate

        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=make_collate(self.source.modalities),
            persistent_workers=False,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        from medmodal.data.sampling import PatchDataset

        dataset = PatchDataset(
            index=self.index.subset(self.train_ids),
            patch_size=self.patch_size,
            samples_per_epoch=self.batch_size * self.steps_per_epoch,
            foreground_fraction=self.foreground_fraction,
            seed=self.seed,
            augment=self._augment(),
        )
        if self.item_transform is not None:
            dataset = MappedDataset(dataset, self.item_transform)
        rank, world = self._ranks
        shard = RankShard(dataset, rank=rank, world_size=world, batch_size=self.batch_size)
        return self._loader(shard, shard.local_batch, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        from medmodal.data.sampling import WholeCaseDataset

        rank, world = self._ranks
        cases: Any = WholeCaseDataset(index=self.index.subset(self.val_ids))
        if self.item_transform is not None:
            cases = MappedDataset(cases, self.item_transform)
        return self._loader(ValidationShard(cases, rank=rank, world_size=world), 1, shuffle=False)
