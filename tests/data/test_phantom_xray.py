"""The chest X-ray phantom (MultiMix's embedded data): determinism, masks, opacities, sources, the written data
set, and the recipe/engine hooks that make it the default data of a recipe."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medmodal.data import phantom_xray
from medmodal.data.case import DataError
from medmodal.data.formats import open_dataset
from medmodal.data.io import read_case
from medmodal.data.phantom_xray import (
    CHEST_CLASSES,
    CHEST_FOV_MM,
    CHEST_SOURCES,
    chest_phantom_info,
    chest_phantom_layers,
    chest_source_names,
    generate_chest_cases,
    make_chest_case,
    read_chest_phantom_parameters,
    write_chest_phantom,
)
from medmodal.engine.recipe import PhantomConfig, RecipeError, recipe_from_dict

SIZE = 33


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_byte_identical_files_and_a_case_depends_on_seed_and_index_only(tmp_path):
    a = write_chest_phantom(tmp_path / "a", cases=6, seed=5, size=SIZE, sources=3)
    b = write_chest_phantom(tmp_path / "b", cases=6, seed=5, size=SIZE, sources=3)
    files = _files(a)
    assert files == _files(b)
    assert len([f for f in files if f.startswith("images/")]) == 6 == len([f for f in files if f.startswith("masks/")])
    c = write_chest_phantom(tmp_path / "c", cases=6, seed=6, size=SIZE, sources=3)
    assert _files(c)["images/chest_000.png"] != files["images/chest_000.png"]
    # case i does not depend on how many cases are generated
    few = list(generate_chest_cases(cases=2, seed=5, size=SIZE))
    many = list(generate_chest_cases(cases=5, seed=5, size=SIZE))
    for x, y in zip(few, many, strict=False):
        np.testing.assert_array_equal(x.images["xray"].array, y.images["xray"].array)
        np.testing.assert_array_equal(x.label.array, y.label.array)


def test_mask_is_exactly_the_lungs_and_the_opacity_lies_inside_it_for_class_1_only():
    targets = []
    for seed in range(12):
        for source in ("A", "B", "C"):
            case = make_chest_case(case_id="c", seed=seed, size=SIZE, source=source)
            layers = chest_phantom_layers(seed=seed, size=SIZE, source=source)
            mask = case.label.array
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
            np.testing.assert_array_equal(mask.astype(bool), layers.lungs)
            np.testing.assert_array_equal(layers.lungs, layers.lung_depth > 0)
            # two lungs (the heart may cut off a lung's lower tip): together 5-25 % of the picture
            parts, n = ndimage.label(mask)
            sizes = sorted(np.bincount(parts.ravel())[1:], reverse=True)
            assert n >= 2 and sum(sizes[:2]) > 0.9 * mask.sum() and 0.05 < mask.mean() < 0.25
            if case.target == 1:
                assert layers.opacity.max() > 0.02 and not np.any(layers.opacity[mask == 0])
            else:
                assert not np.any(layers.opacity)
        targets.append(case.target)
    assert set(targets) == {0, 1}


def test_both_classes_of_a_seed_differ_by_the_opacity_alone():
    for seed in range(4):
        normal = chest_phantom_layers(seed=seed, size=SIZE, target=0)
        opacity = chest_phantom_layers(seed=seed, size=SIZE, target=1)
        np.testing.assert_array_equal(normal.lungs, opacity.lungs)
        np.testing.assert_allclose(opacity.attenuation - normal.attenuation, opacity.opacity, atol=1e-6)
        a = make_chest_case(case_id="a", seed=seed, size=SIZE, target=0).images["xray"].array
        b = make_chest_case(case_id="b", seed=seed, size=SIZE, target=1).images["xray"].array
        brighter = (b - a) > 0.01 * 65535  # the same noise and bias: only the opacity differs
        assert brighter.sum() >= 0.5 * (opacity.opacity > 0.01).sum() > 0
        assert not np.any((b - a)[~ndimage.binary_dilation(opacity.lungs)])
    with pytest.raises(ValueError, match="target must be 0"):
        make_chest_case(case_id="x", seed=0, target=2)


def test_classes_are_balanced_and_the_opacity_contrast_varies_down_to_faint():
    amplitudes = [chest_phantom_layers(seed=s, size=SIZE, target=1).opacity.max() for s in range(40)]
    assert min(amplitudes) < 0.6 and max(amplitudes) > 1.2  # a 3-fold range: the faint ones make it not trivial
    targets = [c.target for c in generate_chest_cases(cases=200, seed=0, size=16)]
    assert 0.4 < np.mean(targets) < 0.6


def test_lungs_are_dark_but_not_a_threshold():
    """Lungs are darker than the soft tissue around them, yet even the best grey threshold per image, applied
    inside the (true) body outline, recovers the mask with Dice < 0.9 (it gets 0.58-0.84 at 33 and 64 pixels)."""
    for source in ("A", "B", "C"):
        for seed in range(6):
            case = make_chest_case(case_id="c", seed=seed, size=SIZE, source=source, target=0)
            layers = chest_phantom_layers(seed=seed, size=SIZE, source=source, target=0)
            image, mask = case.images["xray"].array, case.label.array.astype(bool)
            ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
            assert image[mask].mean() < image[ring].mean()
            body = ndimage.binary_fill_holes(ndimage.binary_erosion(layers.attenuation > 0.2) | mask)
            best = 0.0
            for t in np.unique(np.percentile(image[body], np.arange(2, 80))):
                pred = (image <= t) & body
                best = max(best, 2 * (pred & mask).sum() / (pred.sum() + mask.sum()))
            assert 0.4 < best < 0.9, (source, seed, best)


def test_sources_differ_in_the_stated_resolution_noise_bias_and_mapping(monkeypatch):
    shapes = {s: make_chest_case(case_id="c", seed=1, size=SIZE, source=s).images["xray"].shape for s in "ABC"}
    assert shapes == {"A": (33, 33), "B": (50, 50), "C": (25, 25)}
    for s in "ABC":
        spacing = make_chest_case(case_id="c", seed=1, size=SIZE, source=s).images["xray"].spacing
        assert spacing == pytest.approx((CHEST_FOV_MM / shapes[s][0],) * 2)  # the same field of view
    quiet = {n: dataclasses.replace(p, noise=0.0, bias=0.0) for n, p in CHEST_SOURCES.items()}
    unbiased = {n: dataclasses.replace(p, bias=0.0) for n, p in CHEST_SOURCES.items()}
    for name in "ABC":
        profile = CHEST_SOURCES[name]
        real = make_chest_case(case_id="c", seed=2, size=64, source=name, target=0).images["xray"].array
        monkeypatch.setattr(phantom_xray, "CHEST_SOURCES", {**CHEST_SOURCES, name: unbiased[name]})
        no_bias = make_chest_case(case_id="c", seed=2, size=64, source=name, target=0).images["xray"].array
        monkeypatch.setattr(phantom_xray, "CHEST_SOURCES", {**CHEST_SOURCES, name: quiet[name]})
        clean = make_chest_case(case_id="c", seed=2, size=64, source=name, target=0)
        monkeypatch.undo()
        image = clean.images["xray"].array
        inside = (image > 0.1 * 65535) & (image < 0.9 * 65535)  # away from clipping
        noise = (no_bias - image)[inside] / 65535
        assert np.std(noise) == pytest.approx(profile.noise, rel=0.12), name
        bias = (real - no_bias)[inside] / 65535
        assert profile.bias * 0.4 < np.abs(bias).max() <= profile.bias + 0.2, name  # plus noise differences
        # the mapping offset + contrast * a ** gamma of the (blurred) attenuation
        layers = chest_phantom_layers(seed=2, size=64, source=name, target=0)
        expected = np.clip(profile.offset + profile.contrast * np.clip(layers.attenuation, 0, None) ** profile.gamma,
                           0, 1)
        assert np.median(np.abs(image / 65535 - expected)) < 0.01, name
    # measured on real images: B is brighter than A (offset, gamma < 1), C noisier than A
    stats = {}
    for name in "ABC":
        images = [make_chest_case(case_id="c", seed=s, size=SIZE, source=name).images["xray"].array / 65535
                  for s in range(8)]
        hf = [np.std(im - ndimage.uniform_filter(im, 3)) for im in images]
        stats[name] = (np.mean([im.mean() for im in images]), np.mean(hf))
    assert stats["B"][0] > stats["A"][0] + 0.05
    assert stats["C"][1] > 1.5 * stats["A"][1]


def test_source_names():
    assert chest_source_names(3) == ("A", "B", "C") and chest_source_names(["C", "A"]) == ("C", "A")
    with pytest.raises(DataError, match="not a count from 1 to 6"):
        chest_source_names(7)
    with pytest.raises(DataError, match=r"give distinct names from \['A'"):
        chest_source_names(["A", "Z"])


def test_written_data_set_reads_back_as_the_generated_cases(tmp_path):
    root = write_chest_phantom(tmp_path / "chest", cases=5, seed=3, size=SIZE, sources=["A", "C"])
    assert (root / "manifest.csv").read_text().splitlines()[0] == "case_id,xray,label,target,source"
    side = json.loads((root / "medmodal.json").read_text())
    assert side == {"name": "medmodal-chest-phantom", "modalities": ["xray"], "labels": [0, 1],
                    "regions": {"lung": [1]}, "synthetic": True, "classes": ["normal", "opacity"]}
    readme = (root / "README.txt").read_text()
    assert "SYNTHETIC PHANTOM" in readme and "  C       0.02    0.95      1.50   0.20   0.050  25      16.00" in readme
    assert read_chest_phantom_parameters(root) == {"version": phantom_xray.CHEST_PHANTOM_VERSION, "cases": 5,
                                                   "seed": 3, "size": SIZE,
                                                   "sources": ["A", "C"]}
    with Image.open(root / "images" / "chest_000.png") as im:
        assert im.mode.startswith("I;16") and im.size == (33, 33)
    info, records = open_dataset(root)
    assert info == chest_phantom_info()
    assert [r.source for r in records] == ["A", "C", "A", "C", "A"]
    for record, case in zip(records, generate_chest_cases(cases=5, seed=3, size=SIZE, sources=["A", "C"]),
                            strict=True):
        got = read_case(record, info)
        np.testing.assert_array_equal(got.images["xray"].array, case.images["xray"].array)
        np.testing.assert_array_equal(got.label.array, case.label.array)
        assert (got.target, got.source, got.case_id) == (case.target, case.source, case.case_id)
    assert CHEST_CLASSES[records[0].target] in (root / "manifest.csv").read_text().splitlines()[1]


def test_writing_is_atomic_and_refuses_a_non_empty_folder(tmp_path, monkeypatch):
    out = tmp_path / "chest"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        write_chest_phantom(out, cases=2, size=16)
    calls = []

    def failing(**kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return make(**kwargs)

    make = phantom_xray.make_chest_case
    monkeypatch.setattr(phantom_xray, "make_chest_case", failing)
    with pytest.raises(RuntimeError):
        write_chest_phantom(tmp_path / "new", cases=3, size=16)
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["chest"]


# -- the recipe and engine hooks ------------------------------------------------------------------------------
@pytest.mark.parametrize(("phantom", "message"), [
    ({"kind": "chest_xray"},
     "data.phantom: spatial_dims: the chest_xray phantom is 2D; set data.phantom.spatial_dims: 2"),
    ({"kind": "chest_xray", "spatial_dims": 2, "missing_rate": 0.2}, "data.phantom: missing_rate: .*set "
     "data.phantom.missing_rate: 0"),
    ({"kind": "chest_xray", "spatial_dims": 2, "spacing": [1, 1]}, "spacing: each chest_xray source has its own"),
    ({"kind": "chest_xray", "spatial_dims": 2, "size": [32, 32]}, "size: the chest_xray phantom takes one size"),
    ({"kind": "chest_xray", "spatial_dims": 2, "sources": 9}, "sources: the chest_xray phantom has 6 sources"),
    ({"kind": "chest_xray", "spatial_dims": 2, "sources": 1}, "sources: Input should be greater than or equal to 2"),
    ({"sources": 4}, "sources: only the chest_xray phantom has sources"),
    ({"kind": "lung"}, "data.phantom.kind: Input should be 'brain' or 'chest_xray'"),
])
def test_recipe_validates_the_phantom_kind(phantom, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"data": {"phantom": phantom, "patch_size": [32, 32]}}, where="r.yaml")


def test_recipe_on_the_chest_phantom_is_2d_and_the_brain_cache_folder_is_unchanged(tmp_path, monkeypatch):
    from medmodal.engine import datamodule

    monkeypatch.setenv("MEDMODAL_CACHE", str(tmp_path / "cache"))
    recipe = recipe_from_dict({"data": {"phantom": {"kind": "chest_xray", "spatial_dims": 2, "size": 16,
                                                    "cases": 4}, "patch_size": [16, 16]}})
    assert recipe.spatial_dims == 2
    brain = PhantomConfig()
    old_key = {"cases": 40, "spatial_dims": 3, "size": 64, "spacing": None, "seed": 0, "missing_rate": 0.0}
    assert datamodule.phantom_dir(brain).name == f"3d-40c-{datamodule.cache_key(old_key)}"
    assert datamodule.phantom_dir(recipe.data.phantom).name.startswith("xray2d-4c-")
    source = datamodule.resolve_source(recipe.data)
    assert source.info == chest_phantom_info() and source.modalities == ("xray",)
    old_source = datamodule.resolve_source(recipe_from_dict({}).data)
    assert old_source.cache_dir.name == datamodule.cache_key({"source": old_key, "modalities": ("t1", "t1c", "t2",
                                                                                            "flair"), "spacing": None})
    info, records = source.records()
    assert info == chest_phantom_info() and len(records) == 4
    assert [r.source for r in records] == ["A", "B", "C", "A"]
    root = datamodule.phantom_dir(recipe.data.phantom)
    assert (root / ".complete").is_file() and (root / "manifest.csv").is_file()
    assert read_case(records[1], info).images["xray"].shape == (24, 24)  # source B: 1.5 x 16
