"""PUMIT's SAC patch discriminator for the tokenizer's optional adversarial term (Luo et al., *Pre-trained Universal
Medical Image Transformer*, arXiv 2312.07630; ``shared/methods/pumit.md`` §2.3, switch ``gan`` of §2.6).

Images are volumes ``(B, C, X, Y, Z)`` with the slice axis last; a 2D image is the one-slice volume
``(B, C, X, Y, 1)`` with degree of anisotropy 5 (callers reshape). Every layer is a spatially adaptive convolution
(:mod:`medmodal.layers.sac`) threading the explicit :class:`~medmodal.layers.sac.SACState`, so a thick-slice volume
is downsampled in-plane only until it is isotropic, exactly like the tokenizer it judges.

Layout (the official ``SimplePatchDiscriminator``'s, with medmodal's SAC downsampling ``k = s = 2`` where the
official code uses ``k = 3, s = 2, padding 1``; the spec gives the widths 128/256/512 and GroupNorm):

* per width ``w``: SAC conv ``k = s = 2`` -> GroupNorm(``norm_groups``, ``w``) -> LeakyReLU;
* ``post_convs`` x [SAC ``3^3`` conv -> GroupNorm -> LeakyReLU];
* a SAC ``3^3`` conv to one channel: one real/fake logit per patch.

The loss (hinge x 0.5) and the gate of the generator's term are in :mod:`medmodal.losses.pumit_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medmodal.layers.sac import SACConv, SACState
from medmodal.networks.registry import register_network

__all__ = ["PUMITDiscriminator"]


class _Block(nn.Module):
    """SAC conv -> GroupNorm -> LeakyReLU, threading the SAC state."""

    def __init__(self, conv: SACConv, channels: int, groups: int, slope: float) -> None:
        super().__init__()
        self.conv, self.norm, self.act = conv, nn.GroupNorm(groups, channels), nn.LeakyReLU(slope)

    def forward(self, x: torch.Tensor, state: SACState) -> tuple[torch.Tensor, SACState]:
        x, state = self.conv(x, state)
        return self.act(self.norm(x)), state


@register_network("pumit_discriminator")
class PUMITDiscriminator(nn.Module):
    """A SAC patch discriminator (see the module docstring).

    Args:
        in_channels: image channels ``C`` (the tokenizer's).
        widths: channels after each stride-2 downsampling (the spec: ``(128, 256, 512)``); each a positive multiple
            of ``norm_groups``.
        norm_groups: GroupNorm groups (8).
        post_convs: ``3^3`` blocks at the deepest width before the logit conv (1, as the official default).
        negative_slope: LeakyReLU slope (0.01, PyTorch's default, as the official discriminator).

    Shapes: ``x (B, C, X, Y, Z)`` of degree of anisotropy ``da`` -> logits ``(B, 1, X / 2^L, Y / 2^L, Z / 2^max(L -
    da, 0))`` with ``L = len(widths)``; ``X`` and ``Y`` must be multiples of ``2^L`` and ``Z`` of ``2^max(L - da,
    0)`` (a tokenizer crop of whole tokens is, when ``L`` is at most the tokenizer's number of downsamplings).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (128, 256, 512),
        norm_groups: int = 8,
        post_convs: int = 1,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 or w % norm_groups for w in widths):
            raise ValueError(f"discriminator widths must be positive multiples of norm_groups={norm_groups}, "
                             f"got {list(widths)}")
        if in_channels < 1 or post_convs < 0:
            raise ValueError(f"in_channels must be >= 1 and post_convs >= 0, got {in_channels} and {post_convs}")
        self.in_channels, self.widths = in_channels, widths
        blocks = [
            _Block(SACConv(in_channels=c_in, out_channels=c_out, kernel_size=2, stride=2), c_out, norm_groups,
                   negative_slope)
            for c_in, c_out in zip((in_channels, *widths), widths, strict=False)
        ]
        blocks += [
            _Block(SACConv(in_channels=widths[-1], out_channels=widths[-1], kernel_size=3, stride=1), widths[-1],
                   norm_groups, negative_slope)
            for _ in range(post_convs)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.head = SACConv(in_channels=widths[-1], out_channels=1, kernel_size=3, stride=1)

    @property
    def num_downsamplings(self) -> int:
        """``L``: the stride-2 downsamplings (in-plane stride ``2^L``)."""
        return len(self.widths)

    def patch_size(self, da: int) -> tuple[int, int, int]:
        """Voxels per logit ``(2^L, 2^L, 2^max(L - da, 0))`` of an image with degree of anisotropy ``da``."""
        n = self.num_downsamplings
        return (1 << n, 1 << n, 1 << max(n - da, 0))

    def forward(self, x: torch.Tensor, da: int) -> torch.Tensor:
        """Patch logits ``(B, 1, *S')`` of ``x (B, C, X, Y, Z)`` with degree of anisotropy ``da`` (5: a 2D image)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"discriminator expects an image (B, {self.in_channels}, X, Y, Z) with the slice axis last, got shape "
                f"{tuple(x.shape)}; a 2D image is the one-slice volume (B, C, X, Y, 1) with da=5"
            )
        size = self.patch_size(da)
        if any(s < p or s % p for s, p in zip(x.shape[2:], size, strict=True)):
            raise ValueError(f"discriminator input spatial shape {tuple(x.shape[2:])} at da={da} must be a positive "
                             f"multiple of its patch {size}")
        state = SACState(int(da))
        for block in self.blocks:
            x, state = block(x, state)
        return self.head(x, state)[0]
