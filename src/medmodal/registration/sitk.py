"""Pairwise image registration with SimpleITK: affine, then B-spline or demons, multi-resolution.

A registration maps points of the **fixed** image (the target, whose grid the result lives on) to points of
the **moving** image (the atlas): ``moving_point = transform.TransformPoint(fixed_point)``. Resampling the
atlas label through that transform onto the target grid (:func:`warp_label`) puts the atlas label on the
target, in physical (LPS, mm) space, so oblique, anisotropic and differently oriented grids just work.

Stages (:func:`register_pair`):

1. **Initialisation**: a centred affine transform that aligns the intensity centres of mass (``init="moments"``)
   or the grid centres (``init="geometry"``).
2. **Affine**: Mattes mutual information (Mattes et al., *PET-CT image registration in the chest using free-form
   deformations*, IEEE TMI 2003) with a regular-step gradient descent, multi-resolution. Mutual information
   compares intensity *distributions*, so an atlas T1c registers to a target T2.
3. **Deformable**, on top of the affine:

   * ``"bspline"`` (default): a cubic B-spline free-form deformation (Rueckert et al., *Nonrigid registration
     using free-form deformations: application to breast MR images*, IEEE TMI 1999) whose control-point
     spacing is set in millimetres, optimised with L-BFGS-B on the same Mattes MI, multi-resolution. Works
     across contrasts.
   * ``"demons"``: symmetric-forces demons (Thirion, *Image matching as a diffusion process*, MedIA 1998;
     Vercauteren et al., *Diffeomorphic demons*, NeuroImage 2009) on the affinely resampled atlas after
     histogram matching to the target. Demons minimises an intensity *difference*, so it assumes the **same
     contrast** on both sides; histogram matching only fixes global intensity scaling. Use it for mono-modal
     pairs; keep B-spline for cross-contrast pairs.
   * ``"affine"``: stop after stage 2.

Every random choice (metric sampling) is seeded, so a registration with the same inputs, settings, seed and
thread count is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from medmodal.data.case import Volume
from medmodal.registration.demons import demons_field
from medmodal.registration.progress import IterationCallback, add_iteration_command
from medmodal.registration.settings import TRANSFORMS, RegistrationSettings, pyramid

__all__ = [
    "TRANSFORMS",
    "RegistrationResult",
    "RegistrationSettings",
    "StageInfo",
    "final_metric",
    "register_pair",
    "transform_displacement",
    "volume_to_image",
    "warp_label",
]

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS on the rotation/translation part


@dataclass(frozen=True)
class StageInfo:
    """What one stage of a registration did.

    Attributes:
        name: ``"affine"``, ``"bspline"`` or ``"demons"``.
        metric: the optimiser's final metric value (Mattes MI for affine/B-spline, mean squared difference for
            demons).
        iterations: iterations at the last level.
        stop: the optimiser's stop condition, as text.
        seconds: wall time of the stage.
    """

    name: str
    metric: float
    iterations: int
    stop: str
    seconds: float


@dataclass
class RegistrationResult:
    """The outcome of :func:`register_pair`.

    Attributes:
        transform: fixed → moving point mapping, the composite ``affine ∘ deformable`` (the deformable part is
            applied to a fixed point first); an affine transform alone for ``transform="affine"``.
        metric: Mattes mutual information of the two images through ``transform``, evaluated on every voxel of
            the fixed image at full resolution. SimpleITK reports MI **negated, so lower is better** (about 0
            for unrelated images, more negative for better alignment); comparable between pairs with the same
            fixed image.
        seconds: wall time of the whole registration.
        stages: one :class:`StageInfo` per stage.
        settings: the settings used.
    """

    transform: sitk.Transform
    metric: float
    seconds: float
    stages: tuple[StageInfo, ...] = ()
    settings: RegistrationSettings = field(default_factory=RegistrationSettings)


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` SimpleITK threads inside the block (``None``: leave the default alone)."""
    if threads is None:
        yield
        return
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def volume_to_image(volume: Volume, *, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """A medmodal :class:`Volume` (RAS+ affine, ``(X, Y[, Z])`` array) as a SimpleITK image (LPS+).

    A 2D volume becomes a 2D image in its own plane (the in-plane rows of its affine). ``pixel_type`` casts
    the voxels (``sitk.sitkUInt8`` etc. for labels; ``sitk.sitkUnknown`` keeps the array's dtype).
    """
    dims = volume.array.ndim
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose()))
    lps = _LPS @ volume.affine[:3, :]
    matrix = lps[:dims, :dims]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing == 0):
        raise ValueError(f"{volume.where}: the affine has a zero-length voxel axis")
    image.SetSpacing(spacing.tolist())
    image.SetDirection((matrix / spacing).ravel().tolist())
    image.SetOrigin(lps[:dims, 3].tolist())
    return image if pixel_type == sitk.sitkUnknown else sitk.Cast(image, pixel_type)


