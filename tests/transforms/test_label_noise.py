"""Seeded label disturbances: deterministic per seed, regenerable from their parameters, and honest about Dice."""

from __future__ import annotations

import numpy as np
import pytest

from medmodal.evaluation.metrics import binary_dice
from medmodal.transforms.label_noise import (
    DISTURBANCE_KINDS,
    LabelDisturbance,
    apply_disturbance,
    disturb_label,
    flip_roll,
    label_seed,
    morph,
    sample_disturbance,
    shift,
)


def _blob(shape: tuple[int, ...]) -> np.ndarray:
    grid = np.indices(shape)
    centre = np.array(shape).reshape(-1, *[1] * len(shape)) * 0.45
    return ((grid - centre) ** 2).sum(0) <= (min(shape) * 0.25) ** 2


def _reference_dice(a: np.ndarray, b: np.ndarray) -> float:
    inter, total = np.sum(a & b), a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * inter / total)


@pytest.mark.parametrize("shape", [(17, 18), (17, 18, 19)])
def test_disturbances_are_deterministic_per_seed_and_report_the_true_dice(shape: tuple[int, ...]) -> None:
    mask = _blob(shape)
    a = disturb_label(mask, count=12, seed=3)
    b = disturb_label(mask, count=12, seed=3)
    c = disturb_label(mask, count=12, seed=4)
    assert all(np.array_equal(x.mask, y.mask) and x.disturbance == y.disturbance for x, y in zip(a, b, strict=True))
    assert any(x.disturbance != y.disturbance for x, y in zip(a, c, strict=True))
    for noisy in a:
        assert noisy.mask.shape == shape and noisy.mask.dtype == bool
        assert noisy.dice == pytest.approx(_reference_dice(noisy.mask, mask))
        again = apply_disturbance(mask, LabelDisturbance.from_dict(noisy.disturbance.to_dict()))
        assert np.array_equal(again, noisy.mask)  # regenerable from the logged parameters
    assert len({n.disturbance.kind for n in a}) >= 3
    assert min(n.dice for n in a) < 0.5 < max(n.dice for n in a)  # a spread of qualities


def test_label_seed_depends_only_on_its_key() -> None:
    mask = _blob((17, 18))
    first = disturb_label(mask, count=3, seed=label_seed(0, "case_a"))
    again = disturb_label(mask, count=3, seed=label_seed(0, "case_a"))
    other = disturb_label(mask, count=3, seed=label_seed(0, "case_b"))
    assert [n.disturbance for n in first] == [n.disturbance for n in again]
    assert [n.disturbance for n in first] != [n.disturbance for n in other]


def test_each_kind_does_what_it_says() -> None:
    mask = _blob((17, 18, 19))
    assert not apply_disturbance(mask, LabelDisturbance(kind="empty")).any()
    assert np.array_equal(apply_disturbance(mask, LabelDisturbance(kind="none")), mask)
    grown, shrunk = morph(mask, radius=2), morph(mask, radius=-2)
    assert (grown >= mask).all() and grown.sum() > mask.sum()
    assert (shrunk <= mask).all() and shrunk.sum() < mask.sum()
    moved = shift(mask, offset=(2, -1, 0))
    assert moved.sum() == mask.sum() and np.array_equal(moved[2:, :-1], mask[:-2, 1:])
    assert not shift(mask, offset=(40, 0, 0)).any()
    assert np.array_equal(flip_roll(mask, axis=1, offset=(1, 0, -2)),
                          np.roll(mask[:, ::-1], (1, 0, -2), axis=(0, 1, 2)))
    assert np.array_equal(apply_disturbance(mask, LabelDisturbance(kind="elastic", magnitude=0.0)), mask)
    warped = apply_disturbance(mask, LabelDisturbance(kind="elastic", magnitude=3.0, smoothness=2.0, seed=1))
    assert 0.3 < binary_dice(warped, mask) < 1.0


def test_empty_labels_score_zero_and_two_empty_masks_agree() -> None:
    mask = _blob((17, 18))
    (noisy,) = disturb_label(mask, count=1, seed=0, kinds=["empty"])
    assert noisy.dice == 0.0 and not noisy.mask.any()
    assert binary_dice(np.zeros((3, 4), bool), np.zeros((3, 4), bool)) == 1.0


def test_bad_inputs_are_refused() -> None:
    mask = _blob((17, 18))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kinds"):
        sample_disturbance(rng, mask, kinds=["rotate"])
    with pytest.raises(ValueError, match="unknown disturbance"):
        apply_disturbance(mask, LabelDisturbance(kind="rotate"))
    with pytest.raises(ValueError, match="count"):
        disturb_label(mask, count=0, seed=0)
    with pytest.raises(ValueError, match="shapes"):
        binary_dice(mask, mask[:-1])
    with pytest.raises(ValueError, match="offset"):
        shift(mask, offset=(1,))
    assert set(DISTURBANCE_KINDS) == {"elastic", "morph", "shift", "flip_roll", "empty"}
