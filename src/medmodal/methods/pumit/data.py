"""PUMIT's data: an image collection, cropped to whole tokens.

The images come from one of two places (:func:`image_source`):

* ``method.collection`` (a folder of images or a collection manifest, ``medmodal.data.collections``): any mix of 2D
  and 3D images, formats and spacings, each image its own unit of the train/validation split;
* otherwise the recipe's data set: every modality of every case is one image, and cases, not images, are split,
  so the modalities of one case never straddle the split.

Each image is prepared once into a memory-mapped cache (RAS, the coarsest axis last, percentiles → [0, 1]), then
cut into crops of whole tokens and batched by degree of anisotropy and token grid
(``medmodal.data.collection_sampler``), so 2D and 3D images of any spacing train together without resampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from medmodal.data.collection_cache import CollectionIndex, build_collection_cache
from medmodal.data.collection_sampler import CollectionCrops, RankBatches, collate_crops
from medmodal.engine.images import ImageSource


class CollectionData(L.LightningDataModule):
    """Crops of whole tokens from the training cases' images; a fixed draw of crops from the validation cases'.

    Args:
        source: the images (:func:`image_source`); the collection cache lives in ``<source.cache_dir>/collection``.
        batch_size: crops per optimiser step over all processes (a multiple of their number).
        steps_per_epoch: global batches per (virtual) epoch; validation runs after each.
        token_grid: the largest crop in tokens; patch_size: voxels per token in-plane (the tokenizer's stride).
        channels: the channels of every crop (1: colour -> grey by BT.601; 3: grey replicated).
        val_fraction: share of cases held out; val_batches: global batches of validation crops.
        percentiles: the intensity mapping; seed: split and crop seed.
    """

    def __init__(self, *, source: ImageSource, batch_size: int, steps_per_epoch: int, token_grid: Sequence[int],
                 patch_size: int, channels: int = 1, val_fraction: float, val_batches: int,
                 percentiles: Sequence[float], seed: int, num_workers: int, progress: bool = False) -> None:
        super().__init__()
        self.source = source
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.token_grid, self.patch_size, self.channels = tuple(token_grid), patch_size, channels
        self.val_fraction, self.val_batches = val_fraction, val_batches
        self.percentiles, self.seed = tuple(percentiles), seed
        self.num_workers, self.progress = num_workers, progress
        self.index: CollectionIndex | None = None
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []

    def _build(self) -> CollectionIndex:
        return build_collection_cache(self.source.images(), self.source.cache_dir / "collection",
                                      percentiles=self.percentiles, progress=self.progress)

    def prepare_data(self) -> None:
        self._build()

    def setup(self, stage: str | None = None) -> None:
        from medmodal.engine.datamodule import split_cases

        if self.index is not None:
            return
        self.index = self._build()
        groups = sorted({self.source.group(im.image_id) for im in self.index.images})
        self.train_ids, self.val_ids = split_cases(groups, val_fraction=self.val_fraction, seed=self.seed)

    def subset(self, group_ids: Sequence[str]) -> CollectionIndex:
        """The collection's images of ``group_ids`` (cases, or images of a collection)."""
        assert self.index is not None
        keep, group = set(group_ids), self.source.group
        return dataclasses.replace(self.index, images=[im for im in self.index.images if group(im.image_id) in keep])

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, crops: CollectionCrops, *, workers: int) -> DataLoader:
        rank, world = self._ranks()
        return DataLoader(crops, batch_sampler=RankBatches(crops, rank=rank, world_size=world),
                          collate_fn=collate_crops, num_workers=workers)

    def train_dataloader(self) -> DataLoader:
        crops = CollectionCrops(index=self.subset(self.train_ids), batch_size=self.batch_size,
                                batches_per_epoch=self.steps_per_epoch, token_grid=self.token_grid,
                                patch_size=self.patch_size, channels=self.channels, seed=self.seed)
        return self._loader(crops, workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        crops = CollectionCrops(index=self.subset(self.val_ids), batch_size=self.batch_size,
                                batches_per_epoch=self.val_batches, token_grid=self.token_grid,
                                patch_size=self.patch_size, channels=self.channels,
                                seed=self.seed + 1)  # one fixed draw (epoch 0)
        return self._loader(crops, workers=0)


def describe(index: CollectionIndex) -> dict[str, Any]:
    """Counts per modality and degree of anisotropy (for the log and the report)."""
    out: dict[str, Any] = {}
    for im in index.images:
        key = f"{im.modality} DA {im.da}"
        out[key] = out.get(key, 0) + 1
    return out
