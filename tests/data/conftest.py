"""Tiny in-memory cases for the I/O, format and check tests (odd shapes, oblique anisotropic grids)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from medmodal.data.case import BRATS_MODALITIES, Case, DatasetInfo, Volume


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def io_oblique_affine() -> np.ndarray:
    """A rotated grid with anisotropic spacing (0.8, 1.2, 3.0) mm and a non-zero origin."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.2, -0.35, 0.5) @ np.diag([0.8, 1.2, 3.0])
    affine[:3, 3] = [-12.5, 7.25, 30.0]
    return affine


@pytest.fixture
def io_brats_info() -> DatasetInfo:
    return DatasetInfo(name="tiny-brats", modalities=BRATS_MODALITIES)


@pytest.fixture
def io_make_case(io_oblique_affine: np.ndarray) -> Callable[..., Case]:
    """Factory: ``io_make_case(case_id, shape=(7, 9, 11), missing=(), labelled=True, target=None, report=None)``
    → a case with random float32 images and a label holding {0, 1, 2, 4}."""

    def make(
        case_id: str,
        *,
        shape: Sequence[int] = (7, 9, 11),
        missing: Sequence[str] = (),
        labelled: bool = True,
        target: int | None = None,
        report: str | None = None,
        seed: int = 0,
    ) -> Case:
        rng = np.random.default_rng(seed)
        images = {
            m: Volume(rng.normal(size=shape).astype(np.float32), io_oblique_affine)
            for m in BRATS_MODALITIES
            if m not in missing
        }
        label = None
        if labelled:
            values = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=shape)
            values.flat[:4] = [0, 1, 2, 4]  # every label present
            label = Volume(values, io_oblique_affine)
        return Case(case_id, images, label=label, target=target, report=report)

    return make


def assert_same_case(a: Case, b: Case) -> None:
    """Arrays, affines (to NIfTI's float32 precision), label values, target and report are equal."""
    assert a.case_id == b.case_id
    assert sorted(a.images) == sorted(b.images)
    for name, vol in a.images.items():
        np.testing.assert_array_equal(vol.array, b.images[name].array)
        np.testing.assert_allclose(vol.affine, b.images[name].affine, atol=1e-5)
    assert (a.label is None) == (b.label is None)
    if a.label is not None and b.label is not None:
        np.testing.assert_array_equal(a.label.array, b.label.array)
        np.testing.assert_allclose(a.label.affine, b.label.affine, atol=1e-5)
    assert (a.target, a.report) == (b.target, b.report)


@pytest.fixture
def io_assert_same_case() -> Callable[[Case, Case], None]:
    return assert_same_case


@pytest.fixture(scope="session")
def real_images() -> ModuleType:
    """``benchmarks/real_images.py`` (a script, not a package; ``src/`` never imports it), loaded once."""
    name = "benchmarks_real_images"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "real_images.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]
