"""Majority vote, weighted vote and DP consensus (shared/methods/deepstaple.md §3, invariants 5-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmodal.fusion import dp_consensus, majority_vote, weighted_vote


def random_masks(k: int, shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((k, *shape)) < 0.5)


def test_binary_majority_ties_go_to_background() -> None:
    masks = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)[..., None]
    fused = majority_vote(masks)  # votes per voxel: 2, 2, 0, 4 out of 4
    assert fused.dtype == torch.bool and fused[:, 0].tolist() == [False, False, False, True]
    assert majority_vote(masks[:3])[:, 0].tolist() == [True, True, False, True]  # 2 of 3 is a majority


def test_integer_binary_majority_equals_bool_majority() -> None:
    masks = random_masks(6, (7, 8, 9))
    fused = majority_vote(masks.numpy().astype(np.uint8))
    assert fused.dtype == torch.uint8
    assert torch.equal(fused.bool(), majority_vote(masks))


def test_multilabel_majority_most_frequent_and_ties_to_smallest_label() -> None:
    labels = torch.tensor([[4, 1, 2, 3, 0], [4, 1, 5, 3, 7], [4, 2, 5, 0, 7], [1, 2, 2, 0, 9]])[:, None]  # (K=4, 1, 5)
    fused = majority_vote(labels)  # voxels: (4,4,4,1) (1,1,2,2) (2,5,5,2) (3,3,0,0) (0,7,7,9)
    assert fused.shape == (1, 5) and fused[0].tolist() == [4, 1, 2, 0, 7]
    assert majority_vote(labels.numpy().astype(np.int32)).dtype == torch.int32


def test_weighted_vote_with_equal_weights_is_the_majority_vote() -> None:
    for k in (4, 5, 6):  # 1/6 is inexact in binary: ties must still be exact
        masks = random_masks(k, (9, 10, 11), seed=k)
        expected = majority_vote(masks)
        assert torch.equal(weighted_vote(masks, torch.full((k,), 1.0 / k)), expected)
        assert torch.equal(weighted_vote(masks, torch.ones(k)), expected)


def test_weighted_vote_threshold_is_strict() -> None:
    masks = torch.tensor([[1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    assert weighted_vote(masks, torch.tensor([2.0, 1.0, 1.0])).tolist() == [False, False]  # 2 == 0.5 · 4
    assert weighted_vote(masks, torch.tensor([2.0, 1.0, 0.5])).tolist() == [True, False]


def test_dp_consensus_with_one_dominant_theta_returns_that_label() -> None:
    masks = random_masks(5, (17, 18, 19), seed=3)
    theta = torch.tensor([50.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(dp_consensus(masks, theta), masks[0])
    assert torch.equal(dp_consensus(masks, theta.roll(2)), masks[2])


def test_dp_consensus_with_equal_theta_is_the_majority_vote() -> None:
    for k in (2, 3, 4, 6):
        masks = random_masks(k, (13, 12), seed=k)
        assert torch.equal(dp_consensus(masks, torch.full((k,), 0.7)), majority_vote(masks))


def test_dp_consensus_accepts_parameters_that_require_grad() -> None:
    theta = torch.zeros(3, requires_grad=True)
    assert dp_consensus(random_masks(3, (4, 5)), theta).dtype == torch.bool


@pytest.mark.parametrize(
    ("masks", "weights", "match"),
    [
        (torch.zeros(3, 4, dtype=torch.bool), torch.ones(2), "shape"),
        (torch.zeros(3, 4, dtype=torch.bool), torch.tensor([1.0, -1.0, 1.0]), "non-negative"),
        (torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3), "not all zero"),
        (torch.zeros(3, 4, dtype=torch.bool), torch.tensor([1.0, float("nan"), 1.0]), "finite"),
        (torch.tensor([[0, 2], [1, 1]]), torch.ones(2), "binary masks"),
    ],
)
def test_weighted_vote_rejects_bad_input(masks: torch.Tensor, weights: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_vote(masks, weights)
