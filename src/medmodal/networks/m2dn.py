"""The M2DN denoiser: a multi-input multi-output U-Net that predicts the clean image of every modality.

M2DN (*Multi-Modal Modality-Masked Diffusion Network for Brain MRI Synthesis With Random Modality Missing*,
IEEE TMI 2024, IEEE Xplore doc 10444695) treats missing-modality synthesis as whole-modality inpainting: the
missing channels are diffused, the available ones stay clean, and one network conditioned on the binary
modality mask ``v = 1 - available`` (1 = missing) predicts ``x̂₀`` for **all** M channels at every step.
This module is the pure network of ``shared/methods/m2dn.md`` §2.3; the diffusion process lives in
:mod:`medmodal.methods.m2dn.diffusion`.

Architecture (2D and 3D share one code path; ``S`` is the spatial size, ``L = len(channels)``):

====================================================  =====================================================
stage                                                 output
====================================================  =====================================================
per-modality stem: 3×3 conv stride 2 + GroupNorm      ``(B, M·width, S/2)``, modality-major
+ ReLU, then one ResBlock (separate weights)
fusion encoder level ``l``: ResBlock + SE, then       ``(B, channels[l], S/2^(l+1))`` before the ↓2
bilinear/trilinear ↓2
bottleneck (``mask_cond="bottleneck_concat"``):       ``(B, channels[-1] + M, S/2^(L+1))`` →
concat of v broadcast, 1×1 conv, ``bottleneck_blocks``  ``(B, channels[-1], S/2^(L+1))``
ResBlocks
fusion decoder level ``l`` (mirror): ↑2, skip         ``(B, channels[l], S/2^(l+1))``
concatenation, ResBlock + SE
full resolution: ↑2 (undoes the stem stride),         ``(B, width, S)``
ResBlock + SE
head: GroupNorm + SiLU + 1×1 conv                     ``(B, out_channels, S)``
====================================================  =====================================================

With the defaults and a 256² input this is the spec's table: a stem of 32 channels per modality at 128²,
fusion levels 64 / 128 / 128 down to a 128×16×16 bottleneck whose mask concatenation has ``128 + M``
channels (spec §3 invariant 7), and back to ``(32, 256²)`` before the head.

ResBlocks follow DDPM (Ho et al., 2020): GroupNorm → SiLU → 3×3 conv, plus the timestep embedding as a
per-channel bias, → GroupNorm → SiLU → dropout → 3×3 conv, squeeze-and-excitation channel attention
(Hu et al., 2018) on the residual branch, and a 1×1 convolution on the shortcut when the width changes. The
timestep embedding is the DDPM sinusoidal embedding of dimension ``width`` followed by an MLP to
``time_dim`` (default ``4·width``, spec §2.3).

Choices the paper's notes leave open, made here [ours]:

* The per-modality stems (and their ResBlocks) run as one ``groups=M`` computation: the conv weights and
  the per-channel GroupNorm / time-bias parameters of modality ``m`` are the ``m``-th slice along the output
  channels (modality order = ``modalities``), and no group mixes modalities. The stem ResBlocks have no SE.
* Down-sampling is ``F.interpolate`` by 0.5 (``align_corners=False``), i.e. the mean of each 2×2(×2) block;
  up-sampling is bilinear/trilinear ×2.
* Inputs of any size are replicate-padded at the end of each spatial axis to a multiple of
  ``2^(L+1)`` (the image background is −1, so zeros would draw a grey frame) and the output is cropped back.
* ``mask_cond`` switches (spec §2.5): ``"bottleneck_concat"`` (the paper), ``"input_concat"`` (v broadcast to
  full resolution and concatenated to **each modality's stem input**, so every per-modality encoder sees its
  image and the whole mask), ``"film"`` (an MLP of v scales and shifts the bottleneck features,
  ``h·(1 + γ(v)) + β(v)``) and ``"none"`` (v is ignored).
* ``time_embedding=False`` ignores the timestep entirely (no embedding, no per-block time bias): the
  direct-regression baseline is this architecture with ``mask_cond="input_concat"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medmodal.networks.registry import register_network
from medmodal.networks.unet import crop_to

MaskCond = Literal["bottleneck_concat", "input_concat", "film", "none"]
MASK_CONDS: tuple[str, ...] = ("bottleneck_concat", "input_concat", "film", "none")


def _conv(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _interp_mode(spatial_dims: int) -> str:
    return "trilinear" if spatial_dims == 3 else "bilinear"


def _bcast(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B, C)`` → ``(B, C, 1, ..., 1)`` with ``ndim`` dimensions in all."""
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


