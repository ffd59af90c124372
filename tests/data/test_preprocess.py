"""Preprocessing invariants: exact inverse for labels, canonical reorientation, resampling, crop, z-score."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medmodal.data.case import Case, DataError, Volume
from medmodal.data.preprocess import (
    CaseGeometry,
    preprocess_case,
    resample,
    resample_label,
    restore_to_input_grid,
)
from medmodal.evaluation.metrics import binary_dice

MODALITIES = ("t1", "t1c", "t2", "flair")


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


AFFINES = {
    "identity": np.diag([1.0, 1.0, 1.0, 1.0]),
    # voxel axes (i, j, k) -> world (-z, +x, -y): a permutation with flips, anisotropic spacing
    "permuted_flipped": np.array([[0, 1.2, 0, 5], [0, 0, -0.8, -3], [-2.0, 0, 0, 7], [0, 0, 0, 1.0]]),
    "oblique": np.block([[_rotation(0.35) @ np.diag([0.9, 1.1, 1.5]), np.c_[[1.0, 2, 3]]], [np.eye(4)[3]]]),
}


def make_case(
    shape: tuple[int, ...], *, affine: np.ndarray, present: tuple[str, ...] = ("t1", "t2", "flair")
) -> Case:
    """A blob (non-zero 'head') with an ellipsoidal two-class 'tumour' inside, zero background around it."""
    rng = np.random.default_rng(0)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grid))
    head = r < 0.8
    tumour = np.sqrt(sum(((g - 0.15) / 0.5) ** 2 for g in grid))
    label = np.where(tumour < 0.6, 4, np.where(tumour < 1.0, 2, 0)).astype(np.uint8) * head
    images = {}
    for k, name in enumerate(present):
        img = (50.0 + 20 * k + 30 * (label > 0) + rng.normal(0, 5, shape)) * head
        images[name] = Volume(img.astype(np.float32), affine)
    return Case("case_007", images, label=Volume(label, affine), target=1, report="synthetic")


@pytest.mark.parametrize("shape", [(17, 18, 19), (21, 23)], ids=["3d", "2d"])
@pytest.mark.parametrize("affine", list(AFFINES), ids=list(AFFINES))
def test_label_round_trip_is_identity(shape: tuple[int, ...], affine: str) -> None:
    case = make_case(shape, affine=AFFINES[affine])
    image, label, available, geometry = preprocess_case(case, MODALITIES, target_spacing=None)
    assert image.dtype == np.float32 and label is not None and label.dtype == np.uint8
    assert image.shape == (len(MODALITIES), *label.shape) and label.ndim == len(shape)
    assert available.tolist() == [True, False, True, True]
    restored = restore_to_input_grid(label, geometry, order=0)
    assert restored.shape == shape
    np.testing.assert_array_equal(restored, case.label.array)
    # probabilities (C, *S) take the same way back
    probs = np.stack([label == 0, label > 0]).astype(np.float32)
    back = restore_to_input_grid(probs, geometry, order=1)
    assert back.shape == (2, *shape)
    np.testing.assert_array_equal(back[1] > 0.5, case.label.array > 0)


@pytest.mark.parametrize("shape", [(17, 18, 19), (21, 23)], ids=["3d", "2d"])
def test_reorientation_is_canonical(shape: tuple[int, ...]) -> None:
    """The same world-space object stored with permuted/flipped axes preprocesses to the same arrays."""
    ras = make_case(shape, affine=np.eye(4))
    ornt = np.array([[1, -1], [0, 1]] if len(shape) == 2 else [[2, -1], [0, 1], [1, -1]], dtype=float)
    moved = {}
    for name, vol in {**ras.images, "label": ras.label}.items():
        img = nib.Nifti1Image(vol.array if len(shape) == 3 else vol.array[..., None], vol.affine)
        img = img.as_reoriented(np.vstack([ornt, [[2, 1]]]) if len(shape) == 2 else ornt)
        arr = np.asarray(img.dataobj)
        moved[name] = Volume(arr[..., 0] if len(shape) == 2 else arr, img.affine)
    other = Case("moved", {k: v for k, v in moved.items() if k != "label"}, label=moved["label"])
    assert other.reference.shape != ras.reference.shape or not np.allclose(other.reference.affine, np.eye(4))
    a_img, a_lab, _, a_geo = preprocess_case(ras, MODALITIES, target_spacing=None)
    b_img, b_lab, _, b_geo = preprocess_case(other, MODALITIES, target_spacing=None)
    np.testing.assert_allclose(a_img, b_img, atol=1e-5)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_geo.canonical_shape == b_geo.canonical_shape


@pytest.mark.parametrize("shape", [(17, 18, 19), (21, 23)], ids=["3d", "2d"])
@pytest.mark.parametrize("affine", ["identity", "permuted_flipped"])
def test_resample_then_restore(shape: tuple[int, ...], affine: str) -> None:
    case = make_case(shape, affine=AFFINES[affine])
    target = (1.4,) * len(shape)
    image, label, _, geometry = preprocess_case(case, MODALITIES, target_spacing=target)
    assert geometry.target_spacing == target and geometry.spacing == target
    assert geometry.resampled_shape != geometry.canonical_shape
    extent = np.array(geometry.canonical_shape) * np.array(geometry.canonical_spacing)
    np.testing.assert_allclose(np.array(geometry.resampled_shape) * 1.4, extent, atol=1.4)
    restored = restore_to_input_grid(label, geometry, order=0)
    assert restored.shape == shape and restored.dtype == np.uint8
    assert binary_dice(restored > 0, case.label.array > 0) > 0.9
    assert binary_dice(restored == 4, case.label.array == 4) > 0.8


def test_zscore_crop_and_missing_modalities() -> None:
    shape = (17, 18, 19)
    case = make_case(shape, affine=AFFINES["oblique"], present=("t1c", "flair"))
    image, label, available, geometry = preprocess_case(case, MODALITIES, target_spacing=None)
    assert available.tolist() == [False, True, False, True]
    assert not image[0].any() and not image[2].any()
    head = image[1] != 0
    for m in (1, 3):
        fg = image[m][image[m] != 0]
        assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-4
        np.testing.assert_array_equal(image[m] != 0, head)
    # cropped to the non-zero bounding box: the border planes touch the head, the shape shrank
    assert all(s < n for s, n in zip(image.shape[1:], geometry.canonical_shape, strict=True))
    for axis in range(3):
        assert head.take(0, axis=axis).any() and head.take(-1, axis=axis).any()


def test_geometry_json_round_trip() -> None:
    case = make_case((21, 23), affine=AFFINES["oblique"])
    _, label, _, geometry = preprocess_case(case, MODALITIES, target_spacing=(1.3, 0.7))
    again = CaseGeometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
    assert again.to_dict() == geometry.to_dict()
    np.testing.assert_array_equal(
        restore_to_input_grid(label, again, order=0), restore_to_input_grid(label, geometry, order=0)
    )


def test_resample_orders_and_shapes() -> None:
    x = np.random.default_rng(0).integers(0, 5, (2, 7, 9)).astype(np.int64)
    assert resample(x, (7, 9), order=0) is x
    near = resample(x, (14, 18), order=0)
    assert near.dtype == np.int64 and set(np.unique(near)) <= set(np.unique(x))
    np.testing.assert_array_equal(near[:, ::2, ::2], x)
    assert resample(x.astype(np.float32), (5, 4), order=1).shape == (2, 5, 4)
    assert resample(x.astype(np.float32), (5, 4), order=3).shape == (2, 5, 4)
    with pytest.raises(ValueError, match="order"):
        resample(x, (5, 4), order=2)
    assert resample_label(x, (7, 9)) is x
    lab = resample_label(x.astype(np.uint8), (11, 5))
    assert lab.shape == (2, 11, 5) and lab.dtype == np.uint8 and set(np.unique(lab)) <= set(np.unique(x))


def test_grid_errors_name_the_case_and_file(tmp_path) -> None:
    case = make_case((17, 18, 19), affine=np.eye(4))
    case.images["t2"] = Volume(np.ones((17, 18, 20), np.float32), np.eye(4), path=tmp_path / "t2.nii.gz")
    with pytest.raises(DataError, match=r"case_007.*t2\.nii\.gz.*shape"):
        preprocess_case(case, MODALITIES, target_spacing=None)
    case = make_case((17, 18, 19), affine=np.eye(4))
    case.label = Volume(case.label.array, np.diag([2.0, 1, 1, 1]), path=tmp_path / "seg.nii.gz")
    with pytest.raises(DataError, match=r"seg\.nii\.gz.*not aligned"):
        preprocess_case(case, MODALITIES, target_spacing=None)


def test_modalities_outside_the_selection_are_left_out() -> None:
    from medmodal.data.phantom import make_phantom_case

    case = make_phantom_case(case_id="sel", seed=0, size=17)
    image, _, available, _ = preprocess_case(case, ("flair", "t1"), target_spacing=None)
    assert image.shape[0] == 2 and available.tolist() == [True, True]
    del case.images["flair"], case.images["t1"]
    with pytest.raises(DataError, match="none of the selected modalities"):
        preprocess_case(case, ("flair", "t1"), target_spacing=None)


# -- histogram clip (ShaSpec spec §2.6) ------------------------------------------------------------------------
def _steps(shape: tuple[int, ...], *, outliers: int = 0) -> np.ndarray:
    """Foreground values 1..20 (every value on hundreds of voxels), a zero border, ``outliers`` voxels of 1000."""
    image = np.zeros(shape, np.float32)
    inner = tuple(slice(1, s - 1) for s in shape)
    n = int(np.prod([s - 2 for s in shape]))
    image[inner] = (1 + np.arange(n) % 20).reshape([s - 2 for s in shape])
    flat = image.reshape(-1)
    flat[np.flatnonzero(flat)[:outliers]] = 1000.0
    return image


@pytest.mark.parametrize("shape", [(17, 18, 19), (53, 54)], ids=["3d", "2d"])
def test_histogram_clip_cuts_outliers_at_the_upper_edge_of_the_last_full_bin(shape: tuple[int, ...]) -> None:
    from medmodal.data.preprocess import HistogramClip

    image = _steps(shape, outliers=3)
    clip = HistogramClip(min_count=50, bins=1000)
    # 1000 bins over the non-zero range [1, 1000] are 0.999 wide; value 20 sits in bin 19, upper edge 1 + 20·0.999
    # (the code's lower edge would be 19.981; a histogram with the zero background would give 21)
    assert clip.value(image) == pytest.approx(1 + 20 * 0.999, abs=1e-9)
    out = clip(image)
    outlier = image == 1000
    assert outlier.sum() == 3
    np.testing.assert_allclose(out[outlier], 20.98, rtol=1e-6)
    np.testing.assert_array_equal(out[~outlier], image[~outlier])  # zeros and 1..20 untouched
    assert out.dtype == np.float32 and image.max() == 1000  # the input is not modified


@pytest.mark.parametrize("shape", [(17, 18, 19), (53, 54)], ids=["3d", "2d"])
def test_histogram_clip_leaves_a_volume_without_outliers_unchanged(shape: tuple[int, ...]) -> None:
    from medmodal.data.preprocess import HistogramClip

    image = _steps(shape)
    clip = HistogramClip()
    assert clip.value(image) == 20.0  # the top bin holds value 20: its upper edge is the maximum
    np.testing.assert_array_equal(clip(image), image)
    # too few voxels in every bin: no clip at all
    assert HistogramClip(min_count=10**6).value(image) is None
    np.testing.assert_array_equal(HistogramClip(min_count=10**6)(image), image)


def test_histogram_clip_in_preprocess_case() -> None:
    from medmodal.data.preprocess import HistogramClip, zscore_foreground

    shape = (17, 18, 19)
    case = make_case(shape, affine=np.eye(4), present=("t1",))
    raw = _steps(shape, outliers=3)
    case.images["t1"] = Volume(raw, np.eye(4))
    plain, *_ = preprocess_case(case, ("t1",), target_spacing=None)
    clipped, _, _, geometry = preprocess_case(case, ("t1",), target_spacing=None, histogram_clip=HistogramClip())
    window = (slice(None), *(slice(a, b) for a, b in geometry.crop))
    np.testing.assert_allclose(clipped[0], zscore_foreground(np.minimum(raw, 20.98)[window[1:]]), atol=1e-5)
    assert plain[0].max() > 30 and clipped[0].max() < 2.5  # the outliers no longer squash the z-score
    with pytest.raises(ValueError, match="min_count"):
        HistogramClip(min_count=0)


def test_histogram_clip_is_recorded_and_repeated_by_predict(tmp_path) -> None:
    """A run trained with ``data.histogram_clip`` records it in run.json; the preprocessing that predict
    rebuilds from run.json gives the cached training arrays exactly (without it they differ)."""
    from medmodal.data.cache import CacheIndex
    from medmodal.data.io import read_case
    from medmodal.engine.cases import tiny_case_recipe
    from medmodal.engine.datamodule import resolve_source
    from medmodal.engine.recipe import recipe_from_dict
    from medmodal.engine.runinfo import load_run
    from medmodal.engine.train import train

    d = tiny_case_recipe(3, method={"name": "zero_fill"}, histogram_clip={"min_count": 5, "bins": 50})
    d["train"].update(max_steps=1, val_every_steps=1)
    run = load_run(train(recipe_from_dict(d), tmp_path / "run"))
    pre = run.info.preprocessing
    assert pre["histogram_clip"] == {"min_count": 5, "bins": 50} and "histogram bins" in pre["normalisation"]
    source = resolve_source(run.recipe.data)
    index = CacheIndex.load(source.cache_dir)
    info, records = source.records()
    record = next(r for r in records if r.case_id == index.cases[0].case_id)
    case = read_case(record, info)
    options = run.info.preprocessing_options()
    image, *_ = preprocess_case(case, source.modalities, **options)
    np.testing.assert_array_equal(image, np.asarray(index.cases[0].image()))
    unclipped, *_ = preprocess_case(case, source.modalities, target_spacing=None)
    assert not np.allclose(unclipped, image)
