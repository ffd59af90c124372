"""The region loss's switches (``shared/methods/shaspec.md`` §2.3): BCE summed or averaged over the region
channels, a Dice per sample or over the batch, and its smoothing; the defaults are the released ShaSpec loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmodal.losses.segmentation import RegionDiceBCELoss

SHAPES = {2: (17, 18), 3: (9, 10, 11)}


def _inputs(dims: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(batch, 3, *SHAPES[dims], generator=g)
    target = (torch.rand(batch, 3, *SHAPES[dims], generator=g) > 0.6).float()
    target[1, 2] = 0  # sample 1 has an empty ET channel
    return logits, target


def _spec_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spec §2.3: per sample and channel 1 - 2Σ(p·t) / (Σp + Σt + 1), averaged over samples and channels."""
    p, axes = logits.sigmoid(), tuple(range(2, logits.ndim))
    return (1 - 2 * (p * target).sum(axes) / (p.sum(axes) + target.sum(axes) + 1)).mean()


@pytest.mark.parametrize("dims", [2, 3])
def test_defaults_are_the_released_shaspec_loss(dims: int) -> None:
    logits, target = _inputs(dims)
    bce = sum(F.binary_cross_entropy_with_logits(logits[:, c], target[:, c]) for c in range(3))
    expected = _spec_dice(logits, target) + bce
    torch.testing.assert_close(RegionDiceBCELoss()(logits, target), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_bce_sum_is_three_times_the_mean_over_three_regions(dims: int) -> None:
    logits, target = _inputs(dims)
    summed = RegionDiceBCELoss(lambda_dice=0.0, bce_reduction="sum")(logits, target)
    mean = RegionDiceBCELoss(lambda_dice=0.0, bce_reduction="mean")(logits, target)
    torch.testing.assert_close(summed, 3 * mean)
    torch.testing.assert_close(mean, F.binary_cross_entropy_with_logits(logits, target))  # the old rule


@pytest.mark.parametrize("dims", [2, 3])
def test_per_sample_dice_differs_from_batch_dice_when_one_sample_is_empty(dims: int) -> None:
    logits, target = _inputs(dims)
    sample = RegionDiceBCELoss(lambda_bce=0.0)(logits, target)
    batch = RegionDiceBCELoss(lambda_bce=0.0, dice_reduction="batch")(logits, target)
    torch.testing.assert_close(sample, _spec_dice(logits, target), atol=1e-6, rtol=1e-6)
    p, axes = logits.sigmoid(), (0, *range(2, logits.ndim))  # one Dice per channel over the whole batch
    expected_batch = (1 - 2 * (p * target).sum(axes) / (p.sum(axes) + target.sum(axes) + 1)).mean()
    torch.testing.assert_close(batch, expected_batch, atol=1e-6, rtol=1e-6)
    # A confident, correct prediction: every non-empty channel has Dice ≈ 1. Per sample, the empty ET channel of
    # sample 1 costs a full 1 (2Σpt = 0 with smooth_nr = 0), 1/6 of the mean over 2 samples × 3 channels; over
    # the batch it is pooled with sample 0's non-empty ET and costs almost nothing.
    perfect = 12 * (2 * target - 1)
    assert float(RegionDiceBCELoss(lambda_bce=0.0)(perfect, target)) == pytest.approx(1 / 6, abs=0.01)
    assert float(RegionDiceBCELoss(lambda_bce=0.0, dice_reduction="batch")(perfect, target)) < 0.01


def test_smoothing_decides_what_an_empty_channel_costs() -> None:
    logits = torch.full((1, 3, 6, 7), -50.0)  # predicts nothing anywhere
    target = torch.zeros(1, 3, 6, 7)
    spec = RegionDiceBCELoss(lambda_bce=0.0)(logits, target)
    old = RegionDiceBCELoss(lambda_bce=0.0, dice_reduction="batch", dice_smooth_nr=1e-5, dice_smooth_dr=1e-5)
    assert float(spec) == pytest.approx(1.0)  # spec: 1 - 0 / (Σp + 0 + 1)
    assert float(old(logits, target)) == pytest.approx(0.0, abs=1e-3)  # 1 - 1e-5 / (≈0 + 1e-5)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"bce_reduction": "none"}, "bce_reduction"), ({"dice_reduction": "voxel"}, "dice_reduction"),
     ({"dice_smooth_dr": -1.0}, "smoothing")],
)
def test_bad_settings_are_clear_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RegionDiceBCELoss(**kw)
    with pytest.raises(ValueError, match="must match"):
        RegionDiceBCELoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
