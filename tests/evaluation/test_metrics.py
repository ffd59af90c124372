"""binary_dice: the one two-mask Dice (MONAI underneath), its empty-mask conventions and its input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmodal.evaluation.metrics import binary_dice, region_metrics


def test_binary_dice_known_value_2d() -> None:
    a = np.zeros((4, 5), bool)
    b = np.zeros((4, 5), bool)
    a[0, 0:3] = True  # |A| = 3
    b[0, 1:3] = True  # |B| = 4, |A∩B| = 2
    b[1, 1:3] = True
    assert binary_dice(a, b) == pytest.approx(2 * 2 / (3 + 4), abs=1e-12)
    assert binary_dice(b, a) == pytest.approx(4 / 7, abs=1e-12)
    assert binary_dice(a, a) == 1.0
    assert binary_dice(a, ~a) == 0.0  # disjoint, both non-empty


def test_binary_dice_known_value_3d_numpy_and_torch() -> None:
    a = np.zeros((3, 4, 5), bool)
    b = np.zeros((3, 4, 5), bool)
    a[0:2, 0:2, 0:2] = True  # |A| = 8
    b[1:3, 0:2, 0:2] = True  # |B| = 8, |A∩B| = 4
    expected = 2 * 4 / (8 + 8)
    assert binary_dice(a, b) == pytest.approx(expected, abs=1e-12)
    assert binary_dice(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, abs=1e-12)
    assert binary_dice(torch.from_numpy(a), b) == pytest.approx(expected, abs=1e-12)
    # an integer label map: non-zero is foreground (callers pass ``label > 0`` to make that explicit)
    assert binary_dice(a.astype(np.uint8) * 3, b.astype(np.uint8)) == pytest.approx(expected, abs=1e-12)
    # views with negative strides work too
    assert binary_dice(a[::-1], b[::-1]) == pytest.approx(expected, abs=1e-12)


def test_binary_dice_exact_ratio() -> None:
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([1, 1, 0, 1, 0], bool)
    assert binary_dice(a, b) == 2 / 3  # computed in float64, not float32 (0.6666666865...)


def test_binary_dice_empty_masks() -> None:
    empty = np.zeros((3, 4), bool)
    full = np.ones((3, 4), bool)
    assert binary_dice(empty, empty) == 1.0
    assert binary_dice(empty, full) == 0.0
    assert binary_dice(full, empty) == 0.0
    assert binary_dice(torch.zeros(2, 2, 2, dtype=torch.bool), torch.zeros(2, 2, 2, dtype=torch.bool)) == 1.0


def test_binary_dice_refuses_different_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        binary_dice(np.zeros((3, 4), bool), np.zeros((4, 3), bool))
    with pytest.raises(ValueError, match="shapes"):
        binary_dice(np.zeros(12, bool), np.zeros((3, 4), bool))  # same size, different shape


def test_binary_dice_agrees_with_region_metrics() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 6, 7, 8)) < 0.4
    dice, _ = region_metrics(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])
    assert dice.shape == (1, 1)
    assert dice[0, 0] == pytest.approx(binary_dice(a, b), rel=1e-6)
    assert binary_dice(a, b) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-12)
