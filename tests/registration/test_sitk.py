"""Pairwise registration (affine, B-spline, demons) and label warping on small phantom images."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from reg_helpers import FAST, dice, head_mask, mean_dice, tissue_label

from medmodal.data.case import Volume
from medmodal.data.io import read_image
from medmodal.data.phantom import make_phantom_case
from medmodal.registration import (
    RegistrationSettings,
    register_pair,
    transform_displacement,
    volume_to_image,
    warp_label,
)

IDENTITY = sitk.Transform(3, sitk.sitkIdentity)


def known_affine() -> sitk.AffineTransform:
    """Target → atlas points: a 2.5 mm shift, a 6° rotation about z and a little scaling."""
    angle = np.deg2rad(6.0)
    c, s = np.cos(angle), np.sin(angle)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((1.04 * c, -s, 0.0, s, 0.97 * c, 0.0, 0.0, 0.0, 1.02))
    transform.SetTranslation((2.5, -2.0, 1.5))
    return transform


@pytest.mark.parametrize("transform", ["affine", "bspline", "demons"])
def test_self_registration_is_the_identity(images, transform: str) -> None:
    result = register_pair(images["t1"], images["t1"], transform=transform, **FAST)
    moved = transform_displacement(result.transform, images["t1"])[head_mask(images["t1"])]
    assert moved.mean() < 0.1  # mm; voxels are 1 mm
    if transform != "demons":  # demons sees the histogram-matched copy, so it moves the edges a little
        assert moved.max() < 0.25
    warped = warp_label(images["label"], images["t1"], result.transform)
    assert np.array_equal(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(images["label"]))
    assert [s.name for s in result.stages] == ["affine"] + ([] if transform == "affine" else [transform])
    assert result.metric < -0.5 and result.seconds > 0


def test_known_affine_is_recovered_across_contrasts(images) -> None:
    truth = known_affine()
    target_t2 = sitk.Resample(images["t2"], images["t2"], truth, sitk.sitkLinear, 0.0)
    true_label = warp_label(images["tissue"], images["t2"], truth)
    result = register_pair(target_t2, images["t1"], transform="affine", **FAST)  # T1 atlas onto a T2 target
    before = mean_dice(warp_label(images["tissue"], target_t2, IDENTITY), true_label)
    after = mean_dice(warp_label(images["tissue"], target_t2, result.transform), true_label)
    assert after > 0.6 and after > before + 0.3, (before, after)
    error = sitk.CompositeTransform([truth.GetInverse(), result.transform])  # ~identity if recovered
    assert transform_displacement(error, target_t2)[head_mask(target_t2)].mean() < 1.0  # mm, sub-voxel


def test_bspline_recovers_a_smooth_deformation_better_than_affine(images) -> None:
    deformation = sitk.BSplineTransformInitializer(images["t2"], [3, 3, 3], order=3)
    deformation.SetParameters(np.random.default_rng(0).normal(0.0, 2.0, deformation.GetNumberOfParameters()).tolist())
    truth = sitk.CompositeTransform([known_affine(), deformation])
    target_t2 = sitk.Resample(images["t2"], images["t2"], truth, sitk.sitkLinear, 0.0)
    true_label = warp_label(images["tissue"], images["t2"], truth)
    scores = {}
    for transform in ("affine", "bspline"):
        result = register_pair(target_t2, images["t1c"], transform=transform, **FAST)
        scores[transform] = mean_dice(warp_label(images["tissue"], target_t2, result.transform), true_label)
    assert scores["bspline"] > scores["affine"] + 0.03, scores


def test_demons_registers_a_same_contrast_pair(images) -> None:
    truth = known_affine()
    target = sitk.Resample(images["t2"], images["t2"], truth, sitk.sitkLinear, 0.0)
    true_label = warp_label(images["tissue"], images["t2"], truth)
    result = register_pair(target, images["t2"], transform="demons", **FAST)
    before = mean_dice(warp_label(images["tissue"], target, IDENTITY), true_label)
    assert mean_dice(warp_label(images["tissue"], target, result.transform), true_label) > before + 0.3
    assert isinstance(result.transform, sitk.CompositeTransform)


def test_same_seed_same_result_and_the_seed_matters(images) -> None:
    moving = sitk.Resample(images["t1"], images["t1"], known_affine(), sitk.sitkLinear, 0.0)
    a = register_pair(images["t2"], moving, transform="bspline", seed=0, **FAST)  # SimpleITK's 0 is the clock
    b = register_pair(images["t2"], moving, transform="bspline", seed=0, **FAST)
    c = register_pair(images["t2"], moving, transform="bspline", seed=1, **FAST)
    field = [sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        r.transform, sitk.sitkVectorFloat64, images["t2"].GetSize(), images["t2"].GetOrigin(),
        images["t2"].GetSpacing(), images["t2"].GetDirection())) for r in (a, b, c)]
    assert np.array_equal(field[0], field[1]) and a.metric == b.metric
    assert not np.array_equal(field[0], field[2])


def test_labels_keep_their_values_and_pixel_type(case) -> None:
    label = tissue_label(seed=11, size=32)
    for pixel_type, dtype in ((sitk.sitkUInt8, np.uint8), (sitk.sitkInt16, np.int16)):
        image = volume_to_image(Volume(label, case.images["t1"].affine), pixel_type=pixel_type)
        warped = warp_label(image, image, known_affine())
        values = sitk.GetArrayFromImage(warped)
        assert warped.GetPixelID() == pixel_type and values.dtype == dtype
        assert set(np.unique(values).tolist()) == {0, 1, 2, 4}


def oblique_grid(reference: sitk.Image) -> sitk.Image:
    """An anisotropic (1 x 1.4 x 1.8 mm) grid, rotated 25° about z and 12° about x, covering ``reference``."""
    rotation = sitk.VersorTransform((0.0, 0.0, 1.0), np.deg2rad(25.0))
    tilt = sitk.VersorTransform((1.0, 0.0, 0.0), np.deg2rad(12.0))
    direction = (np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.asarray(tilt.GetMatrix()).reshape(3, 3))
    spacing = np.array([1.0, 1.4, 1.8])
    size = [36, 26, 20]
    centre = np.asarray(reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()]))
    origin = centre - direction @ (spacing * (np.array(size) - 1) / 2)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(origin.tolist())
    return grid


def test_warped_label_lands_on_an_oblique_anisotropic_target(images, tmp_path) -> None:
    grid = oblique_grid(images["t2"])
    shift = sitk.TranslationTransform(3, (2.0, -1.5, 1.0))
    target_image = sitk.Resample(images["t2"], grid, shift, sitk.sitkLinear, 0.0)
    sitk.WriteImage(target_image, str(tmp_path / "target_t2.nii.gz"))
    target = read_image(tmp_path / "target_t2.nii.gz")  # through medmodal's reader (nibabel, RAS affine)
    assert not np.allclose(target.affine[:3, :3], np.diag(np.diag(target.affine[:3, :3])))  # really oblique
    fixed = volume_to_image(target)
    assert np.allclose(fixed.GetDirection(), target_image.GetDirection(), atol=1e-5)
    assert np.allclose(fixed.GetOrigin(), target_image.GetOrigin(), atol=1e-4)
    assert np.allclose(fixed.GetSpacing(), target_image.GetSpacing(), atol=1e-5)

    true_label = warp_label(images["tissue"], grid, shift)
    result = register_pair(fixed, images["t1"], transform="affine", **FAST)
    warped = warp_label(images["tissue"], fixed, result.transform)
    assert warped.GetSize() == tuple(target.shape)
    before = mean_dice(warp_label(images["tissue"], fixed, IDENTITY), true_label)
    after = mean_dice(warped, true_label)
    assert after > 0.6 and after > before + 0.2, (before, after)


def test_volume_to_image_matches_simpleitks_own_reader(tmp_path) -> None:
    rotation = np.asarray(sitk.VersorTransform((0.3, 0.5, 0.8), 0.7).GetMatrix()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array([0.9, 1.2, 2.5])  # oblique, anisotropic, orthogonal axes
    affine[:3, 3] = (10.0, -20.0, 5.0)
    array = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    nib.save(nib.Nifti1Image(array, affine), tmp_path / "x.nii.gz")
    ours = volume_to_image(read_image(tmp_path / "x.nii.gz"))
    theirs = sitk.ReadImage(str(tmp_path / "x.nii.gz"))
    assert ours.GetSize() == theirs.GetSize()
    for index in ((0, 0, 0), (5, 4, 3), (2, 1, 3)):
        assert np.allclose(ours.TransformIndexToPhysicalPoint(index), theirs.TransformIndexToPhysicalPoint(index),
                           atol=1e-3)
        assert ours[index] == theirs[index]


def test_2d_images_register_in_their_plane() -> None:
    case = make_phantom_case(case_id="a", seed=5, spatial_dims=2, size=48)
    image = volume_to_image(case.images["t1"])
    label = volume_to_image(Volume(case.images["t1"].array > 0.3, case.images["t1"].affine), pixel_type=sitk.sitkUInt8)
    shift = sitk.TranslationTransform(2, (3.0, -2.0))
    target = sitk.Resample(volume_to_image(case.images["t2"]), image, shift, sitk.sitkLinear, 0.0)
    true_label = warp_label(label, image, shift)
    result = register_pair(target, image, transform="bspline", **FAST)
    assert image.GetDimension() == 2
    assert dice(warp_label(label, target, result.transform), true_label) > dice(label, true_label) + 0.05


def test_bad_settings_are_refused(images) -> None:
    with pytest.raises(ValueError, match="transform must be one of"):
        RegistrationSettings(transform="rigid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one entry per level"):
        RegistrationSettings(shrink_factors=(4, 2, 1), smoothing_sigmas=(1.0,))
    with pytest.raises(ValueError, match="sampling_percentage"):
        RegistrationSettings(sampling_percentage=0.0)
    with pytest.raises(TypeError):
        register_pair(images["t1"], images["t1"], learning_rate=1.0)
    flat = sitk.Image([32, 32], sitk.sitkFloat32)
    with pytest.raises(ValueError, match="2D image to a 3D image"):
        register_pair(images["t1"], flat)


@pytest.mark.parametrize("transform", ["bspline", "demons"])
def test_on_iteration_follows_every_stage(images, transform: str) -> None:
    """Progress of a long pair (issue 11, item 13): every optimiser iteration of every stage is reported, with
    its running count and the stage's upper bound."""
    events: list[tuple[str, int, int]] = []
    register_pair(images["t1"], images["t2" if transform == "bspline" else "t1"], transform=transform,
                  on_iteration=lambda *e: events.append(e), **FAST)
    stages = [s for s, _, _ in events]
    assert stages[0] == "affine" and stages[-1] == transform and set(stages) == {"affine", transform}
    for stage in ("affine", transform):
        done = [d for s, d, _ in events if s == stage]
        total = {t for s, _, t in events if s == stage}
        assert done == list(range(1, len(done) + 1))  # counted over the pyramid levels
        levels = len(FAST["shrink_factors"])
        per_level = {"affine": FAST["iterations"], "bspline": 4 * FAST["deformable_iterations"],  # evaluations
                     "demons": FAST["deformable_iterations"]}[stage]
        assert total == {per_level * levels} and done[-1] <= per_level * levels


def test_throttle_passes_the_first_last_and_spaced_events() -> None:
    from medmodal.registration.progress import Throttle

    got: list[tuple[str, int, int]] = []
    throttle = Throttle(lambda *e: got.append(e), interval_s=3600.0)
    for stage, n in (("affine", 50), ("bspline", 7)):
        for done in range(1, n + 1):
            throttle(stage, done, n)
    assert got == [("affine", 1, 50), ("affine", 50, 50), ("bspline", 1, 7), ("bspline", 7, 7)]
    every = Throttle(lambda *e: got.append(e), interval_s=0.0)
    got.clear()
    for done in range(1, 6):
        every("demons", done, 9)
    assert [d for _, d, _ in got] == [1, 2, 3, 4, 5]
