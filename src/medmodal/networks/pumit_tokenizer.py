"""PUMIT's visual tokenizer (SPAD-VT): a spatially adaptive VQ-style autoencoder with soft tokens (Luo et al.,
*Pre-trained Universal Medical Image Transformer*, arXiv 2312.07630; ``shared/methods/pumit.md`` §2.3).

Images are volumes ``(B, C, X, Y, Z)`` with the slice axis last, in the anisotropy state
:class:`~medmodal.layers.sac.SACState` ``(da, n=0)``; a 2D image is the one-slice volume ``(B, C, X, Y, 1)`` with
``da = 5``. Every strided conv is a SAC layer, so the encoder downsamples in-plane only while the volume is
anisotropic and the decoder upsamples depth exactly as often as the encoder downsampled it.

* **Encoder:** SAC conv ``k = s = stem_stride`` (``C -> widths[0]``) -> LayerNorm -> GELU; per further width a SAC
  conv ``k = s = 2`` -> LayerNorm -> GELU; then 2 x [SAC 3^3 conv -> GroupNorm -> LeakyReLU]. With the defaults
  (stem 4, widths ``(128, 256, 512)``) the stride is 16 and the encoder ends at ``n = 4`` for every DA.
* **Quantiser** (:class:`PUMITQuantizer`): ``"soft"`` (``logits = W z``, ``p = softmax``, ``z_q = p @ codebook``),
  ``"nearest"`` (VQ-VAE, ``beta = 0.25``, straight-through) or ``"gumbel"`` (Gumbel-softmax at a temperature the
  caller anneals).
* **Decoder:** 2 x [SAC 3^3 conv -> GroupNorm -> LeakyReLU]; per width, from the deepest, a SAC transposed conv
  ``k = s = 2`` -> SAC 3^3 conv -> GroupNorm -> LeakyReLU; a final SAC transposed conv ``k = s = stem_stride`` to
  ``C`` channels. ``decode(encode(x))`` has exactly ``x``'s shape.
* **Discriminator**: :class:`~medmodal.networks.pumit_discriminator.PUMITDiscriminator` (re-exported here), a SAC
  patch discriminator for the optional GAN term.

The spec feeds RGB in ``[-1, 1]`` (grey replicated to 3 channels); medmodal's default is ``in_channels=1`` (one
grey channel, no replication); pass ``in_channels=3`` for the official layout.

The prior regularisers and codebook statistics are in :mod:`medmodal.losses.pumit_prior`, the L1 / GAN terms in
:mod:`medmodal.losses.pumit_tokenizer`. This network is not in the network registry: its contract
``forward(image, available) -> (B, out_channels, *S)`` on any spatial shape does not fit a tokenizer (token-sized
inputs, a reconstruction of ``in_channels``, an anisotropy state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medmodal.layers.sac import SACConv, SACConvTranspose, SACState

# the discriminator lives in its own module (registered as "pumit_discriminator"); re-exported here for callers of
# the tokenizer's module
from medmodal.networks.pumit_discriminator import PUMITDiscriminator
from medmodal.networks.registry import register_network

__all__ = ["PUMITDiscriminator", "PUMITQuantizer", "PUMITTokenizer", "QuantOut", "pumit_tokenizer_tiny"]

QuantizerKind = Literal["soft", "nearest", "gumbel"]


class QuantOut(NamedTuple):
    """What the quantiser returns; spatial tensors are ``(B, ., X', Y', Z')`` on the token grid."""

    z_q: torch.Tensor
    """``(B, code_dim, *S')``: the (soft) token embeddings fed to the decoder."""
    probs: torch.Tensor
    """``(B, K, *S')``: code probabilities, summing to one over ``K`` (one-hot for ``"nearest"``)."""
    logits: torch.Tensor
    """``(B, K, *S')``: ``W z`` (``"soft"``, ``"gumbel"``) or ``-||z - e_k||^2`` (``"nearest"``)."""
    vq_loss: torch.Tensor
    """Scalar: VQ-VAE codebook + ``beta`` commitment loss for ``"nearest"``, 0 otherwise. The prior terms are
    computed from ``probs`` by :mod:`medmodal.losses.pumit_prior`."""


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis 1 of ``(B, C, *S)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class _SACBlock(nn.Module):
    """SAC conv -> norm -> activation, threading the SAC state."""

    def __init__(self, conv: SACConv | SACConvTranspose, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act

    def forward(self, x: torch.Tensor, state: SACState) -> tuple[torch.Tensor, SACState]:
        x, state = self.conv(x, state)
        return self.act(self.norm(x)), state


def _conv3_block(channels_in: int, channels_out: int, groups: int) -> _SACBlock:
    conv = SACConv(in_channels=channels_in, out_channels=channels_out, kernel_size=3, stride=1)
    return _SACBlock(conv, nn.GroupNorm(groups, channels_out), nn.LeakyReLU())


class _UpBlock(nn.Module):
    """SAC transposed conv ``k = s = 2`` -> SAC 3^3 conv -> GroupNorm -> LeakyReLU."""

    def __init__(self, channels_in: int, channels_out: int, groups: int) -> None:
        super().__init__()
        self.up = SACConvTranspose(in_channels=channels_in, out_channels=channels_out, kernel_size=2, stride=2)
        self.block = _conv3_block(channels_out, channels_out, groups)

    def forward(self, x: torch.Tensor, state: SACState) -> tuple[torch.Tensor, SACState]:
        return self.block(*self.up(x, state))


class PUMITQuantizer(nn.Module):
    """The tokenizer's quantiser (spec §2.3).

    Args:
        in_dim: channels of the encoder output ``z``.
        num_codes: ``K``.
        code_dim: dimension of the codebook entries ``e_k`` (the decoder's input channels); ``"nearest"`` projects
            ``z`` to it with a linear map when it differs from ``in_dim``.
        kind: ``"soft"`` | ``"nearest"`` | ``"gumbel"``.
        beta: the VQ-VAE commitment weight (``"nearest"``).
    """

    def __init__(
        self, *, in_dim: int, num_codes: int, code_dim: int, kind: QuantizerKind = "soft", beta: float = 0.25
    ) -> None:
        super().__init__()
        if kind not in ("soft", "nearest", "gumbel"):
            raise ValueError(f"quantizer must be 'soft', 'nearest' or 'gumbel', got {kind!r}")
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {num_codes}")
        self.kind, self.beta, self.num_codes = kind, beta, num_codes
        self.codebook = nn.Parameter(torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))
        self.proj: nn.Linear | None = None
        if kind == "nearest":
            self.proj = nn.Linear(in_dim, code_dim) if in_dim != code_dim else None
        else:
            self.proj = nn.Linear(in_dim, num_codes)  # the logits W z

    def embed(self, probs: torch.Tensor) -> torch.Tensor:
        """Soft token embeddings ``z_q = sum_k p_k e_k``: ``(B, K, *S) -> (B, code_dim, *S)`` (one-hot ``p`` on
        code ``k`` gives exactly ``e_k``, invariant 6)."""
        return torch.einsum("bk...,kd->bd...", probs, self.codebook)

    def forward(self, z: torch.Tensor, *, temperature: float = 1.0) -> QuantOut:
        """Quantise ``z (B, in_dim, *S)``; ``temperature`` is the Gumbel-softmax temperature (``"gumbel"`` only;
        annealed 0.9 -> 1e-6 by the caller). In eval mode ``"gumbel"`` embeds the argmax code."""
        zc = z.movedim(1, -1)  # (B, *S, in_dim)
        zero = z.new_zeros(())
        if self.kind == "nearest":
            if self.proj is not None:
                zc = self.proj(zc)
            dist = (
                zc.square().sum(-1, keepdim=True) - 2 * zc @ self.codebook.t() + self.codebook.square().sum(-1)
            )  # (B, *S, K)
            index = dist.argmin(-1)
            e = self.codebook[index]
            vq_loss = F.mse_loss(e, zc.detach()) + self.beta * F.mse_loss(zc, e.detach())
            z_q = (zc + (e - zc).detach()).movedim(-1, 1)
            probs = F.one_hot(index, self.num_codes).to(z.dtype).movedim(-1, 1)
            return QuantOut(z_q, probs, (-dist).movedim(-1, 1), vq_loss)
        assert self.proj is not None
        logits = self.proj(zc).movedim(-1, 1)  # (B, K, *S)
        probs = logits.softmax(1)
        if self.kind == "gumbel":
            if temperature <= 0:
                raise ValueError(f"gumbel temperature must be > 0, got {temperature}")
            sample = F.gumbel_softmax(logits, tau=temperature, hard=not self.training, dim=1)
            return QuantOut(self.embed(sample), probs, logits, zero)
        return QuantOut(self.embed(probs), probs, logits, zero)


@register_network("pumit_tokenizer")
class PUMITTokenizer(nn.Module):
    """The PUMIT visual tokenizer (see the module docstring).

    Args:
        in_channels: image channels ``C`` (1: medmodal's grey default; 3: the official RGB layout).
        widths: encoder widths, from the stem to the deepest (decoder mirrored); each divisible by ``norm_groups``.
        stem_stride: ``k = s`` of the first conv, a power of 2 (4: total stride 16; 2: stride 8 for the CPU recipe).
        num_codes: codebook size ``K`` (1024 in the paper).
        code_dim: codebook entry dimension (default ``widths[-1]``, 512 in the paper).
        quantizer: ``"soft"`` (default, the paper's contribution) | ``"nearest"`` | ``"gumbel"``.
        beta: VQ-VAE commitment weight for ``"nearest"``.
        norm_groups: GroupNorm groups of the 3^3 blocks (8).

    Shapes: ``x (B, C, X, Y, Z)`` in state ``(da, 0)``; ``X`` and ``Y`` multiples of the stride ``2^M``
    (``M = log2(stem_stride) + len(widths) - 1``), ``Z`` a multiple of ``2^max(M - da, 0)``; token grid
    ``(X / 2^M, Y / 2^M, Z / 2^max(M - da, 0))``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (128, 256, 512),
        stem_stride: int = 4,
        num_codes: int = 1024,
        code_dim: int | None = None,
        quantizer: QuantizerKind = "soft",
        beta: float = 0.25,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 or w % norm_groups for w in widths):
            raise ValueError(f"widths must be non-empty multiples of norm_groups={norm_groups}, got {widths}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        code_dim = widths[-1] if code_dim is None else code_dim
        self.in_channels, self.widths, self.stem_stride = in_channels, widths, stem_stride
        stem = SACConv(in_channels=in_channels, out_channels=widths[0], kernel_size=stem_stride, stride=stem_stride)
        self.num_downsamplings = stem.m + len(widths) - 1
        down = [_SACBlock(stem, _ChannelLayerNorm(widths[0]), nn.GELU())]
        for w_in, w_out in zip(widths, widths[1:], strict=False):
            conv = SACConv(in_channels=w_in, out_channels=w_out, kernel_size=2, stride=2)
            down.append(_SACBlock(conv, _ChannelLayerNorm(w_out), nn.GELU()))
        down += [_conv3_block(widths[-1], widths[-1], norm_groups) for _ in range(2)]
        self.encoder = nn.ModuleList(down)
        self.quantizer = PUMITQuantizer(
            in_dim=widths[-1], num_codes=num_codes, code_dim=code_dim, kind=quantizer, beta=beta
        )
        up: list[nn.Module] = [
            _conv3_block(code_dim, widths[-1], norm_groups),
            _conv3_block(widths[-1], widths[-1], norm_groups),
        ]
        up += [_UpBlock(w_in, w_out, norm_groups) for w_in, w_out in zip(widths[::-1], widths[-2::-1], strict=False)]
        self.decoder = nn.ModuleList(up)
        self.head = SACConvTranspose(
            in_channels=widths[0], out_channels=in_channels, kernel_size=stem_stride, stride=stem_stride
        )

    @property
    def stride(self) -> int:
        """The in-plane stride ``2^M`` (the token size)."""
        return 1 << self.num_downsamplings

    def token_size(self, da: int) -> tuple[int, int, int]:
        """The voxels per token ``(2^M, 2^M, 2^max(M - da, 0))`` of an image with degree of anisotropy ``da``."""
        return (self.stride, self.stride, 1 << max(self.num_downsamplings - da, 0))

    def _check_image(self, x: torch.Tensor, state: SACState) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"tokenizer expects an image (B, {self.in_channels}, X, Y, Z) with the slice axis last, got shape "
                f"{tuple(x.shape)}; a 2D image is the one-slice volume (B, C, X, Y, 1) with da=5"
            )
        if state.n != 0:
            raise ValueError(f"tokenizer input must be at full resolution (n=0), got {state}")
        size = self.token_size(state.da)
        if any(s < t or s % t for s, t in zip(x.shape[2:], size, strict=True)):
            raise ValueError(
                f"tokenizer input spatial shape {tuple(x.shape[2:])} at da={state.da} must be a positive multiple of "
                f"the token size {size}; crop or pad the image"
            )

    def encode(self, x: torch.Tensor, state: SACState) -> tuple[torch.Tensor, SACState]:
        """``x (B, C, X, Y, Z)`` in ``(da, 0)`` -> ``(z (B, widths[-1], *tokens), (da, M))``."""
        self._check_image(x, state)
        for block in self.encoder:
            x, state = block(x, state)
        return x, state

    def quantize(self, z: torch.Tensor, *, temperature: float = 1.0) -> QuantOut:
        """See :class:`PUMITQuantizer`."""
        return self.quantizer(z, temperature=temperature)

    def decode(self, z_q: torch.Tensor, state: SACState) -> tuple[torch.Tensor, SACState]:
        """``z_q (B, code_dim, *tokens)`` in ``(da, M)`` -> ``(x_hat (B, C, X, Y, Z), (da, 0))``."""
        if state.n != self.num_downsamplings:
            raise ValueError(f"decode expects the encoder's state n={self.num_downsamplings}, got {state}")
        for block in self.decoder:
            z_q, state = block(z_q, state)
        return self.head(z_q, state)

    def forward(self, x: torch.Tensor, da: int, *, temperature: float = 1.0) -> tuple[torch.Tensor, QuantOut]:
        """Reconstruct ``x (B, C, X, Y, Z)`` of degree of anisotropy ``da``: ``(x_hat (same shape), QuantOut)``."""
        z, state = self.encode(x, SACState(da))
        quant = self.quantize(z, temperature=temperature)
        x_hat, _ = self.decode(quant.z_q, state)
        return x_hat, quant

    def tokenize(self, x: torch.Tensor, da: int) -> torch.Tensor:
        """The code logits ``(B, K, *tokens)`` of ``x`` (MIM targets are ``logits.softmax(1)``). Call it on a frozen
        tokenizer in eval mode under ``torch.no_grad()``."""
        z, _ = self.encode(x, SACState(da))
        return self.quantize(z).logits


def pumit_tokenizer_tiny(**kwargs: object) -> PUMITTokenizer:
    """The CPU-sized tokenizer of the spec's ``pumit_tiny`` recipe: widths (16, 32, 64), stem 2 (stride 8), 64 codes
    of dimension 32 (``kwargs`` override)."""
    config: dict[str, object] = {"widths": (16, 32, 64), "stem_stride": 2, "num_codes": 64, "code_dim": 32}
    config.update(kwargs)
    return PUMITTokenizer(**config)  # type: ignore[arg-type]
