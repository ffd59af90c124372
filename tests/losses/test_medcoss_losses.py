"""MedCoSS losses: MAE masking and norm-pix loss (spec invariant 8), MLM ignore index (9), distillation (5),
patchify order and the norm-pix un-normalisation for visualisation (§6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmodal.losses.medcoss import (
    distillation_loss,
    mae_loss,
    mlm_loss,
    normalise_patches,
    patchify,
    random_keep,
    unnormalise_patches,
    unpatchify,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("length", [15, 144, 196, 7])
def test_random_keep_keeps_floor_quarter_and_restore_inverts(length: int) -> None:
    draw = random_keep(5, length, generator=_gen(0))
    n = math.floor(length * 0.25)
    assert draw.keep.shape == (5, n) and draw.mask.shape == (5, length)
    assert (draw.mask.sum(1) == length - n).all()
    assert not draw.mask.gather(1, draw.keep).any()  # kept positions are exactly the unmasked ones
    assert (draw.keep.diff(dim=1) > 0).all()  # sorted, distinct
    masked_ids = torch.arange(length).expand(5, -1)[draw.mask].view(5, -1)
    order = torch.cat((draw.keep, masked_ids), dim=1).gather(1, draw.restore)
    assert torch.equal(order, torch.arange(length).expand(5, -1))


def test_random_keep_same_generator_same_draw() -> None:
    a, b = random_keep(4, 49, generator=_gen(3)), random_keep(4, 49, generator=_gen(3))
    c = random_keep(4, 49, generator=_gen(4))
    assert torch.equal(a.keep, b.keep) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.keep, c.keep)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_keep(4, 49, ratio=1.0)


@pytest.mark.parametrize("shape,patch", [((2, 3, 24, 40), 8), ((2, 1, 16, 24, 8), (8, 4, 8)), ((1, 2, 6, 9), 3)])
def test_patchify_order_matches_grid_and_round_trips(shape: tuple[int, ...], patch: int | tuple[int, ...]) -> None:
    x = torch.randn(shape)
    dims = len(shape) - 2
    p = (patch,) * dims if isinstance(patch, int) else patch
    grid = tuple(s // q for s, q in zip(shape[2:], p, strict=True))
    patches = patchify(x, patch)
    assert patches.shape == (shape[0], math.prod(grid), math.prod(p) * shape[1])
    # token l = row-major grid index (last axis fastest); values (*within-patch, C), channel fastest
    idx = (grid[0] - 1, 1) if dims == 2 else (1, 2, 0)
    flat = sum(i * math.prod(grid[k + 1 :]) for k, i in enumerate(idx))
    region = x[(slice(None), slice(None), *(slice(i * q, (i + 1) * q) for i, q in zip(idx, p, strict=True)))]
    expected = region.movedim(1, -1).reshape(shape[0], -1)
    assert torch.equal(patches[:, flat], expected)
    assert torch.equal(unpatchify(patches, patch, grid, shape[1]), x)


def test_patchify_refuses_non_multiple() -> None:
    with pytest.raises(ValueError, match=r"multiple of the patch \(8, 8\)"):
        patchify(torch.randn(1, 1, 17, 16), 8)


def test_normalised_targets_have_zero_mean_unit_variance_per_patch() -> None:
    patches = 5.0 + 3.0 * torch.randn(2, 13, 48)
    normed, mean, var = normalise_patches(patches)
    assert torch.allclose(normed.mean(-1), torch.zeros(2, 13), atol=1e-5)
    assert torch.allclose(normed.var(-1), torch.ones(2, 13), atol=1e-5)
    assert torch.allclose(unnormalise_patches(normed, patches), patches, atol=1e-5)


def test_mae_loss_is_mean_over_masked_patches_and_ignores_visible() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(3, 12, 20), 2.0 + torch.randn(3, 12, 20)
    draw = random_keep(3, 12, generator=_gen(1))
    loss = mae_loss(pred, target, draw.mask)
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - t).square().mean(-1)
    assert torch.allclose(loss, per_patch[draw.mask].mean())
    raw = mae_loss(pred, target, draw.mask, norm_pix=False)
    assert torch.allclose(raw, (pred - target).square().mean(-1)[draw.mask].mean())
    # visible predictions: any value, NaN included, changes neither the loss nor the gradient
    p1 = pred.clone().requires_grad_()
    p2 = torch.where(draw.mask[..., None], pred, torch.tensor(float("nan"))).requires_grad_()
    l1, l2 = mae_loss(p1, target, draw.mask), mae_loss(p2, target, draw.mask)
    l1.backward(), l2.backward()
    assert torch.equal(l1, l2) and torch.equal(p1.grad, p2.grad)
    assert not p1.grad[~draw.mask].any() and p1.grad[draw.mask].abs().sum() > 0
    # a change at one masked patch does change it
    p3 = pred.clone()
    p3[draw.mask.nonzero()[0].unbind()] += 1.0
    assert mae_loss(p3, target, draw.mask) != loss


def test_mae_loss_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one masked"):
        mae_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected pred"):
        mae_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 2), torch.ones(1, 4, dtype=torch.bool))


def test_mlm_loss_ignores_minus_100() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.full((2, 7), -100)
    labels[0, 2], labels[1, 5], labels[1, 0] = 3, 10, 0
    loss = mlm_loss(logits, labels)
    manual = -(logits.log_softmax(-1)[[0, 1, 1], [2, 5, 0], [3, 10, 0]]).mean()
    assert torch.allclose(loss, manual)
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
    garbage = logits.clone()
    garbage[labels == -100] = float("nan")
    assert torch.equal(mlm_loss(garbage, labels), loss)
    none = logits.clone().requires_grad_()
    zero = mlm_loss(none, torch.full((2, 7), -100))
    zero.backward()
    assert zero.item() == 0.0 and none.grad is not None and not none.grad.any()


def test_distillation_loss_value_and_stop_gradient() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 5, 8, requires_grad=True)
    teacher = torch.randn(2, 5, 8, requires_grad=True)
    loss = distillation_loss(student, teacher)
    assert torch.allclose(loss, (student - teacher).square().mean())
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    assert distillation_loss(teacher, teacher).item() == 0.0
    with pytest.raises(ValueError, match="one shape"):
        distillation_loss(student, teacher[:, :4])
