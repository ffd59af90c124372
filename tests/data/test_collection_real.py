"""Real images that PyPI packages ship (``benchmarks/real_images.py``) as an image collection: their DA, channels,
intensity mapping and token crops at the tiny PUMIT recipe's token size. Skipped when the wheels can be neither
found in the cache nor downloaded. Real images, 10 of them: a smoke test, not a benchmark."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from medmodal.data.collection_cache import build_collection_cache
from medmodal.data.collection_sampler import CollectionCrops, token_size
from medmodal.data.collections import MAX_DA, degree_of_anisotropy, list_collection, read_collection_manifest


def tiny_patch_size() -> int:
    """The in-plane token size of the tiny PUMIT tokenizer recipe (its network's stride)."""
    from medmodal.engine.recipe import builtin_recipe_path
    from medmodal.networks.pumit_tokenizer import PUMITTokenizer

    recipe = yaml.safe_load(builtin_recipe_path("pumit_tokenizer_tiny").read_text(encoding="utf-8"))
    return PUMITTokenizer(**recipe["model"]["kwargs"]).stride


@pytest.fixture(scope="module")
def real(real_images, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    dest = tmp_path_factory.mktemp("real")
    handler = logging.Handler()
    reasons: list[str] = []
    handler.emit = lambda record: reasons.append(record.getMessage())  # type: ignore[method-assign]
    real_images.log.addHandler(handler)
    try:
        images = real_images.fetch_real_images(dest)  # the default wheel cache: a second run needs no network
    finally:
        real_images.log.removeHandler(handler)
    if not images:
        pytest.skip("no real image could be fetched (pip download impossible and no wheel in "
                    f"{real_images.DEFAULT_CACHE}): " + "; ".join(reasons))
    return dest, images


def test_real_images_collection(real_images, real: tuple[Path, list], tmp_path: Path) -> None:
    dest, images = real
    records = read_collection_manifest(dest / real_images.MANIFEST)
    assert [r.path for r in records] == [im.path for im in images]
    assert {r.image_id for r in list_collection(dest)} == {r.image_id for r in records}  # the folder is one too
    index = build_collection_cache(records, tmp_path / "cache")
    by_name = {im.source.name: im for im in index}
    expected_da = {  # computed from the spacing in the header, coarsest axis last
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz": (degree_of_anisotropy((1.0, 1.0, 1.0)), (1.0, 1.0, 1.0)),
        "aniso_vox.nii.gz": (min(max(math.floor(math.log2(5.0 / 4.0)), 0), MAX_DA), (4.0, 4.0, 5.0)),
    }
    assert expected_da["aniso_vox.nii.gz"][0] == 0  # 5 / 4 mm: log2(1.25) = 0.32, floor 0
    for name, (da, spacing) in expected_da.items():
        if name in by_name:
            im = by_name[name]
            assert im.spatial_dims == 3 and im.da == da and im.channels == 1
            assert im.spacing == pytest.approx(spacing, abs=1e-4)
    if "aniso_vox.nii.gz" in by_name:
        assert by_name["aniso_vox.nii.gz"].shape == (58, 58, 24)
    if "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz" in by_name:
        assert sorted(by_name["mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"].shape) == [189, 197, 233]
    colour = {"histo.jpg", "ihc.png", "retina.jpg"}
    for im in index:
        if im.spatial_dims == 2:
            assert im.da == MAX_DA and im.shape[2] == 1  # X-rays, histology, microscopy, fundus: 2D
        assert im.channels == (3 if im.source.name in colour else 1), im.source.name
        data = np.asarray(im.data(), dtype=np.float32)
        # the 0.5 / 99.5 percentiles of every image map to [0, 1]: both ends are reached, nothing outside
        assert data.min() == 0.0 and data.max() == 1.0, im.source.name
    if "histo.jpg" in by_name:  # H&E: the channels are distinct (pink/purple stain), not a grey picture
        he = np.asarray(by_name["histo.jpg"].data(), dtype=np.float32)
        means = he.reshape(3, -1).mean(axis=1)
        assert min(abs(means[0] - means[1]), abs(means[1] - means[2]), abs(means[0] - means[2])) > 0.01
        assert float(np.abs(he[0] - he[1]).mean()) > 0.05

    patch = tiny_patch_size()
    assert patch == 8  # stem 2, three widths: stride 2 * 2 * 2
    for im in index:  # a crop of whole tokens from every image, in RGB (the spec's input) and in grey
        one = dataclasses.replace(index, images=[im])
        for channels in (1, 3):
            crops = CollectionCrops(index=one, batch_size=1, batches_per_epoch=1, token_grid=(4, 4, 4),
                                    patch_size=patch, channels=channels)
            item = crops[0]
            t = token_size(im.da, patch_size=patch)
            assert item["image"].shape == (channels, *(n * s for n, s in zip(item["tokens"], t, strict=True)))
            assert all(n >= 1 for n in item["tokens"]) and bool(item["valid"].all())  # large enough: no padding
            if channels == 3 and im.channels == 1:
                assert bool((item["image"][0] == item["image"][2]).all())
