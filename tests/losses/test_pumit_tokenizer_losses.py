"""PUMIT tokenizer L1 / GAN terms and the GAN gate (``shared/methods/pumit.md`` §2.3, invariant 10)."""

from __future__ import annotations

import pytest
import torch

from medmodal.losses.pumit_tokenizer import (
    discriminator_hinge_loss,
    gan_weight,
    generator_gan_loss,
    reconstruction_l1,
    update_ema,
)


def test_gan_gate() -> None:
    th, w_g = 0.025, 3e-3
    assert gan_weight(0.5, 0.01, th, w_g) == 0.0  # EMA still above: off
    assert gan_weight(0.01, 0.5, th, w_g) == 0.0  # this step above: off
    assert gan_weight(0.02, 0.025, th, w_g) == w_g  # both at most the threshold: on
    assert gan_weight(None, 0.02, th, w_g) == w_g and gan_weight(None, 0.03, th, w_g) == 0.0
    # A falling discriminator loss turns the gate on only once its EMA (decay 0.9) has come down too.
    ema, weights = None, []
    for loss in [1.0] + [0.0] * 40:
        ema = update_ema(ema, loss)
        weights.append(gan_weight(ema, loss, th, w_g))
    first_on = weights.index(w_g)
    assert 0.9**first_on <= th < 0.9 ** (first_on - 1)  # EMA after k zero steps = 0.9^k
    assert all(w == 0.0 for w in weights[:first_on]) and all(w == w_g for w in weights[first_on:])


def test_update_ema() -> None:
    assert update_ema(None, 2.0) == 2.0
    assert update_ema(2.0, 1.0) == pytest.approx(1.9)
    assert update_ema(2.0, 1.0, decay=0.5) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="decay"):
        update_ema(1.0, 1.0, decay=1.0)


def test_hinge_and_generator_terms() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - D): 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0])  # relu(1 + D): 0, 1 -> mean 0.5
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 0.5))
    assert generator_gan_loss(fake).item() == pytest.approx(1.0)


def test_reconstruction_l1() -> None:
    x = torch.zeros(1, 1, 3, 4, 5)
    assert reconstruction_l1(x, x + 0.25).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="reconstruction shape"):
        reconstruction_l1(x, x[..., :4])
