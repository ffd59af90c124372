"""Patch sampling: exact shapes, foreground oversampling, determinism, epochs, DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medmodal.data.cache import CacheIndex, build_cache
from medmodal.data.case import Batch, Case, DatasetInfo, Volume
from medmodal.data.sampling import PatchDataset, WholeCaseDataset, make_collate

INFO = DatasetInfo(name="tiny", modalities=("t1", "t1c", "t2", "flair"))


def make_cases(shapes: list[tuple[int, ...]]) -> list[Case]:
    """Cases filled with noise (no background, so no crop) and a small foreground cube of classes 2 and 4."""
    cases = []
    for k, shape in enumerate(shapes):
        rng = np.random.default_rng(k)
        label = np.zeros(shape, np.uint8)
        corner = tuple(slice(2 * s // 3, 2 * s // 3 + 3) for s in shape)
        label[corner] = 2
        label[tuple(slice(c.start, c.start + 1) for c in corner)] = 4
        present = ("t1", "t2") if k == 1 else INFO.modalities
        images = {m: Volume(rng.uniform(1, 2, shape).astype(np.float32)) for m in present}
        cases.append(Case(f"c{k}", images, label=Volume(label), target=k))
    return cases


@pytest.fixture(scope="module")
def index3d(tmp_path_factory: pytest.TempPathFactory) -> CacheIndex:
    root = tmp_path_factory.mktemp("cache3d")
    return build_cache(make_cases([(17, 18, 19), (21, 17, 18), (9, 11, 10)]), INFO, root)


@pytest.fixture(scope="module")
def index2d(tmp_path_factory: pytest.TempPathFactory) -> CacheIndex:
    root = tmp_path_factory.mktemp("cache2d")
    return build_cache(make_cases([(21, 23), (19, 22)]), INFO, root)


def draws(ds: PatchDataset, n: int) -> list[dict]:
    return [ds[i] for i in range(n)]


@pytest.mark.parametrize("patch", [(8, 9, 7), (24, 12, 30)], ids=["inside", "larger_than_cases"])
def test_patch_shapes_and_contents_3d(index3d: CacheIndex, patch: tuple[int, ...]) -> None:
    ds = PatchDataset(index=index3d, patch_size=patch, samples_per_epoch=30, seed=1)
    assert len(ds) == 30
    for s in draws(ds, 30):
        assert s["image"].shape == (4, *patch) and s["image"].dtype == torch.float32
        assert s["label"].shape == (1, *patch) and s["label"].dtype == torch.long
        assert s["available"].dtype == torch.bool and s["available"].shape == (4,)
        assert not s["image"][~s["available"]].any()  # missing modalities are zeros
        assert s["target"] == int(s["case_id"][1:])
        if patch[0] > 21:  # padding is zeros, a z-scored case never is
            assert (s["image"][s["available"]] == 0).any() and (s["image"][s["available"]] != 0).any()


def test_patch_shapes_2d(index2d: CacheIndex) -> None:
    for patch in [(8, 9), (25, 30), (7, 40)]:
        ds = PatchDataset(index=index2d, patch_size=patch, samples_per_epoch=10)
        for s in draws(ds, 10):
            assert s["image"].shape == (4, *patch) and s["label"].shape == (1, *patch)
    with pytest.raises(ValueError, match="patch_size"):
        PatchDataset(index=index2d, patch_size=(8, 8, 8), samples_per_epoch=1)


@pytest.mark.parametrize("fraction", [0.0, 1 / 3, 1.0])
def test_foreground_oversampling(index3d: CacheIndex, fraction: float) -> None:
    ds = PatchDataset(
        index=index3d.subset(["c0", "c1"]),
        patch_size=(4, 4, 4),
        samples_per_epoch=300,
        foreground_fraction=fraction,
        seed=3,
    )
    hit = np.mean([bool(s["label"].any()) for s in draws(ds, 300)])
    if fraction == 1.0:
        assert hit == 1.0
    elif fraction == 0.0:
        assert hit < 0.15  # a 3^3 cube in a ~18^3 case: ~6% of 4^3 patches by chance
    else:
        assert hit >= fraction - 0.06  # 300 draws: the binomial sd is ~0.027
        assert hit < fraction + 0.2


def test_deterministic_by_seed_and_different_across_epochs(index3d: CacheIndex) -> None:
    def run(seed: int, epoch: int) -> list[dict]:
        ds = PatchDataset(index=index3d, patch_size=(8, 8, 8), samples_per_epoch=12, seed=seed)
        ds.set_epoch(epoch)
        return draws(ds, 12)

    def same(a: list[dict], b: list[dict]) -> bool:
        pairs = zip(a, b, strict=True)
        return all(x["case_id"] == y["case_id"] and torch.equal(x["image"], y["image"]) for x, y in pairs)

    assert same(run(0, 0), run(0, 0))
    assert not same(run(0, 0), run(1, 0))
    assert not same(run(0, 0), run(0, 1))


def test_dataloader_with_workers(index3d: CacheIndex) -> None:
    ds = PatchDataset(index=index3d, patch_size=(8, 9, 7), samples_per_epoch=8, seed=5)
    ds[0]  # memory maps opened here must not travel to the workers
    assert len(pickle.dumps(ds)) < 50_000
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=make_collate(INFO.modalities))
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        assert isinstance(b, Batch) and b.image.shape == (4, 4, 8, 9, 7) and b.available.shape == (4, 4)
        assert b.label.shape == (4, 1, 8, 9, 7) and b.target.shape == (4,) and len(b.case_id) == 4
    serial = [ds[i] for i in range(8)]
    assert torch.equal(torch.cat([b.image for b in batches]), torch.stack([s["image"] for s in serial]))


def test_whole_case_dataset(index3d: CacheIndex, tmp_path: Path) -> None:
    ds = WholeCaseDataset(index=index3d)
    assert len(ds) == 3
    for k, s in enumerate(ds):
        case = index3d.cases[k]
        assert s["case_id"] == case.case_id and s["image"].shape == (4, *case.shape)
        assert s["label"].shape == (1, *case.shape)
        np.testing.assert_array_equal(s["image"].numpy(), case.image())
        np.testing.assert_array_equal(s["available"].numpy(), case.available)
    batch = make_collate(INFO.modalities)([ds[0]])
    assert batch.image.shape == (1, 4, *index3d.cases[0].shape)
