"""Tiny synthetic raters for the fusion tests: a smooth blob truth and raters with known flip rates."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest


def _blob(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    centre = rng.uniform(-0.2, 0.2, len(shape))
    radii = rng.uniform(0.5, 0.8, len(shape))
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) < 1.0


def _raters(truth: np.ndarray, rates: list[tuple[float, float]], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for sensitivity, specificity in rates:
        r = rng.random(truth.shape)
        out.append(np.where(truth, r < sensitivity, r < 1.0 - specificity))
    return np.stack(out).astype(np.uint8)


@pytest.fixture
def blob() -> Callable[..., np.ndarray]:
    """``blob(shape, seed=0)``: a smooth random ellipsoid (bool) covering part of ``shape``."""
    return lambda shape, seed=0: _blob(tuple(shape), seed)


@pytest.fixture
def noisy_raters() -> Callable[..., np.ndarray]:
    """``noisy_raters(truth, [(sensitivity, specificity), ...], seed=1)`` → ``(K, *S)`` uint8 masks."""
    return lambda truth, rates, seed=1: _raters(truth, rates, seed)


@pytest.fixture
def raters3() -> tuple[np.ndarray, np.ndarray]:
    """A 17×18×19 blob truth and 3 raters of different quality: ``(truth, (3, 17, 18, 19) uint8)``."""
    truth = _blob((17, 18, 19), 0)
    return truth, _raters(truth, [(0.95, 0.97), (0.85, 0.9), (0.9, 0.8)], 1)