def _method(
    fixed: sitk.Image, settings: RegistrationSettings, *, threads: int | None, deformable: bool = False
) -> sitk.ImageRegistrationMethod:
    """A Mattes-MI registration method with the settings' pyramid and seeded random sampling."""
    factors, sigmas, sampling = pyramid(fixed, settings, deformable=deformable)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock": shift by one so every seed is fixed.
    reg.SetMetricSamplingPercentagePerLevel(sampling, settings.seed + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(factors)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if threads is not None:
        reg.SetNumberOfThreads(max(1, int(threads)))
    return reg


def _stage(name: str, reg: sitk.ImageRegistrationMethod, start: float) -> StageInfo:
    return StageInfo(name, float(reg.GetMetricValue()), int(reg.GetOptimizerIteration()),
                     reg.GetOptimizerStopConditionDescription(), time.perf_counter() - start)


def _affine_stage(
    fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings, threads: int | None,
    on_iteration: IterationCallback | None = None,
) -> tuple[sitk.Transform, StageInfo]:
    start = time.perf_counter()
    mode = (sitk.CenteredTransformInitializerFilter.MOMENTS if settings.init == "moments"
            else sitk.CenteredTransformInitializerFilter.GEOMETRY)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(fixed.GetDimension()), mode)
    reg = _method(fixed, settings, threads=threads)
    step = min(fixed.GetSpacing())  # step lengths in mm of point motion (physical-shift scales)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0 * step, minStep=1e-3 * step, numberOfIterations=settings.iterations,
        relaxationFactor=0.8, gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(initial, inPlace=True)
    if on_iteration is not None:
        levels = len(pyramid(fixed, settings)[0])
        add_iteration_command(reg, on_iteration, stage="affine", total=settings.iterations * levels)
    reg.Execute(fixed, moving)
    return sitk.AffineTransform(initial), _stage("affine", reg, start)


def _bspline_mesh(fixed: sitk.Image, spacing_mm: float | None) -> list[int]:
    extent = [n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)]
    spacing_mm = min(extent) / 4.0 if spacing_mm is None else spacing_mm
    return [max(1, int(round(e / spacing_mm))) for e in extent]


def _bspline_stage(
    fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, settings: RegistrationSettings,
    threads: int | None, on_iteration: IterationCallback | None = None,
) -> tuple[sitk.Transform, StageInfo]:
    start = time.perf_counter()
    bspline = sitk.BSplineTransformInitializer(fixed, _bspline_mesh(fixed, settings.bspline_spacing_mm), order=3)
    reg = _method(fixed, settings, threads=threads, deformable=True)
    reg.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5, numberOfIterations=settings.deformable_iterations,
        maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * settings.deformable_iterations,
        costFunctionConvergenceFactor=1e7,
    )
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    if on_iteration is not None:
        levels = len(pyramid(fixed, settings, deformable=True)[0])
        # L-BFGS-B reports an event per line-search step: bound by its function evaluations, not its iterations
        add_iteration_command(reg, on_iteration, stage="bspline", total=4 * settings.deformable_iterations * levels)
    reg.Execute(fixed, moving)
    return sitk.BSplineTransform(bspline), _stage("bspline", reg, start)


