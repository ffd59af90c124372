"""Small phantom images shared by the registration tests."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
from reg_helpers import tissue_label

from medmodal.data.case import Case, Volume
from medmodal.data.phantom import make_phantom_case
from medmodal.registration import volume_to_image


@pytest.fixture(scope="session")
def case() -> Case:
    """One 32³ phantom case (four contrasts and a BraTS label 0/1/2/4)."""
    return make_phantom_case(case_id="atlas", seed=11, size=32)


@pytest.fixture(scope="session")
def images(case: Case) -> dict[str, sitk.Image]:
    """The case's contrasts, its tumour label (``"label"``) and tissue label (``"tissue"``: CSF 1, grey matter 2,
    white matter 4) as SimpleITK images (labels uint8)."""
    out = {m: volume_to_image(v) for m, v in case.images.items()}
    out["label"] = volume_to_image(case.label, pixel_type=sitk.sitkUInt8)
    tissue = Volume(tissue_label(seed=11, size=32), case.images["t1"].affine)
    out["tissue"] = volume_to_image(tissue, pixel_type=sitk.sitkUInt8)
    return out

