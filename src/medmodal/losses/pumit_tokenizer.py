"""The reconstruction and adversarial terms of PUMIT's tokenizer loss (``shared/methods/pumit.md`` §2.3)::

    L_G = L1(x, x_hat) + w_p LPIPS(x, x_hat) + w_q L_quant + w_e L_ent + w_g (-mean D(x_hat))

* :func:`reconstruction_l1`: ``L1(x, x_hat)``;
* :func:`generator_gan_loss`: ``-mean D(x_hat)``;
* :func:`discriminator_hinge_loss`: the discriminator's hinge loss times 0.5;
* :func:`gan_weight` and :func:`update_ema`: the gate, ``w_g`` only while ``max(EMA_0.9(disc loss), disc loss)``
  is at most the threshold (``use_gan_th``), 0 otherwise (invariant 10).

The prior terms ``L_quant`` and ``L_ent`` are in :mod:`medmodal.losses.pumit_prior`. LPIPS is not implemented here
(its VGG weights are a download; spec switch ``perceptual: none`` offline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["discriminator_hinge_loss", "gan_weight", "generator_gan_loss", "reconstruction_l1", "update_ema"]


def reconstruction_l1(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between the image ``x`` and its reconstruction ``x_hat`` (same shape)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"reconstruction shape {tuple(x_hat.shape)} differs from the image's {tuple(x.shape)}")
    return F.l1_loss(x_hat, x)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``; pass ``D(x_hat.detach())`` as ``fake_logits``."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial term ``-mean D(x_hat)``."""
    return -fake_logits.mean()


def update_ema(ema: float | None, value: float, *, decay: float = 0.9) -> float:
    """``decay * ema + (1 - decay) * value``; the first value (``ema is None``) starts the average."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return float(value) if ema is None else decay * float(ema) + (1.0 - decay) * float(value)


def gan_weight(ema: float | None, current: float, threshold: float, w_g: float) -> float:
    """The generator's GAN weight: 0 while ``max(ema, current) > threshold``, ``w_g`` once both are at most it.

    ``ema`` is the EMA of the discriminator loss (:func:`update_ema`, decay 0.9), ``current`` this step's
    discriminator loss, ``threshold`` the spec's ``use_gan_th`` (0.025 in the YAML).
    """
    worst = float(current) if ema is None else max(float(ema), float(current))
    return 0.0 if worst > threshold else float(w_g)
