"""Colour in image collections: RGB pictures keep 3 channels through reading, caching and cropping; crops are
converted to the channels a network takes (BT.601 grey or replicated grey); bad pictures name their file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medmodal.data.case import DataError
from medmodal.data.collection_cache import CollectionIndex, build_collection_cache
from medmodal.data.collection_sampler import CollectionCrops, collate_crops
from medmodal.data.collections import (
    BT601_WEIGHTS,
    ImageRecord,
    check_collection,
    list_folder,
    percentile_scale,
    prepare_image,
    read_collection_image,
    to_channels,
)
from medmodal.data.io import read_image
from medmodal.data.xray import read_picture


def rgb_picture(path: Path, rows: int, cols: int, *, seed: int = 0, mode: str = "RGB") -> np.ndarray:
    """An H&E-like picture: red, green and blue in different ranges; returns the ``(rows, cols, C)`` pixels."""
    rng = np.random.default_rng(seed)
    pixels = np.stack([rng.integers(150, 250, (rows, cols)), rng.integers(40, 140, (rows, cols)),
                       rng.integers(90, 200, (rows, cols))], axis=-1).astype(np.uint8)
    if mode == "RGBA":
        pixels = np.concatenate([pixels, np.full((rows, cols, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(pixels, mode=mode).save(path)
    return pixels


def grey_picture(path: Path, rows: int, cols: int, *, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (rows, cols)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def record(path: Path, modality: str = "pathology") -> ImageRecord:
    return ImageRecord(image_id=path.name, path=path, modality=modality)


# ------------------------------------------------------------------------------------------------------- reading


def test_colour_round_trip_through_the_cache(tmp_path: Path) -> None:
    """An RGB PNG and an RGB TIFF keep their 3 channels: (3, X, Y, 1) in the cache, one percentile pair for all
    channels (the same affine map on R, G and B), array() the BT.601 luma of the cached channels."""
    png, tif = tmp_path / "he.png", tmp_path / "fundus.tif"
    pixels = {png: rgb_picture(png, 13, 17, seed=1), tif: rgb_picture(tif, 11, 9, seed=2)}
    index = build_collection_cache([record(png), record(tif)], tmp_path / "cache", dtype="float32")
    for image in index:
        rgb = pixels[image.source].astype(np.float32).transpose(2, 1, 0)  # (3, X, Y): X = columns
        assert image.channels == 3 and image.shape == (*rgb.shape[1:], 1) and image.da == 5
        data = image.data()
        assert data.shape == (3, *image.shape)
        lo, hi = np.percentile(rgb, (0.5, 99.5))  # over all channels together
        np.testing.assert_allclose(data[..., 0], np.clip((rgb - lo) / (hi - lo), 0, 1), atol=1e-6)
        # per-channel percentiles would put every channel's maximum at 1: the shared pair keeps R above G
        assert data[0].mean() > data[2].mean() > data[1].mean() and float(data[1].max()) < 0.6
        np.testing.assert_allclose(image.array(), np.tensordot(BT601_WEIGHTS, data, axes=1), atol=1e-6)
    reopened = CollectionIndex.load(tmp_path / "cache")
    assert [im.channels for im in reopened] == [3, 3]


def test_equal_channel_rgb_is_grey_and_opaque_alpha_is_dropped(tmp_path: Path) -> None:
    grey = np.random.default_rng(3).integers(0, 256, (9, 10)).astype(np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=-1)).save(tmp_path / "equal.png")
    noisy = np.repeat(grey[..., None], 3, axis=-1).astype(np.int16)
    noisy[..., 2] += 1  # a lossy JPEG's chroma noise: within JPEG_GREY_TOLERANCE
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(tmp_path / "equal.jpg", quality=100)
    opaque = rgb_picture(tmp_path / "opaque.png", 8, 9, seed=4, mode="RGBA")
    vol = read_collection_image(tmp_path / "equal.png")
    assert vol.rgb is None and vol.array.tolist() == grey.T.tolist()
    assert read_collection_image(tmp_path / "equal.jpg").rgb is None
    vol = read_collection_image(tmp_path / "opaque.png")
    assert vol.rgb.shape == (3, 9, 8) and vol.rgb.tolist() == opaque[..., :3].transpose(2, 1, 0).tolist()
    index = build_collection_cache([record(tmp_path / "equal.png"), record(tmp_path / "opaque.png")],
                                   tmp_path / "cache")
    assert [im.channels for im in index] == [1, 3]
    assert index.images[0].data().shape == (1, 10, 9, 1)


def test_the_xray_readers_still_refuse_colour(tmp_path: Path) -> None:
    rgb_picture(tmp_path / "colour.png", 6, 7)
    for read in (read_picture, read_image):
        with pytest.raises(DataError, match=r"colour\.png: has colour .* medmodal expects a grey X-ray"):
            read(tmp_path / "colour.png")
    assert read_picture(tmp_path / "colour.png", colour=True).channels == 3


def test_bad_pictures_name_the_file(tmp_path: Path) -> None:
    """A transparent pixel, a 2-channel picture (Pillow reads it as grey + alpha) and a 2-channel volume are
    errors naming the file; check_collection reports all of them at once."""
    folder = tmp_path / "images" / "pathology"
    folder.mkdir(parents=True)
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(folder / "transparent.png")
    two = np.stack([np.full((5, 6), 10, np.uint8), np.arange(30, dtype=np.uint8).reshape(5, 6)], axis=-1)
    Image.fromarray(two, mode="LA").save(folder / "two_channels.tif")
    nib.save(nib.Nifti1Image(np.ones((5, 6, 7, 1, 2), np.float32), np.eye(4)), folder / "vector.nii.gz")
    rgb_picture(folder / "good.png", 6, 7)
    records, problems = check_collection(tmp_path / "images")
    assert len(records) == 4 and len(problems) == 3
    by_file = {p.path.name: p.message for p in problems}
    assert "transparent.png: has 1 transparent pixel(s) (alpha < 255, mode RGBA)" in by_file["transparent.png"]
    assert "flatten it onto a background" in by_file["transparent.png"]
    assert "two_channels.tif: has 30 transparent pixel(s)" in by_file["two_channels.tif"]
    assert "2-channel image" in by_file["two_channels.tif"]
    assert "vector.nii.gz: is a 5D image" in by_file["vector.nii.gz"]
    assert all(message.startswith(str(folder)) for message in by_file.values())


def test_prepared_colour_3d_orientation_keeps_channels_aligned() -> None:
    """A colour picture goes through reorientation per channel: the same permutation and flips for R, G and B."""
    from medmodal.data.xray import XrayVolume

    rgb = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5) * 4
    volume = XrayVolume(array=np.zeros((4, 5), np.float32), affine=np.diag([-1.0, 1.0, 1.0, 1.0]),
                        path=Path("flipped.png"), rgb=rgb)
    prepared = prepare_image(volume)
    assert prepared.channels == 3 and prepared.array.shape == (3, 4, 5, 1)
    np.testing.assert_allclose(prepared.array[..., 0], percentile_scale(rgb[:, ::-1]), atol=1e-7)


# ------------------------------------------------------------------------------------------------------ channels


def test_bt601_value_on_a_known_pixel_and_replication() -> None:
    pixel = np.array([1.0, 0.5, 0.25], np.float32).reshape(3, 1, 1, 1)
    grey = to_channels(pixel, 1)
    assert grey.shape == (1, 1, 1, 1) and grey.dtype == np.float32
    assert grey.item() == pytest.approx(0.299 * 1.0 + 0.587 * 0.5 + 0.114 * 0.25, abs=1e-7)  # 0.6200
    # Pillow's RGB -> L is the same BT.601 luma (in integer arithmetic)
    rgb8 = np.array([[[200, 100, 50]]], np.uint8)
    pil = np.asarray(Image.fromarray(rgb8).convert("L"))[0, 0]
    assert abs(to_channels(rgb8.transpose(2, 0, 1).astype(np.float32), 1).item() - float(pil)) <= 0.5
    plane = np.random.default_rng(0).random((1, 3, 4, 2)).astype(np.float32)
    three = to_channels(plane, 3)
    assert three.shape == (3, 3, 4, 2) and all(np.array_equal(three[c], plane[0]) for c in range(3))
    assert to_channels(three, 3) is not None and np.array_equal(to_channels(three, 3), three)
    with pytest.raises(ValueError, match="channels must be 1"):
        to_channels(plane, 2)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        to_channels(np.zeros((2, 3, 3, 1), np.float32), 1)


def test_crops_convert_colour_and_grey_to_the_requested_channels(tmp_path: Path) -> None:
    """Crops of a whole-image token grid: channels=1 gives the BT.601 luma of the cached RGB, channels=3 gives the
    RGB of a colour image and three copies of a grey one; valid stays (1, X, Y, Z)."""
    rgb_picture(tmp_path / "he.png", 16, 16, seed=5)
    grey_picture(tmp_path / "xray.png", 16, 16, seed=6)
    index = build_collection_cache([record(tmp_path / "he.png"), record(tmp_path / "xray.png", "xray")],
                                   tmp_path / "cache", dtype="float32")
    colour, grey = index.images
    for channels in (1, 3):
        crops = CollectionCrops(index=index, batch_size=1, batches_per_epoch=20, token_grid=(2, 2, 1),
                                patch_size=8, seed=1, channels=channels)
        seen = set()
        for i in range(len(crops)):
            item = crops[i]
            assert item["image"].shape == (channels, 16, 16, 1) and item["valid"].shape == (1, 16, 16, 1)
            assert item["corner"] == (0, 0, 0)  # the crop is the whole image
            source = colour if item["image_id"] == "he.png" else grey
            assert item["source_channels"] == source.channels
            expected = torch.from_numpy(to_channels(np.array(source.data()), channels))
            torch.testing.assert_close(item["image"], expected, atol=1e-6, rtol=0)
            seen.add(item["image_id"])
        assert seen == {"he.png", "xray.png"}
    pixel = np.asarray(colour.data())[:, 3, 4, 0]
    crops = CollectionCrops(index=index, batch_size=1, batches_per_epoch=1, token_grid=(2, 2, 1), patch_size=8,
                            weights={"pathology": 1.0, "xray": 0.0}, weight_by="modality", channels=1)
    assert float(crops[0]["image"][0, 3, 4, 0]) == pytest.approx(float(np.dot(BT601_WEIGHTS, pixel)), abs=1e-6)
    with pytest.raises(ValueError, match="channels must be 1"):
        CollectionCrops(index=index, batch_size=1, batches_per_epoch=1, patch_size=8, channels=2)


def test_mixed_grids_never_share_a_batch_with_colour_and_grey(tmp_path: Path) -> None:
    """The bucket invariant with colour and grey 2D pictures and 3D volumes of several DAs: every batch holds one
    (DA, token grid), all its crops have the requested channels, and colour and grey images of one bucket mix."""
    root = tmp_path / "images"
    for sub in ("pathology", "xray", "MR"):
        (root / sub).mkdir(parents=True)
    for k, (rows, cols) in enumerate([(16, 16), (16, 16), (24, 40), (8, 17)]):
        rgb_picture(root / "pathology" / f"he{k}.png", rows, cols, seed=k)
    for k, (rows, cols) in enumerate([(16, 16), (40, 24)]):
        grey_picture(root / "xray" / f"x{k}.png", rows, cols, seed=10 + k)
    rng = np.random.default_rng(0)
    for name, shape, spacing in [("iso", (17, 18, 19), (1.0, 1.0, 1.0)), ("thick", (17, 18, 5), (0.8, 0.8, 6.5))]:
        nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), np.diag([*spacing, 1.0])),
                 root / "MR" / f"{name}.nii.gz")
    index = build_collection_cache(list_folder(root), tmp_path / "cache")
    assert sorted((im.image_id, im.channels, im.da) for im in index)[0] == ("MR/iso.nii.gz", 1, 0)
    for channels in (1, 3):
        crops = CollectionCrops(index=index, batch_size=3, batches_per_epoch=30, token_grid=(2, 2, 2),
                                patch_size=8, channels=channels)
        mixed = False
        for j in range(crops.batches_per_epoch):
            batch = collate_crops([crops[j * 3 + p] for p in range(3)])
            members = [next(im for im in index if im.image_id == i) for i in batch["image_id"]]
            assert {(im.da, crops.tokens[index.images.index(im)]) for im in members} == {(batch["da"],
                                                                                            batch["tokens"])}
            assert batch["image"].shape[:2] == (3, channels) and batch["valid"].shape[1] == 1
            assert batch["source_channels"] == [im.channels for im in members]
            mixed |= len(set(batch["source_channels"])) == 2
        assert mixed  # the 16 x 16 colour and grey pictures share the bucket (DA 5, (2, 2, 1))
    with pytest.raises(ValueError, match="one channel count"):
        collate_crops([{**crops[0], "image": torch.zeros(1, 16, 16, 1)}, {**crops[1], "image": torch.zeros(3, 16, 16,
                                                                                                          1)}])


def test_a_version_1_cache_is_rebuilt_and_refused_by_load(tmp_path: Path) -> None:
    rgb_picture(tmp_path / "he.png", 9, 8)
    build_collection_cache([record(tmp_path / "he.png")], tmp_path / "cache")
    index_file = tmp_path / "cache" / "collection.json"
    doc = json.loads(index_file.read_text())
    doc["params"]["format_version"] = 1
    index_file.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="not version 2; rebuild it"):
        CollectionIndex.load(tmp_path / "cache")
    index = build_collection_cache([record(tmp_path / "he.png")], tmp_path / "cache")
    assert index.params["format_version"] == 2 and index.images[0].channels == 3
