"""Image collections: listing by folder and manifest, preparation (orientation, slice axis last, percentile and
8-bit mapping, spacing and DA), the memory-mapped cache and its invalidation, problems naming the file, and the
bucketed crop sampler (one DA and token grid per batch, whole tokens, bounded padding, weights, seeds, ranks)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from torch.utils.data import DataLoader

from medmodal.data.case import DataError, Volume
from medmodal.data.collection_cache import CachedImage, CollectionIndex, build_collection_cache
from medmodal.data.collection_sampler import (
    CollectionCrops,
    RankBatches,
    collate_crops,
    crop_tokens,
    token_size,
)
from medmodal.data.collections import (
    check_collection,
    degree_of_anisotropy,
    list_collection,
    list_folder,
    percentile_scale,
    prepare_image,
)
from medmodal.data.io import DataErrors, write_image

# ------------------------------------------------------------------------------------------------------ fixtures


def nifti(path: Path, shape: tuple[int, ...], spacing: tuple[float, ...], *, seed: int = 0,
          affine: np.ndarray | None = None) -> np.ndarray:
    array = np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0]) if affine is None else affine), path)
    return array


def dicom_series(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 *, uid: str = "1.2.826.0.1.3680043.2.1125.9") -> None:
    """An axial series, one ``.dcm`` per slice (SimpleITK writes position and orientation tags)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    rng = np.random.default_rng(3)
    for k in range(shape[2]):
        image = sitk.GetImageFromArray(rng.integers(0, 1000, size=(1, shape[1], shape[0])).astype(np.int16))
        image.SetSpacing(spacing)
        image.SetOrigin((0.0, 0.0, k * spacing[2]))
        for key, value in {"0008|0060": "CT", "0020|000d": f"{uid}.1", "0020|000e": uid,
                           "0008|0018": f"{uid}.3.{k}", "0020|0013": str(k + 1)}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(image)


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """A mixed folder: thick MR (DA 3), thin CT (DA 0), a PNG X-ray (2D), NRRD, MHA, a DICOM series, a top image."""
    root = tmp_path / "images"
    nifti(root / "MR" / "thick.nii.gz", (37, 35, 9), (0.8, 0.8, 6.5))
    nifti(root / "CT" / "thin.nii.gz", (33, 34, 35), (0.6, 0.6, 1.0), seed=1)
    (root / "xray").mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(45, 41), dtype=np.uint8)).save(
        root / "xray" / "chest.png")
    affine = np.diag([0.9, 0.9, 2.0, 1.0])
    write_image(Volume(np.random.default_rng(4).normal(size=(19, 21, 17)).astype(np.float32), affine),
                root / "MR" / "sub" / "flair.nrrd")
    write_image(Volume(np.random.default_rng(5).normal(size=(23, 17, 18)).astype(np.float32), affine),
                root / "CT" / "other.mha")
    dicom_series(root / "CT" / "patient1" / "series", (20, 18, 5), (0.5, 0.5, 3.0))
    nifti(root / "top.nii.gz", (17, 18, 19), (1.0, 1.0, 1.0), seed=6)
    (root / "notes.txt").write_text("not an image")
    return root


EXPECTED = {  # image id -> (modality, DA, cached shape (X, Y, Z))
    "CT/other.mha": ("CT", 1, (23, 17, 18)),
    "CT/patient1/series": ("CT", 2, (20, 18, 5)),
    "CT/thin.nii.gz": ("CT", 0, (33, 34, 35)),
    "MR/sub/flair.nrrd": ("MR", 1, (19, 21, 17)),
    "MR/thick.nii.gz": ("MR", 3, (37, 35, 9)),
    "top.nii.gz": ("brain", 0, (17, 18, 19)),
    "xray/chest.png": ("xray", 5, (41, 45, 1)),
}


# ------------------------------------------------------------------------------------------------------- listing


def test_folder_listing_tags_and_dicom_series_as_one_image(collection: Path) -> None:
    records = list_folder(collection, modality="brain")
    assert {r.image_id: r.modality for r in records} == {k: v[0] for k, v in EXPECTED.items()}
    assert all(r.dataset == r.modality for r in records)
    series = next(r for r in records if r.image_id == "CT/patient1/series")
    assert series.path.is_dir()


