"""The mixed phantom collection of ``benchmarks/real_images.py``: 2D and 3D images at several spacings, generated
on their own grids, read back with the spacing and DA each grid implies, and batched one bucket at a time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medmodal.data.collection_cache import build_collection_cache
from medmodal.data.collection_sampler import CollectionCrops, collate_crops
from medmodal.data.collections import MAX_DA, read_collection_manifest
from medmodal.data.phantom_xray import CHEST_FOV_MM, CHEST_SOURCES


def test_mixed_phantom_collection(real_images, tmp_path: Path) -> None:
    images = real_images.write_mixed_phantom(tmp_path / "phantom", cases=2, xray_size=64)
    records = read_collection_manifest(tmp_path / "phantom" / real_images.MANIFEST)
    assert [r.path for r in records] == [im.path for im in images] and len(records) == 10
    index = build_collection_cache(records, tmp_path / "cache")
    grids = {name: (shape, spacing) for name, _, shape, spacing, _ in real_images.PHANTOM_GRIDS}
    for im in index:
        name = Path(im.image_id).name.split("_")[0]
        if name == "chest":  # 16-bit PNG: the pixel size comes from the manifest (400 mm field of view)
            source = "AC"[int(im.image_id[-5])]
            pixels = CHEST_SOURCES[source].pixels(64)
            assert im.shape == (pixels, pixels, 1) and im.da == MAX_DA
            assert im.spacing[:2] == pytest.approx((CHEST_FOV_MM / pixels,) * 2)
            continue
        shape, spacing = grids[name]
        assert im.shape == (*shape, 1)[:3] and im.spacing[: len(spacing)] == pytest.approx(spacing)
        # the DA from the grid's spacing: floor(log2(s_z / s_x)) in 3D (1 mm: 0, 6.5 / 0.8: 3, 1 / 0.6: 0), 2D: 5
        da = MAX_DA if len(spacing) == 2 else min(max(math.floor(math.log2(spacing[2] / spacing[0])), 0), MAX_DA)
        assert im.da == da
    assert sorted({im.da for im in index}) == [0, 3, 5]
    crops = CollectionCrops(index=index, batch_size=2, batches_per_epoch=12, token_grid=(4, 4, 4), patch_size=8,
                            channels=3)
    buckets = set()
    for j in range(crops.batches_per_epoch):
        batch = collate_crops([crops[2 * j], crops[2 * j + 1]])
        assert batch["image"].shape[:2] == (2, 3)
        buckets.add((batch["da"], batch["tokens"]))
        assert np.isfinite(batch["image"].numpy()).all()
    assert len(buckets) >= 3  # several (DA, token grid) buckets, one per batch