def timestep_embedding(timestep: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """The DDPM sinusoidal embedding (Ho et al., 2020; Vaswani et al., 2017).

    Shapes: ``timestep (B,)`` (integer or real steps) → ``(B, dim)``: ``[sin(t·f_k), cos(t·f_k)]`` with
    ``f_k = max_period^(−k / (dim/2 − 1))``, ``k = 0 … dim/2 − 1``; an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timestep.device)
    freqs = torch.exp(-math.log(max_period) * k / max(half - 1, 1))
    args = timestep.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al., CVPR 2018): ``x · σ(W₂ SiLU(W₁ mean_S(x)))``.

    SiLU rather than the paper's ReLU [ours]: at initialisation the squeezed vector is nearly the same for
    every sample, so each ReLU unit is dead with probability ~1/2; with 4-8 excitation units, 13 of 60
    tiny networks (seeds 0-29, 2D and 3D) had an SE block whose units were all dead: a constant gate that
    never learns.

    Shapes: ``(B, C, *S)`` → ``(B, C, *S)`` (memory format kept; the squeeze is a spatial mean).
    """

    def __init__(self, *, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=tuple(range(2, x.ndim)))
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        return x * _bcast(gate, x.ndim)


class ResBlock(nn.Module):
    """DDPM residual block with an optional timestep bias and SE attention, optionally grouped.

    ``h = conv₁(SiLU(GN(x))) + W_t·SiLU(t_emb)``; ``h = SE(conv₂(dropout(SiLU(GN(h)))))``; ``out = h + skip(x)``.
    With ``groups = G`` every convolution (and the shortcut) is a ``groups=G`` convolution and GroupNorm uses
    ``G·norm_groups`` groups, so the block is G independent blocks side by side (the per-modality stems).

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: total channels (multiples of ``groups``).
        time_dim: dimension of the timestep embedding, or ``None`` for no time bias.
        groups: independent blocks side by side.
        norm_groups: GroupNorm groups per block.
        se_reduction: SE reduction ratio, or ``None`` for no SE.
        dropout: dropout probability before the second convolution.

    Shapes: ``x (B, in_channels, *S)``, ``temb (B, time_dim)`` or ``None`` → ``(B, out_channels, *S)``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        time_dim: int | None,
        groups: int = 1,
        norm_groups: int = 8,
        se_reduction: int | None = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        self.norm1 = nn.GroupNorm(groups * norm_groups, in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1, groups=groups)
        self.time_proj = None if time_dim is None else nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups * norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, groups=groups)
        self.se = None if se_reduction is None else SqueezeExcitation(channels=out_channels, reduction=se_reduction)
        self.skip = (
            nn.Identity() if in_channels == out_channels else conv(in_channels, out_channels, 1, groups=groups)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            if temb is None:
                raise ValueError("this ResBlock has a timestep projection and needs temb")
            h = h + _bcast(self.time_proj(F.silu(temb)), h.ndim)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.se is not None:
            h = self.se(h)
        return h + self.skip(x)


@register_network("m2dn_denoiser")
class M2DNDenoiser(nn.Module):
    """The M2DN denoiser (IEEE TMI 2024, doc 10444695; ``shared/methods/m2dn.md`` §2.3): ``x̂₀ = f(x_t, t, v)``.

    Args:
        spatial_dims: 2 (the paper's slices) or 3.
        modalities: modality names in the batch's channel order (``M = len(modalities)``).
        out_channels: output channels; ``None`` = M (``x̂₀`` of every modality).
        width: per-modality stem width (and the final full-resolution width).
        channels: fusion-encoder widths; one 2× down-sampling per entry after the stride-2 stem, so the
            bottleneck is ``S / 2^(len(channels)+1)`` with ``channels[-1]`` channels.
        bottleneck_blocks: ResBlocks at the bottleneck (after the mask conditioning).
        time_dim: timestep-embedding dimension; ``None`` = ``4·width``.
        time_embedding: ``False`` ignores the timestep (direct regression).
        mask_cond: how v = 1 − available enters (see the module docstring).
        se_reduction: SE reduction ratio in the fusion ResBlocks.
        norm_groups: GroupNorm groups (per modality in the stem); must divide ``width`` and every ``channels``.
        dropout: dropout in every ResBlock.

    Shapes: ``forward(image (B, M, *S), available (B, M) bool, timestep (B,) | None)`` →
    ``(B, out_channels, *S)``, any ``S``. ``timestep=None`` means step 0.
    """

    #: A denoiser reads its (noisy) missing channels by design, so the registry's "garbage in a missing
    #: channel never changes the output" contract does not apply.
    reads_missing_channels = True

    def __init__(
        self,
        *,
        spatial_dims: int,
        modalities: Sequence[str],
        out_channels: int | None = None,
        width: int = 32,
        channels: Sequence[int] = (64, 128, 128),
        bottleneck_blocks: int = 2,
        time_dim: int | None = None,
        time_embedding: bool = True,
        mask_cond: MaskCond = "bottleneck_concat",
        se_reduction: int = 8,
        norm_groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.modalities = tuple(modalities)
        self.channels = tuple(int(c) for c in channels)
        self.width = int(width)
        self.out_channels = len(self.modalities) if out_channels is None else int(out_channels)
        self.time_dim = 4 * self.width if time_dim is None else int(time_dim)
        self.time_embedding = bool(time_embedding)
        self.mask_cond = mask_cond
        _validate(self, bottleneck_blocks, se_reduction, norm_groups, dropout)

        m = len(self.modalities)
        conv = _conv(spatial_dims)
        tdim = self.time_dim if self.time_embedding else None
        block = dict(spatial_dims=spatial_dims, time_dim=tdim, norm_groups=norm_groups, dropout=dropout)

        if self.time_embedding:
            self.time_mlp = nn.Sequential(
                nn.Linear(self.width, self.time_dim), nn.SiLU(), nn.Linear(self.time_dim, self.time_dim)
            )
        # Per-modality stems, modality-major: input group m is [x_m] or [x_m, v_1..v_M] (input_concat).
        stem_in = 1 + (m if mask_cond == "input_concat" else 0)
        self.stem_conv = conv(m * stem_in, m * self.width, 3, stride=2, padding=1, groups=m)
        self.stem_norm = nn.GroupNorm(m * norm_groups, m * self.width)
        self.stem_block = ResBlock(
            in_channels=m * self.width, out_channels=m * self.width, groups=m, se_reduction=None, **block
        )
        # Fusion encoder.
        enc, prev = [], m * self.width
        for ch in self.channels:
            enc.append(ResBlock(in_channels=prev, out_channels=ch, se_reduction=se_reduction, **block))
            prev = ch
        self.encoder = nn.ModuleList(enc)
        # Bottleneck with the mask conditioning.
        bott = self.channels[-1]
        if mask_cond == "bottleneck_concat":
            self.bottleneck_in = conv(bott + m, bott, 1)
        elif mask_cond == "film":
            self.film = nn.Sequential(nn.Linear(m, self.time_dim), nn.SiLU(), nn.Linear(self.time_dim, 2 * bott))
        self.bottleneck = nn.ModuleList(
            ResBlock(in_channels=bott, out_channels=bott, se_reduction=se_reduction, **block)
            for _ in range(bottleneck_blocks)
        )
        # Fusion decoder (mirror): level l takes the level l+1 output (the bottleneck for the last) + skip l.
        dec = []
        for lvl in reversed(range(len(self.channels))):
            up_ch = self.channels[lvl + 1] if lvl + 1 < len(self.channels) else bott
            dec.append(
                ResBlock(
                    in_channels=up_ch + self.channels[lvl],
                    out_channels=self.channels[lvl],
                    se_reduction=se_reduction,
                    **block,
                )
            )
        self.decoder = nn.ModuleList(dec)
        self.final_block = ResBlock(
            in_channels=self.channels[0], out_channels=self.width, se_reduction=se_reduction, **block
        )
        self.head_norm = nn.GroupNorm(norm_groups, self.width)
        self.head = conv(self.width, self.out_channels, 1)

    @property
    def divisor(self) -> int:
        """The total down-sampling factor ``2^(len(channels)+1)``; inputs are padded to a multiple of it."""
        return 2 ** (len(self.channels) + 1)

    def forward(
        self, image: torch.Tensor, available: torch.Tensor, timestep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict ``x̂₀`` from ``x_t``.

        Args:
            image: ``(B, M, *S)``, the noisy state ``x_t`` (clean available channels, noisy missing ones).
            available: ``(B, M) bool``, True = present; the network is conditioned on ``v = ~available``.
            timestep: ``(B,)`` integer or real diffusion steps, or ``None`` (= 0). Ignored when
                ``time_embedding=False``.

        Returns:
            ``(B, out_channels, *S)``.
        """
        b, m = self._check_inputs(image, available, timestep)
        v = (~available).to(image.dtype)
        temb = None
        if self.time_embedding:
            t = torch.zeros(b, device=image.device) if timestep is None else timestep.reshape(-1).expand(b)
            temb = self.time_mlp(timestep_embedding(t, self.width))

        size = tuple(image.shape[2:])
        x = _pad_replicate(image, self.divisor)
        if self.mask_cond == "input_concat":
            # (B, M, 1 + M, *S) → (B, M·(1 + M), *S): group m is [x_m, v_1, ..., v_M].
            vmap = _bcast(v[:, None, :], x.ndim + 1).expand(b, m, m, *x.shape[2:])
            x = torch.cat([x.unsqueeze(2), vmap], dim=2).flatten(1, 2)
        h = F.relu(self.stem_norm(self.stem_conv(x)))
        h = self.stem_block(h, temb)

        skips = []
        for blk in self.encoder:
            h = blk(h, temb)
            skips.append(h)
            h = self._resample(h, 0.5)

        if self.mask_cond == "bottleneck_concat":
            h = self.bottleneck_in(torch.cat([h, _bcast(v, h.ndim).expand(b, m, *h.shape[2:])], dim=1))
        elif self.mask_cond == "film":
            gamma, beta = self.film(v).chunk(2, dim=1)
            h = h * (1 + _bcast(gamma, h.ndim)) + _bcast(beta, h.ndim)
        for blk in self.bottleneck:
            h = blk(h, temb)

        for blk, skip in zip(self.decoder, reversed(skips), strict=True):
            h = blk(torch.cat([self._resample(h, 2.0), skip], dim=1), temb)
        h = self.final_block(self._resample(h, 2.0), temb)
        out = self.head(F.silu(self.head_norm(h)))
        return crop_to(out, size)

    def _resample(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        return F.interpolate(x, scale_factor=factor, mode=_interp_mode(self.spatial_dims), align_corners=False)

    def _check_inputs(
        self, image: torch.Tensor, available: torch.Tensor, timestep: torch.Tensor | None
    ) -> tuple[int, int]:
        m = len(self.modalities)
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != m:
            raise ValueError(f"expected image (B, {m}, *{self.spatial_dims}D), got {tuple(image.shape)}")
        b = image.shape[0]
        if tuple(available.shape) != (b, m):
            raise ValueError(f"expected available (B, M) = ({b}, {m}), got {tuple(available.shape)}")
        if available.dtype != torch.bool:
            raise ValueError(
                f"available must be a bool tensor (True = present), got {available.dtype}; "
                "pass the availability, not the M2DN mask v = 1 - available"
            )
        if timestep is not None and timestep.numel() not in (1, b):
            raise ValueError(f"expected timestep (B,) = ({b},) or a scalar, got {tuple(timestep.shape)}")
        return b, m


def _pad_replicate(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the spatial axes of ``(B, C, *S)`` at the end up to a multiple of ``multiple``."""
    pad: list[int] = []
    for s in reversed(x.shape[2:]):
        pad += [0, (-s) % multiple]
    return F.pad(x, pad, mode="replicate") if any(pad) else x


def _validate(
    net: M2DNDenoiser, bottleneck_blocks: int, se_reduction: int, norm_groups: int, dropout: float
) -> None:
    if net.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {net.spatial_dims}")
    if not net.modalities or len(set(net.modalities)) != len(net.modalities):
        raise ValueError(f"modalities must be non-empty and unique, got {net.modalities}")
    if net.out_channels < 1:
        raise ValueError(f"out_channels must be >= 1 (or None for one per modality), got {net.out_channels}")
    if not net.channels or min(net.channels) < 1 or net.width < 1:
        raise ValueError(f"width and channels must be positive with at least one level, got {net.width}, "
                         f"{net.channels}")
    if net.time_dim < 1:
        raise ValueError(f"time_dim must be >= 1, got {net.time_dim}")
    if bottleneck_blocks < 0:
        raise ValueError(f"bottleneck_blocks must be >= 0, got {bottleneck_blocks}")
    if net.mask_cond not in MASK_CONDS:
        raise ValueError(f"mask_cond must be one of {', '.join(MASK_CONDS)}, got {net.mask_cond!r}")
    if se_reduction < 1:
        raise ValueError(f"se_reduction must be >= 1, got {se_reduction}")
    if norm_groups < 1 or any(c % norm_groups for c in (net.width, *net.channels)):
        raise ValueError(
            f"norm_groups={norm_groups} must divide width={net.width} and every channels entry {net.channels}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


@register_network("m2dn_denoiser_tiny")
def m2dn_denoiser_tiny(
    *,
    spatial_dims: int,
    modalities: Sequence[str],
    out_channels: int | None = None,
    time_embedding: bool = True,
    mask_cond: MaskCond = "bottleneck_concat",
) -> M2DNDenoiser:
    """A width-8, two-level (8, 16) :class:`M2DNDenoiser` with a 32-dimensional time embedding, for tests."""
    return M2DNDenoiser(
        spatial_dims=spatial_dims,
        modalities=modalities,
        out_channels=out_channels,
        width=8,
        channels=(8, 16),
        bottleneck_blocks=1,
        time_dim=32,
        time_embedding=time_embedding,
        mask_cond=mask_cond,
        se_reduction=4,
        norm_groups=4,
    )
