from __future__ import annotations

import pytest
import torch

from medmodal.data.case import Batch
from medmodal.transforms import drop_modalities, labels_to_regions, regions_to_labels, sample_modality_subsets


def test_subsets_are_never_empty_and_within_available() -> None:
    g = torch.Generator().manual_seed(0)
    available = torch.rand(4000, 4, generator=g) < 0.5
    available[:, 2] |= ~available.any(1)  # every row has at least one
    keep = sample_modality_subsets(available, p=1.0, generator=g)
    assert keep.any(1).all()
    assert not (keep & ~available).any()
    # with p=1 and all four available, the 15 subsets are all drawn, roughly uniformly
    full = torch.ones(3000, 4, dtype=torch.bool)
    keep = sample_modality_subsets(full, p=1.0, generator=g)
    codes = (keep.long() * torch.tensor([1, 2, 4, 8])).sum(1)
    counts = torch.bincount(codes, minlength=16)
    assert counts[0] == 0
    assert counts[1:].min() > 3000 / 15 * 0.6


def test_p_zero_keeps_everything_and_seed_is_reproducible() -> None:
    available = torch.ones(16, 4, dtype=torch.bool)
    assert torch.equal(sample_modality_subsets(available, p=0.0), available)
    a = sample_modality_subsets(available, p=0.7, generator=torch.Generator().manual_seed(3))
    b = sample_modality_subsets(available, p=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="probability"):
        sample_modality_subsets(torch.ones(2, 4, dtype=torch.bool), p=1.5)
    with pytest.raises(ValueError, match="at least one"):
        sample_modality_subsets(torch.zeros(2, 4, dtype=torch.bool), p=0.5)


def test_drop_modalities_zeroes_dropped_channels() -> None:
    batch = Batch(image=torch.randn(2, 3, 5, 6, 7), available=torch.ones(2, 3, dtype=torch.bool),
                  modalities=("a", "b", "c"))
    keep = torch.tensor([[True, False, True], [False, True, False]])
    out = drop_modalities(batch, keep)
    assert torch.equal(out.available, keep)
    assert (out.image[0, 1] == 0).all() and (out.image[1, 0] == 0).all()
    assert torch.equal(out.image[0, 0], batch.image[0, 0])


def test_regions_round_trip_brats_labels() -> None:
    regions = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    label = torch.tensor([0, 1, 2, 4, 2, 0, 4]).reshape(1, 1, 7, 1)
    reg = labels_to_regions(label, regions)
    assert reg.shape == (1, 3, 7, 1)
    assert reg[0, :, 3, 0].tolist() == [1, 1, 1]  # ET is inside TC inside WT
    assert torch.equal(regions_to_labels(reg.bool(), regions), label)


def test_lr_schedules() -> None:
    import math

    from medmodal.engine.system import lr_factor

    assert lr_factor(0, schedule="poly", total=100) == 1.0
    assert lr_factor(100, schedule="poly", total=100) == 0.0
    assert math.isclose(lr_factor(50, schedule="cosine", total=100), 0.5)
    assert lr_factor(500, schedule="cosine", total=100) == 0.0  # clamped after the end
    assert lr_factor(7, schedule="constant", total=100) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(1, schedule="step", total=10)


def test_by_size_sampler_matches_the_released_code_frequencies() -> None:
    # ShaSpec's released sampler: k ~ U{1..4}, then a uniform k-subset: P(full) = 1/4, singles 1/16,
    # pairs 1/24, triples 1/16 (spec invariant 6), within 3 sigma over 1e5 draws; never empty.
    from math import comb

    n = 100_000
    g = torch.Generator().manual_seed(1)
    keep = sample_modality_subsets(torch.ones(n, 4, dtype=torch.bool), p=1.0, sampler="by_size", generator=g)
    codes = (keep.long() * torch.tensor([1, 2, 4, 8])).sum(1)
    counts = torch.bincount(codes, minlength=16).double()
    assert counts[0] == 0
    sizes = torch.tensor([bin(c).count("1") for c in range(16)])
    for code in range(1, 16):
        prob = 0.25 / comb(4, int(sizes[code]))
        sigma = (n * prob * (1 - prob)) ** 0.5
        assert abs(counts[code] - n * prob) < 3 * sigma, (code, counts[code], n * prob)


def test_uniform_sampler_frequencies_within_three_sigma() -> None:
    n = 100_000
    g = torch.Generator().manual_seed(2)
    keep = sample_modality_subsets(torch.ones(n, 4, dtype=torch.bool), p=1.0, sampler="uniform", generator=g)
    counts = torch.bincount((keep.long() * torch.tensor([1, 2, 4, 8])).sum(1), minlength=16).double()
    prob = 1 / 15
    sigma = (n * prob * (1 - prob)) ** 0.5
    assert counts[0] == 0
    assert ((counts[1:] - n * prob).abs() < 3 * sigma).all()


def test_by_size_respects_availability_and_per_batch_shares_one_subset() -> None:
    g = torch.Generator().manual_seed(4)
    available = torch.tensor([[True, False, True, True], [False, True, False, False]]).repeat(500, 1)
    keep = sample_modality_subsets(available, p=1.0, sampler="by_size", generator=g)
    assert keep.any(1).all() and not (keep & ~available).any()
    assert torch.equal(keep[1::2], available[1::2])  # a single available modality is always kept
    full = torch.ones(6, 4, dtype=torch.bool)
    for _ in range(20):
        kb = sample_modality_subsets(full, p=1.0, sampler="by_size", per="batch", generator=g)
        assert (kb == kb[0]).all() and kb[0].any()
    with pytest.raises(ValueError, match="every sample of the batch"):
        sample_modality_subsets(available[:2], p=1.0, per="batch")
    with pytest.raises(ValueError, match="unknown subset sampler"):
        sample_modality_subsets(full, p=1.0, sampler="bysize")  # type: ignore[arg-type]


def test_shaspec_star_post_processing_drops_small_et_only() -> None:
    from medmodal.transforms import drop_small_region

    pred = torch.zeros(2, 3, 6, 7, 8, dtype=torch.bool)
    pred[:, 0, :3] = True  # WT
    pred[0, 2, 0, 0, :3] = True  # 3 ET voxels: dropped with min 4
    pred[1, 2, 0, :2, :] = True  # 16 ET voxels: kept
    out = drop_small_region(pred, channel=2, min_voxels=4)
    assert not out[0, 2].any() and torch.equal(out[1, 2], pred[1, 2])
    assert torch.equal(out[:, :2], pred[:, :2]) and pred[0, 2].any()  # other regions and the input untouched
