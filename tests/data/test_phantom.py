"""Tests of the procedural brain-tumour phantom (the embedded default data set)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medmodal.data.case import BRATS_LABELS, BRATS_MODALITIES, BRATS_REGIONS
from medmodal.data.formats import open_dataset
from medmodal.data.io import read_case
from medmodal.data.phantom import (
    PHANTOM_TISSUES,
    generate_phantom_cases,
    make_phantom_case,
    phantom_info,
    phantom_tissue_map,
    read_phantom_parameters,
    write_phantom,
)

SEEDS = (0, 1, 2, 3, 5, 8)


def _region(label: np.ndarray, name: str) -> np.ndarray:
    return np.isin(label, BRATS_REGIONS[name])


def _shell(mask: np.ndarray) -> np.ndarray:
    """The one-voxel layer just outside ``mask``."""
    return ndimage.binary_dilation(mask) & ~mask


@pytest.fixture(scope="module")
def cases_3d():
    return [make_phantom_case(case_id=f"c{s}", seed=s, size=40) for s in SEEDS]


@pytest.mark.parametrize(("spatial_dims", "size"), [(3, 24), (2, 48)])
def test_same_seed_is_bit_identical(spatial_dims, size):
    a = make_phantom_case(case_id="a", seed=7, spatial_dims=spatial_dims, size=size)
    b = make_phantom_case(case_id="a", seed=7, spatial_dims=spatial_dims, size=size)
    for m in BRATS_MODALITIES:
        np.testing.assert_array_equal(a.images[m].array, b.images[m].array)
        np.testing.assert_array_equal(a.images[m].affine, b.images[m].affine)
    np.testing.assert_array_equal(a.label.array, b.label.array)
    assert (a.target, a.report) == (b.target, b.report)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_different_seeds_differ(spatial_dims):
    a = make_phantom_case(case_id="a", seed=1, spatial_dims=spatial_dims, size=24)
    b = make_phantom_case(case_id="b", seed=2, spatial_dims=spatial_dims, size=24)
    assert not np.array_equal(a.label.array, b.label.array)
    assert not np.array_equal(a.images["flair"].array, b.images["flair"].array)


@pytest.mark.parametrize(
    ("spatial_dims", "size", "shape"),
    [(3, 24, (24, 24, 24)), (3, (17, 18, 19), (17, 18, 19)), (2, 48, (48, 48)), (2, (33, 31), (33, 31))],
)
def test_case_contents_and_grid(spatial_dims, size, shape):
    case = make_phantom_case(case_id="x", seed=4, spatial_dims=spatial_dims, size=size)
    assert case.case_id == "x"
    assert tuple(case.images) == BRATS_MODALITIES
    for volume in (*case.images.values(), case.label):
        assert volume.shape == shape
        assert volume.spacing == (1.0,) * spatial_dims
        np.testing.assert_allclose(np.diag(volume.affine)[:spatial_dims], 1.0)
        np.testing.assert_allclose(volume.affine, case.label.affine)
    for volume in case.images.values():
        assert volume.array.dtype == np.float32
        assert np.isfinite(volume.array).all()
        assert volume.array.min() >= 0.0
    assert case.label.array.dtype == np.uint8
    assert set(np.unique(case.label.array)) <= set(BRATS_LABELS)
    assert _region(case.label.array, "WT").any()
    assert case.target in (0, 1)
    # The grid is centred on the world origin.
    centre = case.label.affine @ np.array([*(np.array(shape) - 1) / 2.0, *[0.0] * (3 - spatial_dims), 1.0])
    np.testing.assert_allclose(centre[:spatial_dims], 0.0, atol=1e-9)


def test_2d_slice_matches_3d_anatomy():
    """The 2D case is the axial slice through the tumour centre of the same continuous phantom."""
    flat = make_phantom_case(case_id="a", seed=3, spatial_dims=2, size=40)
    volume = make_phantom_case(case_id="a", seed=3, spatial_dims=3, size=40)
    z_mm = flat.label.affine[2, 3]
    z_index = int(round((z_mm - volume.label.affine[2, 3]) / volume.label.affine[2, 2]))
    agreement = np.mean(flat.label.array == volume.label.array[:, :, z_index])
    assert agreement > 0.97
    assert _region(flat.label.array, "TC").any()


def test_regions_are_nested_with_oedema_around_the_core(cases_3d):
    for case in cases_3d:
        label = case.label.array
        wt, tc = _region(label, "WT"), _region(label, "TC")
        assert tc.any() and tc.sum() < wt.sum()
        # The core is wrapped in oedema: most of the layer around it is label 2 (the rest is CSF/cortex).
        assert np.mean(label[_shell(tc)] == 2) > 0.6
        necrosis, enhancing = label == 1, label == 4
        if case.target == 1:  # rim + central necrosis: the necrosis is mostly enclosed by the rim
            assert np.mean(label[_shell(necrosis)] == 4) > 0.6
        assert (necrosis | enhancing).sum() == tc.sum()


def test_contrasts_follow_brats_appearance(cases_3d):
    """Enhancing rim only on T1c, oedema brightest on FLAIR/T2, necrosis dark on T1 (measured on the images)."""
    white_matter = PHANTOM_TISSUES.index("white_matter")
    rims = 0
    for seed, case in zip(SEEDS, cases_3d, strict=True):
        label = case.label.array
        image = {m: case.images[m].array for m in BRATS_MODALITIES}
        wm = phantom_tissue_map(seed=seed, size=40) == white_matter
        wm = ndimage.binary_erosion(wm)  # away from partial-volume edges
        oedema, necrosis, enhancing = label == 2, label == 1, label == 4
        for m in ("flair", "t2"):
            assert image[m][oedema].mean() > 1.4 * image[m][wm].mean(), (case.case_id, m)
        assert image["flair"][oedema].mean() > image["t1"][oedema].mean() / image["t1"][wm].mean()
        if necrosis.sum() >= 10:
            assert image["t1"][necrosis].mean() < 0.7 * image["t1"][wm].mean()
        if enhancing.sum() >= 20:
            rims += 1
            around = _shell(enhancing) & (label > 0)
            contrast = {m: image[m][enhancing].mean() / image[m][around].mean() for m in BRATS_MODALITIES}
            assert contrast["t1c"] > 1.3
            assert contrast["t1c"] > contrast["t1"] + 0.3
            assert contrast["t1c"] > max(contrast["t2"], contrast["flair"]) + 0.3
    assert rims >= 2


def test_tissue_map_matches_label():
    tissue = phantom_tissue_map(seed=5, size=24)
    case = make_phantom_case(case_id="a", seed=5, size=24)
    to_label = {"necrosis": 1, "oedema": 2, "enhancing": 4}
    expected = np.zeros_like(case.label.array)
    for name, value in to_label.items():
        expected[tissue == PHANTOM_TISSUES.index(name)] = value
    np.testing.assert_array_equal(case.label.array, expected)


def test_anisotropic_spacing_keeps_physical_anatomy():
    iso = make_phantom_case(case_id="a", seed=2, size=48)
    aniso = make_phantom_case(case_id="a", seed=2, size=48, spacing=(1.0, 1.0, 3.0))
    assert aniso.label.shape == (48, 48, 16)
    for volume in (*aniso.images.values(), aniso.label):
        assert volume.spacing == (1.0, 1.0, 3.0)
        np.testing.assert_allclose(volume.affine[:3, :3], np.diag([1.0, 1.0, 3.0]))

    def whole_tumour_ml(case):
        return _region(case.label.array, "WT").sum() * np.prod(case.label.spacing) / 1000.0

    assert whole_tumour_ml(aniso) == pytest.approx(whole_tumour_ml(iso), rel=0.15)
    exact = make_phantom_case(case_id="a", seed=2, size=(40, 44, 15), spacing=(1.2, 1.0, 3.0))
    assert exact.label.shape == (40, 44, 15)
    assert exact.label.spacing == pytest.approx((1.2, 1.0, 3.0))


def test_class_balance_over_40_cases():
    targets = [case.target for case in generate_phantom_cases(cases=40, seed=0, size=32)]
    assert 0.3 <= np.mean(targets) <= 0.7


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_report_is_derived_from_the_label(spatial_dims):
    for case in generate_phantom_cases(cases=6, seed=1, spatial_dims=spatial_dims, size=32):
        report = case.report
        assert report.startswith("Synthetic phantom.")
        assert ("high-grade" in report) == (case.target == 1)
        voxels = _region(case.label.array, "WT").sum()
        if spatial_dims == 3:
            assert f"{voxels / 1000.0:.1f} mL" in report
        else:
            assert f"{voxels:.0f} mm²" in report
        x_index = np.argwhere(case.label.array > 0)[:, 0].mean()
        x_mm = case.label.affine[0, 0] * x_index + case.label.affine[0, 3]
        side = "right" if x_mm > 0 else "left"  # RAS: +x points to the subject's right
        assert side in report.lower() or "midline" in report.lower()


def test_generated_cases_are_named_and_independent_of_count():
    few = list(generate_phantom_cases(cases=2, seed=3, size=16))
    more = list(generate_phantom_cases(cases=3, seed=3, size=16))
    assert [c.case_id for c in more] == ["phantom_000", "phantom_001", "phantom_002"]
    np.testing.assert_array_equal(few[1].images["t1"].array, more[1].images["t1"].array)
    other = next(generate_phantom_cases(cases=1, seed=4, size=16))
    assert not np.array_equal(other.label.array, more[0].label.array)


def test_missing_rate_never_removes_every_modality():
    full = list(generate_phantom_cases(cases=5, seed=0, size=12))
    assert all(tuple(c.images) == BRATS_MODALITIES for c in full)
    imperfect = list(generate_phantom_cases(cases=30, seed=0, size=12, missing_rate=0.9))
    counts = [len(c.images) for c in imperfect]
    assert min(counts) >= 1 and max(counts) <= 4 and np.mean(counts) < 2
    for case in imperfect:
        assert list(case.images) == [m for m in BRATS_MODALITIES if m in case.images]  # order kept
        assert case.available(BRATS_MODALITIES).any()
    again = list(generate_phantom_cases(cases=30, seed=0, size=12, missing_rate=0.9))
    assert [tuple(c.images) for c in again] == [tuple(c.images) for c in imperfect]


def test_phantom_info_declares_synthetic_brats():
    info = phantom_info()
    assert info.synthetic is True
    assert info.modalities == BRATS_MODALITIES
    assert info.labels == BRATS_LABELS
    assert info.regions == BRATS_REGIONS
    assert phantom_info(name="tiny").name == "tiny"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spatial_dims": 4},
        {"size": (16, 16)},
        {"size": 4},
        {"spacing": (1.0, 1.0)},
        {"spacing": (1.0, 0.0, 1.0)},
        {"seed": -1},
        {"noise": -0.1},
    ],
)
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        make_phantom_case(**{"case_id": "a", "seed": 0, "size": 16, **kwargs})


def test_invalid_generation_arguments_fail_before_the_first_case():
    with pytest.raises(ValueError, match="missing_rate"):
        generate_phantom_cases(cases=1, missing_rate=1.0)
    with pytest.raises(ValueError, match="voxels"):
        generate_phantom_cases(cases=1, size=20, spacing=(1.0, 1.0, 3.0))


@pytest.mark.parametrize("layout", ["brats", "nnunet"])
def test_write_phantom_round_trip(tmp_path, layout):
    out = write_phantom(tmp_path / layout, cases=3, seed=1, size=17, layout=layout)
    assert "synthetic" in (out / "README.txt").read_text().lower()
    assert read_phantom_parameters(out) == {
        "version": 1, "cases": 3, "seed": 1, "spatial_dims": 3, "size": 17, "spacing": None,
        "missing_rate": 0.0, "layout": layout,
    }  # fmt: skip
    info, records = open_dataset(out)
    assert tuple(info.modalities) == BRATS_MODALITIES
    expected = {c.case_id: c for c in generate_phantom_cases(cases=3, seed=1, size=17)}
    assert len(records) == 3
    for record in records:
        case, original = read_case(record, info), expected[record.case_id]
        assert set(case.images) == set(BRATS_MODALITIES)
        for m in BRATS_MODALITIES:
            np.testing.assert_allclose(case.images[m].array, original.images[m].array, rtol=1e-6)
            np.testing.assert_allclose(case.images[m].affine, original.images[m].affine, atol=1e-5)
        np.testing.assert_array_equal(case.label.array, original.label.array)
        assert (case.target, case.report) == (original.target, original.report)


def test_read_phantom_parameters_without_readme(tmp_path):
    assert read_phantom_parameters(tmp_path) is None