def _demons_stage(
    fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, settings: RegistrationSettings,
    threads: int | None, on_iteration: IterationCallback | None = None,
) -> tuple[sitk.Transform, StageInfo]:
    start = time.perf_counter()
    resampled = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    matched = sitk.HistogramMatching(resampled, fixed, numberOfHistogramLevels=256, numberOfMatchPoints=15,
                                     thresholdAtMeanIntensity=True)
    factors, sigmas, _ = pyramid(fixed, settings)
    displacement, metric, iterations = demons_field(
        fixed, matched, shrink_factors=tuple(factors), smoothing_sigmas=tuple(sigmas),
        iterations=settings.deformable_iterations, sigma_mm=settings.demons_sigma, threads=threads,
        on_iteration=on_iteration,
    )
    info = StageInfo("demons", metric, iterations, "demons: fixed number of iterations per level",
                     time.perf_counter() - start)
    return sitk.DisplacementFieldTransform(displacement), info


def final_metric(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, *, bins: int = 32, threads: int | None = None
) -> float:
    """Mattes MI (negated: lower is better) of ``moving`` through ``transform`` on every voxel of ``fixed``."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetMovingInitialTransform(transform)
    reg.SetInitialTransform(sitk.TranslationTransform(fixed.GetDimension()))
    if threads is not None:
        reg.SetNumberOfThreads(max(1, int(threads)))
    return float(reg.MetricEvaluate(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)))


def register_pair(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    settings: RegistrationSettings | None = None,
    threads: int | None = None,
    on_iteration: IterationCallback | None = None,
    **options: Any,
) -> RegistrationResult:
    """Register ``moving`` (the atlas image) onto ``fixed`` (the target image).

    Args:
        fixed: the target image; the transform is defined on its physical space.
        moving: the atlas image, any contrast, grid, orientation or voxel size (same number of dimensions).
        settings: a :class:`RegistrationSettings`; default ``RegistrationSettings()``.
        threads: SimpleITK threads for this registration (``None``: SimpleITK's default, all cores).
        on_iteration: called as ``on_iteration(stage, done, total)`` at every optimiser iteration (see
            :mod:`medmodal.registration.progress`; wrap it in a :class:`~medmodal.registration.progress.Throttle`
            to forward only a few).
        **options: fields of :class:`RegistrationSettings` that override ``settings``, e.g.
            ``transform="affine"``, ``iterations=50``, ``shrink_factors=(2, 1)``, ``smoothing_sigmas=(1, 0)``,
            ``sampling_percentage=0.2``, ``seed=1``. An unknown name is a ``TypeError``.

    Returns:
        A :class:`RegistrationResult`: the fixed → moving transform (composite affine ∘ deformable), the final
        Mattes MI (negated, lower is better), the wall time and per-stage information.

    Raises:
        ValueError: bad settings, or images with different numbers of dimensions.
        RuntimeError: SimpleITK failed (e.g. the images do not overlap).
    """
    settings = replace(settings or RegistrationSettings(), **options)
    if fixed.GetDimension() != moving.GetDimension():
        raise ValueError(f"cannot register a {moving.GetDimension()}D image to a {fixed.GetDimension()}D image")
    start = time.perf_counter()
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    with _threads(threads):
        affine, affine_info = _affine_stage(fixed, moving, settings, threads, on_iteration)
        stages = [affine_info]
        transform: sitk.Transform = affine
        if settings.transform != "affine":
            stage = _bspline_stage if settings.transform == "bspline" else _demons_stage
            deformable, info = stage(fixed, moving, affine, settings, threads, on_iteration)
            stages.append(info)
            transform = sitk.CompositeTransform([affine, deformable])  # applied last to first: affine(def(x))
        metric = final_metric(fixed, moving, transform, bins=settings.histogram_bins, threads=threads)
    return RegistrationResult(transform=transform, metric=metric, seconds=time.perf_counter() - start,
                              stages=tuple(stages), settings=settings)


def warp_label(label: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Resample the atlas ``label`` onto ``reference``'s grid through ``transform`` (reference → label points).

    Nearest-neighbour interpolation, so the label values and the pixel type are kept; voxels that map outside
    the label get 0 (background).
    """
    return sitk.Resample(label, reference, transform, sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def transform_displacement(transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """Length (mm) of ``transform(x) - x`` at every voxel centre ``x`` of ``reference``, as a numpy array."""
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(),
        reference.GetDirection(),
    )
    return np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1)
