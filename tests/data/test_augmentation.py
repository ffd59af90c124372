"""Training-patch augmentation (spec shaspec.md §2.6): seeded per sample, image and label transformed together,
labels kept integer, off means identity, and a resumed run reaches the weights of the uninterrupted one."""

from __future__ import annotations

import os
import signal

import lightning as L
import numpy as np
import pytest
import torch

from medmodal.data.cache import CacheIndex, build_cache
from medmodal.data.case import Case, DatasetInfo, Volume
from medmodal.data.sampling import PatchDataset
from medmodal.engine.recipe import AugmentationConfig, RecipeError, recipe_from_dict
from medmodal.evaluation.metrics import binary_dice
from medmodal.transforms.augment import PatchAugmentation

INFO = DatasetInfo(name="tiny", modalities=("t1", "t1c", "t2", "flair"))
ALL_ON = AugmentationConfig(enabled=True)  # the nnunet_like preset


def _blob(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth off-centre bright ellipsoid in noise-free background; label 1 inside, 3 in its core."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(((g - 0.15 * (seed + 1) * (-1) ** k) / 0.55) ** 2 for k, g in enumerate(grid)))
    image = np.clip(2.0 - 2.0 * r, 0, None).astype(np.float32) + 1.0
    label = np.where(r < 0.5, 3, np.where(r < 1.0, 1, 0)).astype(np.uint8)
    return image, label


def make_cases(shapes: list[tuple[int, ...]]) -> list[Case]:
    cases = []
    for k, shape in enumerate(shapes):
        image, label = _blob(shape, k)
        present = ("t1", "t2") if k == 1 else INFO.modalities
        images = {m: Volume(image * (1 + 0.1 * j)) for j, m in enumerate(present)}
        cases.append(Case(f"c{k}", images, label=Volume(label)))
    return cases


@pytest.fixture(scope="module")
def index3d(tmp_path_factory: pytest.TempPathFactory) -> CacheIndex:
    return build_cache(make_cases([(17, 18, 19), (21, 17, 18)]), INFO, tmp_path_factory.mktemp("aug3d"))


@pytest.fixture(scope="module")
def index2d(tmp_path_factory: pytest.TempPathFactory) -> CacheIndex:
    return build_cache(make_cases([(33, 35), (31, 34)]), INFO, tmp_path_factory.mktemp("aug2d"))


def _augment(patch: tuple[int, ...], cfg: AugmentationConfig = ALL_ON, **probs: float) -> PatchAugmentation:
    kwargs = cfg.transform_kwargs()
    kwargs.update({f"{k}_prob": v for k, v in probs.items()})
    return PatchAugmentation(spatial_dims=len(patch), patch_size=patch, **kwargs)


def _dataset(index: CacheIndex, patch: tuple[int, ...], augment: PatchAugmentation | None, *, seed: int = 3,
             epoch: int = 0) -> PatchDataset:
    ds = PatchDataset(index=index, patch_size=patch, samples_per_epoch=8, seed=seed, augment=augment)
    ds.set_epoch(epoch)
    return ds


PATCHES = {"3d": (9, 10, 11), "2d": (17, 19)}


@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_same_seed_same_patches_other_epoch_other_patches(dims: str, request: pytest.FixtureRequest) -> None:
    index, patch = request.getfixturevalue(f"index{dims}"), PATCHES[dims]
    aug = _augment(patch, noise=1.0, affine=1.0)

    def images(**kw: int) -> list[torch.Tensor]:
        return [s["image"] for s in (_dataset(index, patch, aug, **kw)[i] for i in range(8))]

    first = images()
    assert all(a.shape == (4, *patch) for a in first)
    assert all(torch.equal(a, b) for a, b in zip(first, images(), strict=True))
    # reading items out of order, from a fresh copy of the transform, changes nothing (workers, resume)
    fresh = _dataset(index, patch, _augment(patch, noise=1.0, affine=1.0))
    assert torch.equal(fresh[5]["image"], first[5])
    assert not any(torch.equal(a, b) for a, b in zip(first, images(epoch=1), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, images(seed=4), strict=True))


@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_labels_keep_their_values_and_missing_channels_stay_zero(dims: str, request: pytest.FixtureRequest) -> None:
    index, patch = request.getfixturevalue(f"index{dims}"), PATCHES[dims]
    ds = _dataset(index, patch, _augment(patch, rescale=1.0, affine=1.0, elastic=1.0, noise=1.0, brightness=1.0))
    for i in range(8):
        s = ds[i]
        assert s["label"].dtype == torch.int64 and s["label"].shape == (1, *patch)
        assert set(s["label"].unique().tolist()) <= {0, 1, 3}
        missing = ~s["available"]
        assert not s["image"][missing].any()  # case c1 lacks t1c and flair: noise and brightness leave them 0
        assert s["image"][s["available"]].abs().sum() > 0


@pytest.mark.parametrize("shape", [(23, 25, 21), (41, 43)], ids=["3d", "2d"])
def test_image_and_label_share_the_spatial_transform(shape: tuple[int, ...]) -> None:
    """The label is a threshold of the image; after rotation + scaling + zoom + flips (+ elastic in 2D) the
    thresholded augmented image and the augmented label have the same centre (within half a voxel) and overlap.
    Nearest-neighbour zoom by a factor near 1 duplicates or drops whole slices, so the overlap of a small 3D blob
    is lower than the centre agreement."""
    from scipy.ndimage import center_of_mass

    image, _ = _blob(shape, 0)
    label = (image > 1.5).astype(np.uint8)
    patch = tuple(s - 4 for s in shape)
    elastic = 1.0 if len(shape) == 2 else 0.0
    aug = _augment(patch, AugmentationConfig(enabled=True, preset="none"), rescale=1.0, affine=1.0, flip=1.0,
                   elastic=elastic)
    crop = tuple(slice((r - p) // 2, (r - p) // 2 + p) for r, p in zip(aug.input_size, patch, strict=True))
    pad = [((r - s) // 2, r - s - (r - s) // 2) for r, s in zip(aug.input_size, shape, strict=True)]
    wide, wide_label = np.pad(image, pad)[None], np.pad(label, pad)
    moved = 0
    for seed in range(4):
        out, seg = aug(wide, wide_label, available=np.array([True]), seed=seed)
        assert seg is not None and seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1}
        assert binary_dice(out[0] > 1.5, seg) > (0.9 if len(shape) == 2 else 0.75)
        np.testing.assert_allclose(center_of_mass(seg), center_of_mass(out[0] > 1.5), atol=0.5)
        moved += binary_dice(seg, wide_label[crop]) < 0.97  # the transform did move the label
    assert moved >= 3


def test_disabled_is_the_identity(index3d: CacheIndex) -> None:
    patch = PATCHES["3d"]
    plain = _dataset(index3d, patch, None)
    off = _augment(patch, AugmentationConfig(enabled=False))
    assert not off.active and off.input_size == patch and off.describe() == "none"
    crop_only = _dataset(index3d, patch, off)
    for i in range(8):
        a, b = plain[i], crop_only[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # augmentation draws from its own stream: the patch positions are those of the plain data set
    on = _dataset(index3d, patch, _augment(patch, AugmentationConfig(enabled=True, preset="none"), noise=1.0))
    for i in range(8):
        a, b = plain[i], on[i]
        assert torch.equal(a["label"], b["label"]) and not torch.equal(a["image"], b["image"])


def test_recipe_section_presets_record_and_typos() -> None:
    r = recipe_from_dict({"data": {"augmentation": {"enabled": True, "noise": {"prob": 0.5}}}})
    aug = r.data.augmentation
    assert aug.noise.prob == 0.5 and aug.affine.prob == 0.2 and aug.elastic.prob == 0.0  # preset nnunet_like
    again = recipe_from_dict(r.model_dump(mode="json"))  # the resolved recipe records every value
    assert again.data.augmentation == aug
    kw = aug.transform_kwargs()
    assert kw["noise_prob"] == 0.5 and kw["scale_range"] == (0.85, 1.25) and kw["rotate_degrees"] == 15.0
    none = AugmentationConfig(enabled=True, preset="none", gamma={"prob": 0.3})
    assert [k for k, v in none.transform_kwargs().items() if k.endswith("_prob") and v] == ["gamma_prob"]
    assert all(v == 0 for k, v in AugmentationConfig().transform_kwargs().items() if k.endswith("_prob"))
    line = _augment((16, 16, 16)).describe()
    assert line.startswith("rescale p=0.5 (zoom 0.9-1.1); affine p=0.2 (rotate ±15°, scale 0.85-1.25)")
    assert "elastic" not in line and "gamma p=0.15" in line
    with pytest.raises(RecipeError, match=r"data\.augmentation\.gama: unknown field"):
        recipe_from_dict({"data": {"augmentation": {"gama": {"prob": 0.1}}}})
    with pytest.raises(RecipeError, match=r"data\.augmentation\.affine\.scale: .*low <= high"):
        recipe_from_dict({"data": {"augmentation": {"affine": {"scale": [1.2, 0.8]}}}})
    with pytest.raises(RecipeError, match=r"data\.augmentation\.flip\.prob"):
        recipe_from_dict({"data": {"augmentation": {"flip": {"prob": 1.5}}}})


class _Crash(L.Callback):
    """Ctrl-C once training reaches ``at`` steps."""

    def __init__(self, at: int) -> None:
        self.at, self.sent = at, False

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_augmented_run_logs_it_and_resumes_exactly(tmp_path) -> None:
    from safetensors.torch import load_file

    from medmodal.engine.cases import tiny_case_recipe
    from medmodal.engine.run import RunError
    from medmodal.engine.train import train

    d = tiny_case_recipe(2, method={"name": "zero_fill"}, augmentation={"enabled": True})
    d["train"].update(max_steps=5, checkpoint_every_steps=2)  # an epoch is 3 steps: resumes mid-epoch
    whole = train(recipe_from_dict(d), tmp_path / "whole")
    log = (whole / "log.txt").read_text(encoding="utf-8")
    assert "augmentation of training patches: preset nnunet_like: rescale p=0.5" in log
    with pytest.raises(RunError, match="interrupted at step 4"):
        train(recipe_from_dict(d), tmp_path / "cut", callbacks=[_Crash(at=4)])
    cut = train(None, tmp_path / "cut", resume=True)
    a, b = (load_file(str(r / "weights" / "model.safetensors")) for r in (whole, cut))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    d["data"]["augmentation"] = {"enabled": False}
    plain = load_file(str(train(recipe_from_dict(d), tmp_path / "plain") / "weights" / "model.safetensors"))
    assert any(not torch.allclose(a[k], plain[k]) for k in a)  # the augmentation did change the training
