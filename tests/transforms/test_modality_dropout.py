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

    from medmodal.methods.segmentation import lr_factor

    assert lr_factor(0, schedule="poly", total=100) == 1.0
    assert lr_factor(100, schedule="poly", total=100) == 0.0
    assert math.isclose(lr_factor(50, schedule="cosine", total=100), 0.5)
    assert lr_factor(500, schedule="cosine", total=100) == 0.0  # clamped after the end
    assert lr_factor(7, schedule="constant", total=100) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(1, schedule="step", total=10)
