"""The reconstruction and adversarial terms of PUMIT's tokenizer loss (``shared/methods/pumit.md`` §2.3)::

    L_G = L1(x, x_hat) + w_p LPIPS(x, x_hat) + w_q L_quant + w_e L_ent + w_g (-mean D(x_hat))

* :func:`reconstruction_l1`: ``L1(x, x_hat)``;
* :func:`generator_gan_loss`: ``-mean D(x_hat)``;
* :func:`discriminator_hinge_loss`: the discriminator's hinge loss times 0.5;
* :func:`gan_weight` and :func:`update_ema`: the gate, ``w_g`` only while ``max(EMA_0.9(disc loss), disc loss)``
  is at most the threshold (``use_gan_th``), 0 otherwise (invariant 10);
* :class:`GANGate`: the same gate as a training-state object (the EMA and the last discriminator loss, saved in
  checkpoints so that a resumed run gates exactly as an uninterrupted one).

The prior terms ``L_quant`` and ``L_ent`` are in :mod:`medmodal.losses.pumit_prior`. LPIPS is not implemented here
(its VGG weights are a download; spec switch ``perceptual: none`` offline).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GANGate", "discriminator_hinge_loss", "gan_weight", "generator_gan_loss", "reconstruction_l1",
           "update_ema"]


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


class GANGate:
    """The GAN gate of invariant 10 as training state.

    The generator's adversarial weight is ``weight`` (``w_g``) while ``max(EMA, current) <= threshold`` and 0
    otherwise, where ``current`` is the last discriminator loss seen by :meth:`update` and ``EMA`` its exponential
    moving average with ``decay`` (the spec's ``EMA_0.9``; the first loss starts the average). Before the first
    discriminator loss the gate is closed (the official script starts from ``current = inf``).

    Call order per step (as the official script): the generator's loss uses :attr:`weight`, then the discriminator
    loss of the same step (the mean over all processes, so every rank gates alike) goes to :meth:`update`.
    :meth:`state_dict` / :meth:`load_state_dict` carry the state through checkpoints exactly (Python floats).

    Args:
        threshold: ``use_gan_th`` (0.025 in the official YAML, 0.03 the script default), > 0.
        weight: ``w_g`` (3e-3 in the official YAML), >= 0.
        decay: the EMA's decay in ``[0, 1)`` (0.9).
    """

    def __init__(self, *, threshold: float, weight: float, decay: float = 0.9) -> None:
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"GAN gate threshold must be a positive number, got {threshold}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"GAN weight must be >= 0, got {weight}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.threshold, self.w_g, self.decay = float(threshold), float(weight), float(decay)
        self.ema: float | None = None
        self.current: float | None = None

    @property
    def is_open(self) -> bool:
        """Whether the generator gets its adversarial term now."""
        return self.current is not None and gan_weight(self.ema, self.current, self.threshold, 1.0) == 1.0

    @property
    def weight(self) -> float:
        """The generator's adversarial weight now: ``w_g`` if :attr:`is_open`, else 0."""
        return self.w_g if self.is_open else 0.0

    def update(self, disc_loss: float | torch.Tensor) -> None:
        """Record one step's discriminator loss (a finite number)."""
        value = float(disc_loss)
        if not math.isfinite(value):
            raise ValueError(f"discriminator loss must be finite, got {value}")
        self.ema = update_ema(self.ema, value, decay=self.decay)
        self.current = value

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema, current = state["ema"], state["current"]
        self.ema = None if ema is None else float(ema)
        self.current = None if current is None else float(current)

    def __repr__(self) -> str:
        return (f"GANGate(threshold={self.threshold:g}, weight={self.w_g:g}, decay={self.decay:g}, ema={self.ema}, "
                f"current={self.current}, open={self.is_open})")