def test_folder_image_without_tag_and_two_series_are_listed_problems(collection: Path) -> None:
    dicom_series(collection / "CT" / "patient1" / "series", (20, 18, 3), (0.5, 0.5, 3.0), uid="1.2.3.4.5")
    with pytest.raises(DataErrors) as err:
        list_folder(collection)
    messages = [m for _, _, m in err.value.problems]
    assert len(messages) == 2
    assert any("top.nii.gz" in m and "no modality tag" in m for m in messages)
    assert any("series" in m and "holds 2 DICOM series" in m for m in messages)


def test_manifest_csv_and_json_with_spacing_override(collection: Path) -> None:
    csv = collection / "list.csv"
    csv.write_text("image,modality,spacing,dataset\nxray/chest.png,xray,\"0.14,0.14\",nih\n"
                   "MR/thick.nii.gz,MR,,\n")
    records = list_collection(csv)
    assert [(r.image_id, r.modality, r.dataset, r.spacing) for r in records] == [
        ("xray/chest.png", "xray", "nih", (0.14, 0.14)), ("MR/thick.nii.gz", "MR", "MR", None)]
    js = collection / "list.json"
    js.write_text('{"images": [{"image": "CT/patient1/series"}, {"image": "xray/chest.png", "spacing": [0.2, 0.3]}]}')
    records = list_collection(js, modality="any")
    assert [(r.modality, r.spacing) for r in records] == [("any", None), ("any", (0.2, 0.3))]
    index = build_collection_cache(records, collection / ".cache")
    xray = index.images[1]
    assert xray.spacing == pytest.approx((0.2, 0.3, 0.2 * 32))  # 2D depth placeholder: min in-plane * 2**5
    assert xray.da == 5


def test_manifest_problems_name_every_bad_row(collection: Path) -> None:
    csv = collection / "bad.csv"
    csv.write_text("image,modality,spacing\nmissing.nii.gz,CT,\nxray/chest.png,xray,\"0,1\"\n"
                   "notes.txt,CT,\nMR/thick.nii.gz,,\nMR/thick.nii.gz,MR,\nMR/thick.nii.gz,MR,\n")
    with pytest.raises(DataErrors) as err:
        list_collection(csv)
    messages = [m for _, _, m in err.value.problems]
    assert len(messages) == 5
    for row, text in [(1, "not found"), (2, "'spacing'"), (3, "unsupported ending"), (4, "'modality' is empty"),
                      (6, "listed again (first in row 5)")]:
        assert any(f"row {row}:" in m and text in m for m in messages), (row, messages)
    (collection / "extra.json").write_text('[{"image": "top.nii.gz", "modality": "x", "label": "y.nii.gz"}]')
    with pytest.raises(DataErrors, match=r"row 1: unknown field\(s\) \['label'\]"):
        list_collection(collection / "extra.json")


# ----------------------------------------------------------------------------------------------------- preparing


def test_degree_of_anisotropy_values_and_agreement_with_the_layer() -> None:
    assert degree_of_anisotropy((0.8, 0.8, 6.5)) == 3
    assert degree_of_anisotropy((0.6, 0.6, 1.0)) == 0
    assert degree_of_anisotropy((0.14, 0.14)) == 5
    assert degree_of_anisotropy((1.0, 0.5, 64.0)) == 5  # clipped: log2(128) = 7
    assert degree_of_anisotropy((1.0, 1.0, 0.5)) == 0  # thinner slices than pixels: clipped at 0
    assert degree_of_anisotropy((0.5, 0.5, 2.0)) == 2  # exact power of two
    with pytest.raises(ValueError, match="finite positive"):
        degree_of_anisotropy((0.0, 1.0, 1.0))
    from medmodal.layers import sac

    assert sac.degree_of_anisotropy is degree_of_anisotropy  # the convolutions and the data use one definition


def test_percentile_mapping_values() -> None:
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out = percentile_scale(values)
    lo, hi = 0.005 * 999, 0.995 * 999  # numpy's linear percentiles of 0..999
    assert out.dtype == np.float32
    assert out[5, 0, 0] == pytest.approx((500 - lo) / (hi - lo), abs=1e-6)
    assert out.flat[0] == 0.0 and out.flat[-1] == 1.0  # clipped below 0.5 % and above 99.5 %
    assert out.flat[4] == 0.0 and out.flat[5] == pytest.approx((5 - lo) / (hi - lo), abs=1e-6)
    mostly_zero = np.zeros((40, 40), np.float32)
    mostly_zero[0, :2] = [3.0, 6.0]  # 99.5 % of voxels share one value: fall back to min/max
    assert percentile_scale(mostly_zero)[0, :2].tolist() == [0.5, 1.0]
    with pytest.raises(DataError, match="blank image"):
        percentile_scale(np.full((5, 6), 7.0), where="x.png")


