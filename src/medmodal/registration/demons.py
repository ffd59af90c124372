"""Multi-resolution symmetric-forces demons on two images that already share one grid.

Demons (Thirion, *Image matching as a diffusion process: an analogy with Maxwell's demons*, MedIA 1998)
moves each voxel along the intensity-difference gradient and regularises the displacement field by Gaussian
smoothing; the symmetric-forces variant uses the mean of both images' gradients (Vercauteren et al.,
*Diffeomorphic demons*, NeuroImage 2009). It compares intensities directly, so both images must show the
**same contrast** (histogram-match them first). The pyramid here runs coarse to fine, each level starting
from the previous level's field resampled onto its grid.
"""

from __future__ import annotations

import SimpleITK as sitk

from medmodal.registration.progress import IterationCallback, add_iteration_command

__all__ = ["demons_field"]


def _level(image: sitk.Image, shrink: int, sigma_voxels: float) -> sitk.Image:
    """``image`` smoothed by ``sigma_voxels`` (of its own spacing) and down-sampled by ``shrink``."""
    if sigma_voxels > 0:
        image = sitk.SmoothingRecursiveGaussian(image, [sigma_voxels * s for s in image.GetSpacing()])
    return sitk.Shrink(image, [shrink] * image.GetDimension()) if shrink > 1 else image


def _zero_field(reference: sitk.Image) -> sitk.Image:
    field = sitk.Image(reference.GetSize(), sitk.sitkVectorFloat64, reference.GetDimension())
    field.CopyInformation(reference)
    return field


def demons_field(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    shrink_factors: tuple[int, ...],
    smoothing_sigmas: tuple[float, ...],
    iterations: int,
    sigma_mm: float,
    threads: int | None = None,
    on_iteration: IterationCallback | None = None,
) -> tuple[sitk.Image, float, int]:
    """Displacement field (mm, on ``fixed``'s grid) such that ``moving(x + d(x))`` matches ``fixed(x)``.

    Args:
        fixed, moving: float images on the same grid and with the same contrast.
        shrink_factors, smoothing_sigmas: the pyramid, coarse to fine (sigmas in voxels).
        iterations: demons iterations per level.
        sigma_mm: Gaussian smoothing of the displacement field after every iteration (mm).
        threads: SimpleITK threads of the demons filter (``None``: default).
        on_iteration: called as ``on_iteration("demons", done, total)`` after every iteration (``done`` counts
            over all levels, ``total`` is ``iterations × levels``).

    Returns:
        ``(field, metric, iterations)``: a ``sitkVectorFloat64`` field on ``fixed``'s full grid, the final mean
        squared intensity difference and the iterations run at the last level.
    """
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(sigma_mm)
    demons.SetSmoothDisplacementField(True)
    demons.SetSmoothUpdateField(False)
    if threads is not None:
        demons.SetNumberOfThreads(max(1, int(threads)))
    if on_iteration is not None:
        add_iteration_command(demons, on_iteration, stage="demons", total=iterations * len(shrink_factors))
    field: sitk.Image | None = None
    for shrink, sigma in zip(shrink_factors, smoothing_sigmas, strict=True):
        level_fixed = _level(fixed, shrink, sigma)
        level_moving = _level(moving, shrink, sigma)
        if field is None:
            initial = _zero_field(level_fixed)
        else:
            initial = sitk.Resample(field, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                    sitk.sitkVectorFloat64)
        field = demons.Execute(level_fixed, level_moving, initial)
    assert field is not None  # at least one level (checked by the settings)
    if field.GetSize() != fixed.GetSize():
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return sitk.Cast(field, sitk.sitkVectorFloat64), float(demons.GetMetric()), int(demons.GetElapsedIterations())
