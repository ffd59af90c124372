"""Settings of a pairwise registration, and the multi-resolution pyramid they give for a fixed image.

See :mod:`medmodal.registration.sitk` for the stages these settings drive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

__all__ = ["TRANSFORMS", "RegistrationSettings", "pyramid"]

#: The deformation models :func:`register_pair` knows (each starts with the affine stage).
TRANSFORMS: tuple[str, ...] = ("affine", "bspline", "demons")
#: The coarsest pyramid level keeps at least this many voxels along the fixed image's shortest axis.
_MIN_LEVEL_SIZE = 8
#: Each level's Mattes MI samples at least this many voxels (or all of them).
_MIN_SAMPLES = 2048


@dataclass(frozen=True, kw_only=True)
class RegistrationSettings:
    """Every option of :func:`register_pair`, with the defaults used by ``medmodal register``.

    The defaults register a 48³ pair in a few seconds on one core; raise the iterations and the sampling for
    large real scans if accuracy matters more than time.

    Args:
        transform: ``"affine"``, ``"bspline"`` (affine then B-spline, works across contrasts) or ``"demons"``
            (affine then demons, same contrast only).
        shrink_factors: image down-sampling factor per resolution level, coarse to fine (capped so the coarsest
            level keeps 8 voxels along the fixed image's shortest axis).
        smoothing_sigmas: Gaussian smoothing per level, in voxels of the full-resolution image.
        iterations: most optimiser iterations per level of the affine stage.
        deformable_iterations: most iterations per level of the B-spline (L-BFGS-B) or demons stage.
        bspline_levels: how many of the finest levels the B-spline stage runs on (it starts from the affine
            result, so the coarsest levels add time but little accuracy).
        sampling_percentage: fraction of the fixed image's voxels (randomly sampled, seeded) that the Mattes MI
            uses at each level (at least 2048 voxels, or all, at coarse levels).
        histogram_bins: joint-histogram bins of the Mattes MI.
        bspline_spacing_mm: B-spline control-point spacing in mm; ``None`` = a quarter of the fixed image's
            shortest physical extent (the mesh size follows from the physical size of each axis).
        demons_sigma: Gaussian smoothing of the demons displacement field (mm), the demons' regulariser.
        init: centre the initial transform on the intensity centres of mass (``"moments"``) or on the grid
            centres (``"geometry"``).
        seed: seed of the metric sampling; the same seed gives the same result.
    """

    transform: Literal["affine", "bspline", "demons"] = "bspline"
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: int = 100
    deformable_iterations: int = 10
    bspline_levels: int = 2
    sampling_percentage: float = 0.1
    histogram_bins: int = 32
    bspline_spacing_mm: float | None = None
    demons_sigma: float = 1.5
    init: Literal["moments", "geometry"] = "moments"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shrink_factors", tuple(int(f) for f in self.shrink_factors))
        object.__setattr__(self, "smoothing_sigmas", tuple(float(s) for s in self.smoothing_sigmas))
        problems = []
        if self.transform not in TRANSFORMS:
            problems.append(f"transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")
        if not self.shrink_factors or len(self.shrink_factors) != len(self.smoothing_sigmas):
            problems.append("shrink_factors and smoothing_sigmas need one entry per level, and at least one level")
        if any(f < 1 for f in self.shrink_factors) or any(s < 0 for s in self.smoothing_sigmas):
            problems.append("shrink factors must be >= 1 and smoothing sigmas >= 0")
        if self.iterations < 1 or self.deformable_iterations < 1 or self.bspline_levels < 1:
            problems.append("iterations, deformable_iterations and bspline_levels must be >= 1")
        if not 0.0 < self.sampling_percentage <= 1.0:
            problems.append(f"sampling_percentage must be in (0, 1], got {self.sampling_percentage}")
        if self.histogram_bins < 4:
            problems.append(f"histogram_bins must be >= 4, got {self.histogram_bins}")
        if self.bspline_spacing_mm is not None and self.bspline_spacing_mm <= 0:
            problems.append(f"bspline_spacing_mm must be positive, got {self.bspline_spacing_mm}")
        if self.demons_sigma <= 0:
            problems.append(f"demons_sigma must be positive, got {self.demons_sigma}")
        if self.init not in ("moments", "geometry"):
            problems.append(f"init must be 'moments' or 'geometry', got {self.init!r}")
        if self.seed < 0:
            problems.append(f"seed must be non-negative, got {self.seed}")
        if problems:
            raise ValueError("registration settings: " + "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}



def pyramid(
    image: sitk.Image, settings: RegistrationSettings, *, deformable: bool = False
) -> tuple[list[int], list[float], list[float]]:
    """Shrink factors, smoothing sigmas and sampling fractions per level for the fixed ``image``.

    ``deformable=True`` keeps only the ``settings.bspline_levels`` finest levels (for the B-spline stage).

    A shrink factor is capped so the coarse image keeps at least :data:`_MIN_LEVEL_SIZE` voxels along its
    shortest axis, and each level samples at least :data:`_MIN_SAMPLES` voxels (or all of them): a mutual
    information estimated from a few hundred samples is noise.
    """
    shortest = min(image.GetSize())
    factors = [max(1, min(f, shortest // _MIN_LEVEL_SIZE)) for f in settings.shrink_factors]
    sigmas = list(settings.smoothing_sigmas)
    if deformable:
        factors, sigmas = factors[-settings.bspline_levels:], sigmas[-settings.bspline_levels:]
    voxels = [float(np.prod([max(1, n // f) for n in image.GetSize()])) for f in factors]
    sampling = [min(1.0, max(settings.sampling_percentage, _MIN_SAMPLES / v)) for v in voxels]
    return factors, sigmas, sampling
