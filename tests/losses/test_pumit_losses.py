"""PUMIT's MIM helpers: spec §3 invariants 7 (soft-target CE) and 8 (the mask)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmodal.losses.pumit import (
    MASK_RATIO,
    masked_positions,
    random_visible,
    soft_target_cross_entropy,
    soft_target_kl,
)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 20, 40, 60, 100, 500])
def test_visible_count_is_floor_of_045_l(length: int) -> None:
    visible = random_visible(length, batch_size=3, generator=torch.Generator().manual_seed(0))
    expected = {1: 0, 2: 0, 3: 1, 7: 3, 20: 9, 40: 18, 60: 27, 100: 45, 500: 225}[length]  # exact floor(L * 0.45)
    assert visible.shape == (3, expected) and visible.dtype == torch.long
    for row in visible:
        assert row.tolist() == sorted(set(row.tolist())) and (row >= 0).all() and (row < length).all()
    masked = masked_positions(visible, length)
    assert masked.shape == (3, length) and (masked.sum(1) == length - expected).all()
    assert masked.any(1).all()  # there is always something to predict


def test_visible_draw_is_seeded_and_uniform() -> None:
    a = random_visible(50, batch_size=4, generator=torch.Generator().manual_seed(3))
    b = random_visible(50, batch_size=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])  # reproducible; one draw per sample
    draws = 4000
    visible = random_visible(20, batch_size=draws, generator=torch.Generator().manual_seed(0))
    freq = torch.zeros(20).index_add_(0, visible.flatten(), torch.ones(visible.numel())) / draws
    p = 9 / 20
    assert (freq - p).abs().max() < 4 * math.sqrt(p * (1 - p) / draws)  # every token visible w.p. 9/20


def test_random_visible_errors() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        random_visible(10, mask_ratio=1.0)
    with pytest.raises(ValueError, match="num_tokens >= 1"):
        random_visible(0)
    assert MASK_RATIO == 0.55


def _masked(batch: int, length: int) -> torch.Tensor:
    visible = random_visible(length, batch_size=batch, generator=torch.Generator().manual_seed(1))
    return masked_positions(visible, length)


def test_soft_ce_with_one_hot_targets_is_hard_ce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 11, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 11))
    masked = _masked(2, 11)
    soft = soft_target_cross_entropy(logits, F.one_hot(labels, 7).double(), masked)
    hard = F.cross_entropy(logits[masked], labels[masked])
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-12)
    assert soft_target_kl(logits, F.one_hot(labels, 7).double(), masked) == pytest.approx(float(hard), abs=1e-12)


def test_target_equal_to_prediction_gives_entropy_and_zero_kl() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 11, 7, dtype=torch.float64)
    masked = _masked(2, 11)
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)[masked].mean()
    torch.testing.assert_close(soft_target_cross_entropy(logits, p, masked), entropy, rtol=0, atol=1e-12)
    assert abs(float(soft_target_kl(logits, p, masked))) < 1e-12
    # in general KL = CE - H(target) >= 0
    q = torch.randn(2, 11, 7, dtype=torch.float64).softmax(-1)
    h_q = -(q * q.log()).sum(-1)[masked].mean()
    kl = soft_target_kl(logits, q, masked)
    torch.testing.assert_close(kl, soft_target_cross_entropy(logits, q, masked) - h_q, rtol=0, atol=1e-12)
    assert kl > 0


def test_loss_reads_masked_positions_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 11, 7, requires_grad=True)
    target = torch.randn(2, 11, 7).softmax(-1)
    masked = _masked(2, 11)
    loss = soft_target_cross_entropy(logits, target, masked)
    loss.backward()
    assert logits.grad is not None and (logits.grad[~masked] == 0).all() and logits.grad[masked].abs().sum() > 0
    changed = logits.detach().clone()
    changed[~masked] = torch.where(torch.rand_like(changed[~masked]) < 0.5, float("nan"), 1e6)
    torch.testing.assert_close(soft_target_cross_entropy(changed, target, masked), loss.detach(), rtol=0, atol=0)
    # and the masked ones do count
    moved = logits.detach().clone()
    moved[masked] += torch.randn_like(moved[masked])
    assert not torch.isclose(soft_target_cross_entropy(moved, target, masked), loss.detach())


def test_shape_errors_name_the_tensors() -> None:
    logits = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"logits and target_probs \(B, L, K\)"):
        soft_target_cross_entropy(logits, torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one masked"):
        soft_target_kl(logits, logits.softmax(-1), torch.zeros(2, 5, dtype=torch.bool))
