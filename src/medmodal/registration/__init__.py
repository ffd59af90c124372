"""Labels from registration: register labelled atlases onto unlabelled targets with SimpleITK.

:mod:`medmodal.registration.sitk` registers one pair (affine, then B-spline or demons) and warps a label;
:func:`medmodal.registration.atlases.register_atlases` runs every atlas x target pair of two data sets in parallel.
"""

from __future__ import annotations

from medmodal.registration.multi_atlas import MANIFEST_COLUMNS, PairResult, read_manifest_rows
from medmodal.registration.sitk import (
    TRANSFORMS,
    RegistrationResult,
    RegistrationSettings,
    StageInfo,
    final_metric,
    register_pair,
    transform_displacement,
    volume_to_image,
    warp_label,
)

__all__ = [
    "MANIFEST_COLUMNS",
    "TRANSFORMS",
    "PairResult",
    "RegistrationResult",
    "RegistrationSettings",
    "StageInfo",
    "final_metric",
    "read_manifest_rows",
    "register_pair",
    "transform_displacement",
    "volume_to_image",
    "warp_label",
]
