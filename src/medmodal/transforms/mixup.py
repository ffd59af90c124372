"""Intra-modal mixup (IMM) of a modality-homogeneous batch: continuous pixel mixing for images, binary token mixing
for text (MedCoSS spec ``shared/methods/medcoss.md`` §2.4; Ye et al., CVPR 2024, which applies it to rehearsal-buffer
batches before feature distillation).

Both functions are pure: every random draw comes from the ``generator`` passed in (drawn on that generator's device,
CPU by default, then moved to the batch's device), in a fixed order, so two processes with equal generator states
mix identically. The random parts can also be passed in (``lam`` / ``r`` / ``perm``), e.g. ``lam=1.0`` or ``r=1.0``
for the identity.
"""

from __future__ import annotations

import torch


def _check_unit(name: str, value: torch.Tensor) -> None:
    if not bool(((value >= 0) & (value <= 1)).all()):
        raise ValueError(f"mixup {name} must lie in [0, 1], got {value.tolist()}")


def _permutation(batch: int, perm: torch.Tensor | None, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    if perm is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randperm(batch, generator=generator, device=gen_device).to(device)
    perm = torch.as_tensor(perm, device=device)
    if perm.shape != (batch,) or not torch.equal(torch.sort(perm).values.cpu(), torch.arange(batch)):
        raise ValueError(f"mixup perm must be a permutation of range({batch}), got {perm.tolist()}")
    return perm.long()


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device)


def mix_images(
    x: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    lam: float | torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Continuous mixup within an image batch: ``x_b <- lam_b x_b + (1 - lam_b) x_perm(b)`` (spec §2.4).

    Draws, in this order: ``perm``, a random permutation of the batch, then ``lam_b ~ U(0, 1)``, one per sample
    (the released code's choice; the paper's distribution was not recovered). The blend is ``torch.lerp``, so every
    mixed value lies between its two sources and ``lam_b = 1`` returns ``x_b`` bit for bit.

    Args:
        x: ``(B, C, *S)`` floating images, ``S = (X, Y)`` or ``(X, Y, Z)``.
        generator: the source of the draws.
        lam: a fixed weight (a number or ``(B,)``) in ``[0, 1]`` instead of the draw.
        perm: a fixed ``(B,)`` permutation instead of the draw.

    Returns:
        ``(mixed, lam, perm)``: ``mixed`` like ``x``, ``lam (B,)`` in ``x``'s dtype, ``perm (B,) long``.
    """
    if x.ndim < 3 or not x.is_floating_point():
        raise ValueError(f"mix_images expects a floating (B, C, *S) batch, got {tuple(x.shape)} {x.dtype}")
    b = x.shape[0]
    perm = _permutation(b, perm, generator, x.device)
    if lam is None:
        lam = _uniform((b,), generator)
    else:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        if lam.shape not in ((), (b,)):
            raise ValueError(f"mixup lam must be a number or one weight per sample ({b},), got {tuple(lam.shape)}")
        lam = lam.expand(b)
    _check_unit("lam", lam)
    lam = lam.to(x.device, x.dtype)
    weight = lam.reshape((b,) + (1,) * (x.ndim - 1))
    return torch.lerp(x[perm], x, weight), lam, perm


def mix_tokens(
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    r: float | None = None,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary token mixup within a text batch (spec §2.4).

    Draws, in this order: ``perm``, a random permutation of the batch; one ``r ~ U(0, 1)`` for the whole batch;
    ``keep_{b,l} ~ Bernoulli(r)`` per token (``u_{b,l} < r`` with ``u ~ U[0, 1)``, so ``r = 1`` keeps every token
    and ``r = 0`` none). Then ``ids <- where(keep, ids, ids[perm])`` and the attention mask is mixed with the **same**
    ``keep``. Mixed ids are always ids of the batch, hence inside the vocabulary.

    Args:
        ids: ``(B, L)`` integer token ids.
        attention_mask: ``(B, L)`` bool or integer, 1 / True for a real token.
        generator: the source of the draws.
        r: a fixed keep probability in ``[0, 1]`` instead of the draw.
        perm: a fixed ``(B,)`` permutation instead of the draw.

    Returns:
        ``(ids, attention_mask, r, perm)``: mixed ids and mask (same dtypes as given), ``r`` a 0-d float32 tensor,
        ``perm (B,) long``.
    """
    if ids.ndim != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"mix_tokens expects (B, L) integer ids, got {tuple(ids.shape)} {ids.dtype}")
    if attention_mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of ids {tuple(ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    b = ids.shape[0]
    perm = _permutation(b, perm, generator, ids.device)
    r_t = _uniform((), generator) if r is None else torch.tensor(float(r))
    _check_unit("r", r_t)
    u = _uniform(tuple(ids.shape), generator)
    keep = (u < r_t.to(u.device)).to(ids.device)
    return (torch.where(keep, ids, ids[perm]), torch.where(keep, attention_mask, attention_mask[perm]),
            r_t.float(), perm)
