"""MultiMix's losses: spec invariants 1 (FixMatch mask), 2 (pseudo-labels), 5 (KL) and 6 (Dice)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, kl_divergence

from medmodal.losses.multimix import dice_loss, fixmatch_loss, segmentation_kl

SHAPES = [(17, 18), (7, 6, 5)]


def _weak_at(confidences: list[float]) -> torch.Tensor:
    """Two-class weak logits whose softmax max (class 0) is each of ``confidences`` (float64, exact enough)."""
    c = torch.tensor(confidences, dtype=torch.float64)
    return torch.stack([torch.log(c / (1 - c)), torch.zeros_like(c)], dim=1)


# --- invariant 1: FixMatch mask ---------------------------------------------------------------------------------

def test_threshold_is_inclusive_at_plus_minus_1e_4() -> None:
    weak = _weak_at([0.7 + 1e-4, 0.7 - 1e-4])
    strong = torch.tensor([[0.3, 1.2], [2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    terms = fixmatch_loss(strong, weak, tau=0.7)
    assert terms.mask.tolist() == [True, False]
    assert terms.pseudo.tolist() == [0, 0]
    assert torch.allclose(terms.confidence, torch.tensor([0.7001, 0.6999], dtype=torch.float64))
    expected = F.cross_entropy(strong[:1], torch.tensor([0])) / 2  # batch norm: / B = 2
    assert torch.allclose(terms.loss, expected)
    confident = fixmatch_loss(strong, weak, tau=0.7, norm="confident").loss
    assert torch.allclose(confident, expected * 2)  # / #confident = 1
    # exactly at tau counts (>=): equal logits of two classes give max p = 0.5 exactly
    assert fixmatch_loss(strong, torch.zeros(2, 2), tau=0.5).mask.all()


@pytest.mark.parametrize("norm", ["batch", "confident"])
def test_all_below_tau_gives_zero_loss_and_zero_gradient(norm: str) -> None:
    strong = torch.randn(5, 3, requires_grad=True)
    weak = torch.zeros(5, 3)  # uniform: max p = 1/3 < 0.7
    terms = fixmatch_loss(strong, weak, tau=0.7, norm=norm)  # type: ignore[arg-type]
    assert not terms.mask.any()
    assert terms.loss.item() == 0.0
    terms.loss.backward()
    assert strong.grad is not None and torch.count_nonzero(strong.grad) == 0


def test_halving_the_confident_count_halves_the_batch_normalised_loss() -> None:
    # four samples with the same strong logits; pseudo-label 1 for all; 4 then 2 of them confident
    strong = torch.tensor([[0.5, -0.25, 1.0]]).repeat(4, 1)
    confident = torch.tensor([[0.0, 5.0, 0.0]])
    unsure = torch.tensor([[0.0, 0.1, 0.0]])
    all_confident = fixmatch_loss(strong, confident.repeat(4, 1)).loss
    half = fixmatch_loss(strong, torch.cat([confident, unsure, confident, unsure])).loss
    assert all_confident > 0
    assert torch.allclose(half, all_confident / 2)
    # normalising by the confident count instead leaves it unchanged
    assert torch.allclose(fixmatch_loss(strong, torch.cat([confident, unsure] * 2), norm="confident").loss,
                          all_confident)


# --- invariant 2: pseudo-labels ---------------------------------------------------------------------------------

def test_no_gradient_reaches_the_model_through_the_weak_view() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.mul_(8)  # confident predictions
    x_weak, x_strong = torch.randn(8, 6), torch.randn(8, 6)
    weak_in_graph = model(x_weak)
    assert weak_in_graph.requires_grad
    terms = fixmatch_loss(model(x_strong), weak_in_graph, tau=0.5)
    assert terms.mask.any()
    grads = torch.autograd.grad(terms.loss, list(model.parameters()))
    with torch.no_grad():
        weak_const = model(x_weak)
    reference = torch.autograd.grad(fixmatch_loss(model(x_strong), weak_const, tau=0.5).loss,
                                    list(model.parameters()))
    for g, r in zip(grads, reference, strict=True):
        assert torch.equal(g, r)
    leaf = torch.randn(8, 3, requires_grad=True)
    fixmatch_loss(torch.randn(8, 3, requires_grad=True), leaf, tau=0.0).loss.backward()
    assert leaf.grad is None


@pytest.mark.parametrize("norm", ["batch", "confident"])
def test_strong_equal_weak_and_all_confident_is_ce_against_own_argmax(norm: str) -> None:
    torch.manual_seed(1)
    logits = torch.rand(6, 4)
    logits[torch.arange(6), torch.tensor([2, 0, 3, 1, 1, 2])] += 5.0
    assert (logits.softmax(1).max(1).values >= 0.7).all()
    terms = fixmatch_loss(logits, logits, tau=0.7, norm=norm)  # type: ignore[arg-type]
    assert terms.mask.all()
    assert torch.allclose(terms.loss, F.cross_entropy(logits, logits.argmax(1)))


def test_fixmatch_rejects_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="must both be"):
        fixmatch_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tau"):
        fixmatch_loss(torch.zeros(2, 3), torch.zeros(2, 3), tau=1.5)
    with pytest.raises(ValueError, match="norm"):
        fixmatch_loss(torch.zeros(2, 3), torch.zeros(2, 3), norm="mean")  # type: ignore[arg-type]


# --- invariant 5: segmentation KL -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_bernoulli_kl_of_equal_predictions_is_zero(shape: tuple[int, ...]) -> None:
    a = torch.randn(3, 1, *shape)
    assert segmentation_kl(a, a.clone(), mode="bernoulli").item() == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_bernoulli_kl_is_the_bernoulli_divergence_nonnegative_with_gradients_to_both(shape: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    a = (torch.randn(2, 1, *shape, dtype=torch.float64) * 3).requires_grad_()
    b = (torch.randn(2, 1, *shape, dtype=torch.float64) * 3).requires_grad_()
    kl = segmentation_kl(a, b, mode="bernoulli")
    expected = kl_divergence(Bernoulli(logits=a), Bernoulli(logits=b)).mean()
    assert kl.item() > 0
    assert torch.allclose(kl, expected, rtol=1e-6)
    kl.backward()
    assert a.grad is not None and b.grad is not None
    assert torch.count_nonzero(a.grad) > 0 and torch.count_nonzero(b.grad) > 0
    for _ in range(5):
        assert segmentation_kl(torch.randn(2, 1, *shape) * 4, torch.randn(2, 1, *shape) * 4, mode="bernoulli") >= 0


def test_bernoulli_kl_is_finite_at_saturated_logits() -> None:
    a = torch.tensor([50.0, -50.0, 50.0, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2).requires_grad_()
    b = torch.tensor([-50.0, 50.0, 50.0, 50.0], dtype=torch.float64).reshape(1, 1, 2, 2).requires_grad_()
    kl = segmentation_kl(a, b, mode="bernoulli")
    assert math.isfinite(kl.item())
    e = 1e-6  # the clamp: p = 1 - e against q = e, twice; p = 1/2 against q = 1 - e once; one equal pixel
    saturated = (1 - 2 * e) * math.log((1 - e) / e)
    half = 0.5 * math.log(0.5 / (1 - e)) + 0.5 * math.log(0.5 / e)
    assert kl.item() == pytest.approx((2 * saturated + half) / 4, rel=1e-9)
    kl.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_unequal_batches_pair_the_first_samples() -> None:
    torch.manual_seed(3)
    lab, unl = torch.randn(3, 1, 9, 8), torch.randn(5, 1, 9, 8)
    kl = segmentation_kl(lab, unl, mode="bernoulli")
    assert torch.allclose(kl, segmentation_kl(lab, unl[:3], mode="bernoulli"))
    unl2 = unl.clone()
    unl2[3:] = torch.randn(2, 1, 9, 8) * 10
    assert torch.equal(segmentation_kl(lab, unl2, mode="bernoulli"), kl)
    assert torch.allclose(segmentation_kl(unl, lab, mode="bernoulli"),
                          segmentation_kl(unl[:3], lab, mode="bernoulli"))


@pytest.mark.parametrize("shape", SHAPES)
def test_faithful_zero_is_exactly_zero_with_a_zero_gradient(shape: tuple[int, ...]) -> None:
    """The released code's softmax over one channel: the result is exactly 0 and stays in the graph, so
    ``.grad`` comes back as a zero tensor (not None) on both inputs."""
    a = (torch.randn(2, 1, *shape) * 5).requires_grad_()
    b = (torch.randn(4, 1, *shape) * 5).requires_grad_()
    kl = segmentation_kl(a, b, mode="faithful_zero")
    assert kl.item() == 0.0
    kl.backward()
    assert a.grad is not None and torch.count_nonzero(a.grad) == 0
    assert b.grad is not None and torch.count_nonzero(b.grad) == 0


def test_none_is_zero_outside_the_graph() -> None:
    a = torch.randn(2, 1, 5, 6, requires_grad=True)
    kl = segmentation_kl(a, a * 2, mode="none")
    assert kl.item() == 0.0 and not kl.requires_grad


def test_segmentation_kl_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="mode"):
        segmentation_kl(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), mode="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"same C and \*S"):
        segmentation_kl(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), mode="bernoulli")
    with pytest.raises(ValueError, match=r"same C and \*S"):
        segmentation_kl(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), mode="bernoulli")


def test_several_region_channels_average_the_per_channel_kl() -> None:
    torch.manual_seed(5)
    a, b = torch.randn(2, 3, 6, 5) * 2, torch.randn(2, 3, 6, 5) * 2
    per_channel = [segmentation_kl(a[:, c:c + 1], b[:, c:c + 1], mode="bernoulli") for c in range(3)]
    assert torch.allclose(segmentation_kl(a, b, mode="bernoulli"), torch.stack(per_channel).mean())
    assert segmentation_kl(a, b, mode="faithful_zero").item() == 0.0


# --- invariant 6: Dice ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_dice_loss_is_the_spec_formula(shape: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, 2, *shape, dtype=torch.float64)
    target = (torch.rand(3, 2, *shape) > 0.6).double()
    target[1, 0] = 0  # one empty target channel
    p = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    per = (2 * (p * target).sum(dims) + 1) / (p.sum(dims) + target.sum(dims) + 1)
    assert torch.allclose(dice_loss(logits, target), 1 - per.mean())
    # per sample and channel, not over the batch: one bad sample moves the mean by its own share only
    assert not torch.allclose(dice_loss(logits, target),
                              1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1))


@pytest.mark.parametrize("shape", SHAPES)
def test_dice_loss_perfect_and_empty_predictions(shape: tuple[int, ...]) -> None:
    target = torch.zeros(2, 1, *shape)
    target[0, 0, 2:5, 1:4] = 1
    logits = (target * 2 - 1) * 50  # perfect, saturated
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(1, 1, *shape)
    assert dice_loss(torch.full_like(empty, -50.0), empty).item() == pytest.approx(0.0, abs=1e-6)
    # an empty prediction of a 9-voxel target: 1 - 1/10 (smoothing only)
    one = target[:1]
    n = one.sum().item()
    assert dice_loss(torch.full_like(one, -50.0), one).item() == pytest.approx(1 - 1 / (n + 1), abs=1e-6)
    with pytest.raises(ValueError, match="must match"):
        dice_loss(logits, target[:1])