def test_prepare_reorients_and_moves_the_thick_axis_last() -> None:
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    flipped = Volume(array, np.diag([-0.8, 0.8, 6.5, 1.0]))  # x runs right-to-left
    prepared = prepare_image(flipped)
    assert prepared.spacing == pytest.approx((0.8, 0.8, 6.5)) and prepared.da == 3
    assert prepared.array.shape == (1, 5, 6, 7) and prepared.channels == 1 and prepared.shape == (5, 6, 7)
    np.testing.assert_allclose(prepared.array[0], percentile_scale(array[::-1]), atol=1e-7)
    sagittal = Volume(array, np.diag([6.5, 0.8, 0.8, 1.0]))  # thick slices along x
    prepared = prepare_image(sagittal)
    assert prepared.array.shape == (1, 6, 7, 5)
    assert prepared.spacing == pytest.approx((0.8, 0.8, 6.5)) and prepared.da == 3
    np.testing.assert_allclose(prepared.array[0], percentile_scale(array).transpose(1, 2, 0), atol=1e-7)


def test_prepare_natural_pictures_and_errors_name_the_file() -> None:
    picture = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    prepared = prepare_image(Volume(picture, path=Path("p.png")), natural=True)
    assert prepared.array.shape == (1, 2, 2, 1) and prepared.spatial_dims == 2 and prepared.da == 5
    assert prepared.array[0, ..., 0].ravel().tolist() == pytest.approx([0.0, 0.2, 0.4, 1.0])
    assert prepared.spacing == (1.0, 1.0, 32.0)
    with pytest.raises(DataError, match=r"q\.png: is uint16, not an 8-bit picture"):
        prepare_image(Volume(picture.astype(np.uint16), path=Path("q.png")), natural=True)
    with pytest.raises(DataError, match=r"r\.png: the spacing override .* has 3 values but the image is 2D"):
        prepare_image(Volume(picture, path=Path("r.png")), spacing=(1.0, 1.0, 1.0))
    zero = np.diag([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(DataError, match=r"z\.nii: has voxel spacing .* \(zero or NaN\)"):
        prepare_image(Volume(np.ones((3, 4, 5), np.float32), zero, Path("z.nii")))


# ------------------------------------------------------------------------------------------------------- caching


def test_cache_values_shapes_and_memory_maps(collection: Path) -> None:
    records = list_folder(collection, modality="brain")
    index = build_collection_cache(records, collection / "cache", natural=("xray",))
    got = {im.image_id: (im.modality, im.da, im.shape) for im in index}
    assert got == EXPECTED
    thick = next(im for im in index if im.image_id == "MR/thick.nii.gz")
    assert thick.spacing == pytest.approx((0.8, 0.8, 6.5))
    arr = thick.array()
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and not arr.flags.writeable
    source = np.asanyarray(nib.load(collection / "MR" / "thick.nii.gz").dataobj)
    np.testing.assert_allclose(arr, percentile_scale(source), atol=1e-3)  # float16 in [0, 1]: 2^-11
    xray = next(im for im in index if im.image_id == "xray/chest.png")
    pixels = np.asarray(Image.open(collection / "xray" / "chest.png")).T  # (X, Y) = (columns, rows)
    np.testing.assert_allclose(xray.array()[..., 0], pixels / 255.0, atol=1e-3)
    reopened = CollectionIndex.load(collection / "cache")
    assert reopened.images == index.images
    # the cache folder inside the collection is not listed as images
    assert {r.image_id for r in list_folder(collection, modality="brain")} == set(EXPECTED)


def test_cache_reuse_and_invalidation(collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medmodal.data.collection_cache as cache_module

    calls: list[str] = []
    real = cache_module.read_collection_image

    def counting(path: Path, **kw: object) -> Volume:
        calls.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(cache_module, "read_collection_image", counting)
    records = list_folder(collection, modality="brain")
    cache = collection / "cache"
    build_collection_cache(records, cache, dtype="float32")
    assert len(calls) == len(EXPECTED)
    calls.clear()
    index = build_collection_cache(records, cache, dtype="float32")
    assert calls == []  # nothing changed: nothing read
    nifti(collection / "CT" / "thin.nii.gz", (33, 34, 35), (0.6, 0.6, 1.0), seed=9)  # new content
    st = (collection / "CT" / "thin.nii.gz").stat()
    os.utime(collection / "CT" / "thin.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    index2 = build_collection_cache(records, cache, dtype="float32")
    assert calls == ["thin.nii.gz"]
    thin = [im for im in index2 if im.image_id == "CT/thin.nii.gz"][0]
    before = [im for im in index if im.image_id == "CT/thin.nii.gz"][0]
    assert thin.path == before.path and thin.array().dtype == np.float32  # same file name, new content
    np.testing.assert_allclose(thin.array(), percentile_scale(np.asanyarray(nib.load(thin.source).dataobj)),
                               atol=1e-6)
    calls.clear()
    build_collection_cache([r for r in records if r.image_id != "top.nii.gz"], cache, dtype="float32")
    assert calls == []
    top = next(im for im in index if im.image_id == "top.nii.gz")
    assert not top.path.exists()  # an image that left the collection leaves the cache
    calls.clear()
    build_collection_cache(records[:1], cache, dtype="float16")  # other parameters: rebuilt
    assert calls == [records[0].path.name]


def test_bad_images_are_all_listed_by_check_and_build(collection: Path) -> None:
    bad = collection / "bad"
    bad.mkdir()
    (bad / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (bad / "empty.png").write_bytes(b"")
    nan = np.ones((5, 6, 7), np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), bad / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((5, 6, 7), 3.0, np.float32), np.eye(4)), bad / "blank.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((5, 6, 7, 2), np.float32), np.eye(4)), bad / "series4d.nii.gz")
    records, problems = check_collection(collection, modality="brain")
    assert len(records) == len(EXPECTED) + 5
    assert sorted(p.case_id for p in problems) == ["bad/blank.nii.gz", "bad/corrupt.nii.gz", "bad/empty.png",
                                                    "bad/nan.nii.gz", "bad/series4d.nii.gz"]
    for p in problems:
        assert str(p.path) in p.message
    assert any("NaN" in p.message for p in problems) and any("blank image" in p.message for p in problems)
    assert any("is a 4D image" in p.message for p in problems)
    with pytest.raises(DataErrors) as err:
        build_collection_cache(records, collection / "cache")
    assert len(err.value.problems) == 5
    assert len(CollectionIndex.load(collection / "cache")) == len(EXPECTED)  # the good ones were cached
    index = build_collection_cache(records, collection / "cache", skip_bad=True)
    assert {im.image_id for im in index} == set(EXPECTED)
    assert check_collection(collection / "nowhere")[1][0].message.endswith(
        "not found; give an image folder or a .csv / .json manifest")


# ------------------------------------------------------------------------------------------------------- sampler


def test_token_sizes_and_crop_grids() -> None:
    assert token_size(0) == (16, 16, 16) and token_size(3) == (16, 16, 2) and token_size(4) == (16, 16, 1)
    assert token_size(5) == (16, 16, 1)
    grid = (8, 8, 4)
    assert crop_tokens((512, 512, 300), 0, token_grid=grid) == (8, 8, 4)
    assert crop_tokens((512, 512, 40), 3, token_grid=grid) == (8, 8, 4)  # 40 slices = 20 tokens of 2
    assert crop_tokens((512, 512, 5), 3, token_grid=grid) == (8, 8, 3)  # thinner: fewer tokens in depth
    assert crop_tokens((37, 35, 9), 3, token_grid=grid) == (3, 3, 4)
    assert crop_tokens((600, 400, 1), 5, token_grid=grid) == (8, 8, 1)
    assert crop_tokens((600, 400, 30), 5, token_grid=grid) == (8, 8, 1)  # DA 5 volume: single slices
    with pytest.raises(ValueError, match="smaller than one token"):
        crop_tokens((15, 40, 1), 5, token_grid=grid)


def test_crops_whole_tokens_one_bucket_per_batch_and_bounded_padding(collection: Path) -> None:
    index = build_collection_cache(list_folder(collection, modality="brain"), collection / "cache")
    crops = CollectionCrops(index=index, batch_size=4, batches_per_epoch=60, token_grid=(2, 2, 2), seed=3)
    loader = DataLoader(crops, batch_sampler=RankBatches(crops), collate_fn=collate_crops)
    by_id = {im.image_id: im for im in index}
    seen_das = set()
    for batch in loader:
        da, tokens = batch["da"], batch["tokens"]
        seen_das.add(da)
        t = token_size(da)
        assert batch["image"].shape == (4, 1, *(n * s for n, s in zip(tokens, t, strict=True)))
        for b, image_id in enumerate(batch["image_id"]):
            image = by_id[image_id]
            assert image.da == da and crop_tokens(image.shape, da, token_grid=(2, 2, 2)) == tokens
            valid = batch["valid"][b, 0]
            corner = batch["corner"][b]
            for axis in range(3):
                pad = int((~valid).all(dim=[a for a in range(3) if a != axis]).sum())
                assert pad < t[axis]  # the stated bound: less than one token per axis
                assert pad == max(0, corner[axis] + valid.shape[axis] - image.shape[axis])
            ext = valid.nonzero().max(dim=0).values + 1
            box = tuple(slice(c, c + int(e)) for c, e in zip(corner, ext, strict=True))
            np.testing.assert_array_equal(batch["image"][b, 0][tuple(slice(0, int(e)) for e in ext)].numpy(),
                                          np.asarray(image.array()[box], dtype=np.float32))
            assert int(valid.sum()) == int(np.prod(ext.numpy()))  # valid is one box at the crop's start
            assert float(batch["image"][b, 0][~valid].abs().sum()) == 0.0
    assert seen_das == {0, 1, 2, 3, 5}
    with pytest.raises(ValueError, match="one \\(DA, token grid\\) bucket"):
        collate_crops([crops[0], {**crops[0], "da": 7}])


def fake_index(groups: dict[str, tuple[int, int]]) -> CollectionIndex:
    """``groups``: dataset -> (images, DA); shapes large enough for the full grid (nothing is read)."""
    images = [
        CachedImage(image_id=f"{g}/{i}", source=Path(f"/data/{g}/{i}.nii.gz"), modality=g, dataset=g,
                    path=Path(f"/cache/{g}{i}.npy"), shape=(200, 200, 1 if da == 5 else 100),
                    spacing=(1.0, 1.0, 2.0**da), spatial_dims=2 if da == 5 else 3, da=da)
        for g, (n, da) in groups.items() for i in range(n)
    ]
    return CollectionIndex(images=images, root=Path("/cache"))


def test_da_histogram_follows_the_weights_within_three_sigma() -> None:
    index = fake_index({"xray": (5, 5), "mr": (3, 3), "ct": (2, 0), "ct_thick": (4, 3)})
    weights = {"xray": 1.0, "mr": 2.0, "ct": 1.0, "ct_thick": 0.0}
    n_batches = 3000
    crops = CollectionCrops(index=index, batch_size=6, batches_per_epoch=n_batches, weights=weights, seed=11)
    das = np.array([index.images[crops.batch(j)[0]].da for j in range(n_batches)])
    counts = np.zeros(len(index))
    for j in range(n_batches):
        plan = crops.batch(j)
        assert len({index.images[k].da for k in plan}) == 1  # spec invariant 9: one DA per batch
        np.add.at(counts, plan, 1)
    for da, p in {5: 0.25, 3: 0.5, 0: 0.25}.items():
        sigma = np.sqrt(n_batches * p * (1 - p))
        assert abs((das == da).sum() - n_batches * p) <= 3 * sigma, (da, (das == da).sum())
    share = counts / counts.sum()  # every batch position follows the weights; images within a group uniformly
    expected = np.array([crops.probabilities[k] for k in range(len(index))])
    assert expected[:5] == pytest.approx([0.05] * 5) and expected[10:].sum() == 0.0
    sigma = np.sqrt(expected * (1 - expected) / counts.sum()) * np.sqrt(6)  # positions of a batch are correlated
    assert np.all(np.abs(share - expected) <= 3 * sigma + 1e-12)
    with pytest.raises(ValueError, match=r"missing: \['ct_thick'\]"):
        CollectionCrops(index=index, batch_size=2, batches_per_epoch=1, weights={"xray": 1, "mr": 1, "ct": 1})
    by_modality = CollectionCrops(index=index, batch_size=2, batches_per_epoch=1, weight_by="modality")
    assert by_modality.probabilities.sum() == pytest.approx(1.0)


def test_determinism_by_seed_and_epoch(collection: Path) -> None:
    index = build_collection_cache(list_folder(collection, modality="brain"), collection / "cache")

    def epoch(seed: int, e: int) -> list[tuple]:
        crops = CollectionCrops(index=index, batch_size=4, batches_per_epoch=5, token_grid=(2, 2, 2), seed=seed)
        crops.set_epoch(e)
        return [(s["image_id"], s["corner"], float(s["image"].sum())) for s in (crops[i] for i in range(len(crops)))]

    assert epoch(1, 0) == epoch(1, 0)
    assert epoch(1, 0) != epoch(1, 1)
    assert epoch(1, 0) != epoch(2, 0)


def test_two_ranks_together_give_the_global_batches(collection: Path) -> None:
    index = build_collection_cache(list_folder(collection, modality="brain"), collection / "cache")
    crops = CollectionCrops(index=index, batch_size=4, batches_per_epoch=6, token_grid=(2, 2, 2), seed=5)
    crops.set_epoch(2)

    def batches(rank: int, world: int) -> list[dict]:
        return list(DataLoader(crops, batch_sampler=RankBatches(crops, rank=rank, world_size=world),
                               collate_fn=collate_crops))

    one, r0, r1 = batches(0, 1), batches(0, 2), batches(1, 2)
    assert len(one) == len(r0) == len(r1) == 6
    for g, a, b in zip(one, r0, r1, strict=True):
        assert a["image_id"] + b["image_id"] == g["image_id"]
        assert torch.equal(torch.cat([a["image"], b["image"]]), g["image"])
        assert a["da"] == b["da"] == g["da"]
    with pytest.raises(ValueError, match="multiple of the 3 training processes"):
        RankBatches(crops, rank=0, world_size=3)


def test_an_image_smaller_than_one_token_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "c"
    nifti(root / "CT" / "ok.nii.gz", (20, 20, 20), (1.0, 1.0, 1.0))
    nifti(root / "CT" / "thin.nii.gz", (20, 20, 12), (1.0, 1.0, 1.0), seed=1)  # DA 0: 12 < 16 slices
    nifti(root / "CT" / "narrow.nii.gz", (20, 9, 4), (1.0, 1.0, 4.0), seed=2)
    index = build_collection_cache(list_folder(root), tmp_path / "cache")
    with pytest.raises(DataErrors) as err:
        CollectionCrops(index=index, batch_size=2, batches_per_epoch=1)
    messages = sorted(m for _, _, m in err.value.problems)
    assert len(messages) == 2
    assert "narrow.nii.gz: is (20, 9, 4) voxels (DA 2), smaller than one token (16, 16, 4)" in messages[0]
    assert "thin.nii.gz: is (20, 20, 12) voxels (DA 0), smaller than one token (16, 16, 16)" in messages[1]


# ---------------------------------------------------------------------------------------------------- real data


def test_real_chest_xray_jpegs_as_a_collection(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("pneumonia_model_package")  # finds the folder, never imports it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pneumonia-model-package (real chest X-ray JPEGs) is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "pneumonia-data" / "val"
    records = [r for r in list_folder(folder, modality="xray")][:3]
    index = build_collection_cache(records, tmp_path / "cache", natural=("xray",))
    crops = CollectionCrops(index=index, batch_size=3, batches_per_epoch=2)
    batch = collate_crops([crops[i] for i in range(3)])
    assert batch["da"] == 5 and batch["tokens"] == (8, 8, 1) and batch["image"].shape == (3, 1, 128, 128, 1)
    assert bool(batch["valid"].all())  # real X-rays are larger than 128 px: no padding
    for im in index:
        assert im.spatial_dims == 2 and im.shape[2] == 1 and min(im.shape[:2]) >= 500
        arr = np.asarray(im.array(), dtype=np.float32)
        assert arr.min() >= 0.0 and arr.max() <= 1.0 and 0.2 < arr.mean() < 0.8  # grey X-ray, /255
