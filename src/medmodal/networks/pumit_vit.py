"""PUMIT's ViT (SPAD-ViT): a vision transformer for 2D and 3D images of any voxel spacing.

L. Luo, X. Chen, B. Tang, et al., *Pre-trained Universal Medical Image Transformer*, arXiv 2312.07630 (v2: *Building
Universal Foundation Models for Medical Image Analysis with Spatially Adaptive Networks*); ``shared/methods/pumit.md``
§2.4. Tensors are ``(B, C, X, Y, Z)`` with the thick slice axis LAST; a 2D image ``(B, C, X, Y)`` is the one-slice
volume ``(B, C, X, Y, 1)`` at the DA of a 2D image (:data:`~medmodal.layers.sac.MAX_DA` = 5).

Architecture (``P`` = ``patch_size``, ``W`` = ``width``):

* **Patch embedding:** a :class:`~medmodal.layers.sac.SACConv` with ``k = s = P``: the in-plane patch is ``P`` and
  the depth patch ``P_z = max(P >> DA, 1)`` (16 >> 2 = 4 for a DA-2 volume). An input that is not a multiple of
  ``(P, P, P_z)`` is zero-padded at the high end of each axis, so the token grid is
  ``G = (ceil(X / P), ceil(Y / P), ceil(Z / P_z))`` (:meth:`PUMITViT.token_grid`); tokens are ordered row-major over
  ``G`` (``Z`` fastest), ``L = prod(G)``.
* **Absolute position:** a learned grid ``(1, W, *pos_grid)`` (spec: 10 x 10 x 5 in medmodal's axis order)
  resampled to ``G`` (:func:`resample_position_grid`), added to the patch tokens; a cls token (no absolute position)
  is prepended.
* **Blocks** (``num_layers``, pre-norm): ``x + Attn(LN(x))`` then ``x + SwiGLU(LN(x))``. Attention has ``num_heads``
  heads, a bias on q and v but not on k (BEiT/EVA), 3D rotary embedding on q and k of the non-cls tokens
  (:class:`RotaryEmbedding3D`) and :func:`torch.nn.functional.scaled_dot_product_attention` (the official code
  requires xformers; spec §2.6 ``attention``). The MLP is SwiGLU with hidden width ``int(W * mlp_ratio)``
  (8/3: the parameter count of a 4x GELU MLP) and a LayerNorm on the hidden features (sub-LN). A final LayerNorm.
* **Heads**, each built only when asked for, so that every parameter of a model gets a gradient in the one task it
  is built for: ``codebook_size`` -> a learned mask token and the MIM head Linear-GELU-Linear -> ``K`` logits
  (:meth:`PUMITViT.forward_mim`); ``num_classes`` -> a Linear on the pooled tokens (cls token or the mean of the
  grid tokens; :meth:`PUMITViT.classify`); ``out_channels`` -> a convolutional segmentation decoder over the token
  grid (:meth:`PUMITViT.segment`).

**MIM** (spec §2.4, the official ``ViTForMIM.forward``): the cls token and the visible patch tokens are scattered
into a sequence of mask tokens (which carry no absolute position, only RoPE). A block listed in ``mask_layer_ids``
runs on the whole sequence; any other block runs on the cls + visible tokens only and writes them back (the masked
positions keep what they had; a run of such blocks gathers and scatters once). All layers listed = BEiT-style
(ViT-B); only the later ones = MAE-like (ViT-L: the last 6 of 24).

**3D RoPE** [ours where it differs]: the head dimension ``D`` is rotated as ``D / 2`` pairs ``(2i, 2i + 1)``, split
across the axes: ``P_z = (D/2) // 3`` pairs for depth, ``P_x = ceil((D/2 - P_z) / 2)`` for ``X``, the rest
``P_y`` for ``Y`` (head dim 64: 11 / 11 / 10; head dim 16: 3 / 3 / 2; :func:`rope_pairs`). The pair ``j`` of an
axis with ``n`` pairs and base ``b`` turns by ``g * b^(-j/n)`` radians at token index ``g`` along that axis, with
``b = 10000`` in-plane and ``2333`` in depth (the spec's bases). The official code (``merge_hw``, EVA-02
compatible) instead adds a depth angle to every in-plane pair; both make the q·k score depend on the token offset
only (the relative-position property), and the split keeps the three axes on separate pairs.

**Segmentation decoder** [ours, kept simple]: ``log2 P`` stages of [:class:`~medmodal.layers.sac.SACConvTranspose`
``k = s = 2`` -> SAC ``3^3`` conv -> GroupNorm -> GELU], starting from the final-LN grid tokens; the SAC state
makes each stage double the depth only while the patch embedding's depth downsampling is not yet undone
(``u = max(n - DA, 0) > 0``), so the decoder ends exactly on the (padded) input grid for every DA. A last SAC
``3^3`` block sees the decoder features concatenated with the input image (a full-resolution skip), then a
``1^3`` conv gives the logits, cropped back to the input's exact shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medmodal.layers.sac import MAX_DA, SACConv, SACConvTranspose, SACState
from medmodal.networks.registry import register_network
from medmodal.networks.unet import mask_missing

__all__ = [
    "DEPTH_ROPE_BASE",
    "PLANE_ROPE_BASE",
    "PUMITViT",
    "PUMITViTSegmenter",
    "RotaryEmbedding3D",
    "ViTTokens",
    "apply_rope",
    "pumit_vit_base",
    "pumit_vit_large",
    "position_tokens",
    "pumit_vit_tiny",
    "resample_position_grid",
    "rope_pairs",
]

#: RoPE frequency base of the depth (slice) axis, spec §2.4.
DEPTH_ROPE_BASE = 2333.0
#: RoPE frequency base of the two in-plane axes, spec §2.4.
PLANE_ROPE_BASE = 10000.0

Grid = tuple[int, int, int]


class ViTTokens(NamedTuple):
    """What :meth:`PUMITViT.encode` returns.

    Attributes:
        tokens: ``(B, 1 + L_visible, width)`` after the final LayerNorm; index 0 is the cls token.
        grid: the token grid ``(G_x, G_y, G_z)`` of the whole input (``L = G_x G_y G_z``).
    """

    tokens: torch.Tensor
    grid: Grid


def resample_position_grid(pos: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a learned position grid ``(1, W, gx, gy, gz)`` to the token grid ``size`` (spec §2.4).

    Axes that shrink are reduced by area averaging (``F.interpolate(mode="area")``), axes that grow are interpolated
    (tri)linearly (``align_corners=False``); an axis is never both. At the stored size the parameter itself is
    returned. Both are separable, so this is :func:`position_tokens` viewed as a grid ``(1, W, *size)``.
    """
    size = tuple(int(s) for s in size)
    if size == tuple(pos.shape[2:]):
        return pos
    return position_tokens(pos, size).t().reshape(1, pos.shape[1], *size)


@functools.lru_cache(maxsize=128)
def _axis_resampling(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)``: the 1D area average (``n_out < n_in``) or linear interpolation (``n_out > n_in``,
    ``align_corners=False``) as a matrix, i.e. ``F.interpolate`` of each basis vector (computed in float64)."""
    with torch.inference_mode(False), torch.no_grad():  # a cached tensor must be usable in autograd later
        eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(0)  # (1, n_in channels, n_in): one basis vector each
        if n_out < n_in:
            out = F.interpolate(eye, size=n_out, mode="area")
        else:
            out = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)
        return out[0].t().to(dtype=dtype, device=device).contiguous()


def position_tokens(pos: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The position grid ``(1, W, gx, gy, gz)`` resampled to ``size = (G_x, G_y, G_z)`` as token rows ``(L, W)``
    (row-major over ``size``, ``Z`` fastest; the rules of :func:`resample_position_grid`).

    The resampling is a product of one matrix per axis, applied as three matrix products on the grid stored
    ``W``-last (no 3D pooling kernels, cheap backward); the matrices are cached per size, dtype and device.
    """
    size = tuple(int(s) for s in size)
    width, current = pos.shape[1], tuple(pos.shape[2:])
    if len(size) != 3 or len(current) != 3 or pos.shape[0] != 1:
        raise ValueError(f"expected a grid (1, W, gx, gy, gz) and a 3D size, got {tuple(pos.shape)} and {size}")
    rows = pos.reshape(width, -1).t()  # (gx gy gz, W)
    if size == current:
        return rows
    (gx, gy, gz), (sx, sy, sz) = current, size
    matrix = [None if n == m else _axis_resampling(n, m, pos.dtype, pos.device)
              for n, m in zip(current, size, strict=True)]
    t = rows.reshape(gx, gy * gz * width)
    if matrix[0] is not None:
        t = matrix[0] @ t  # (sx, gy gz W)
    t = t.view(sx, gy, gz * width)
    if matrix[1] is not None:
        t = matrix[1] @ t  # (sx, sy, gz W)
    t = t.view(sx * sy, gz, width)
    if matrix[2] is not None:
        t = matrix[2] @ t  # (sx sy, sz, W)
    return t.reshape(sx * sy * sz, width)


def rope_pairs(head_dim: int) -> Grid:
    """How many rotation pairs each axis ``(X, Y, Z)`` gets from a head of ``head_dim`` features (module doc).

    Raises:
        ValueError: an odd ``head_dim`` or one below 6 (each axis needs at least one pair).
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dimension of at least 6 (width / num_heads), got {head_dim}")
    pairs = head_dim // 2
    pz = pairs // 3
    px = (pairs - pz + 1) // 2
    return px, pairs - pz - px, pz


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the feature pairs ``(2i, 2i + 1)`` of ``x (..., D)`` by the unit complex numbers ``rotation
    (..., D / 2)`` (``exp(i theta)``, broadcast against ``x``'s leading dimensions).

    The pair ``(a, b)`` becomes ``(a cos - b sin, a sin + b cos)``: one complex product on a view of the pairs, so
    no strided slices or re-interleaving copies (forward or backward). Half-precision ``x`` is rotated in float32
    and cast back (there is no complex bfloat16).
    """
    pairs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    pairs = pairs.unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-2]) or pairs.stride(-1) != 1:
        pairs = pairs.contiguous()  # view_as_complex needs whole complex numbers in memory
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).to(x.dtype)


class RotaryEmbedding3D(nn.Module):
    """Rotary position embedding over a 3D token grid (spec §2.4; pair split in the module doc).

    Args:
        head_dim: features per attention head (even, >= 6).
        plane_base: frequency base of ``X`` and ``Y``.
        depth_base: frequency base of ``Z``.

    ``forward(grid) -> rotation``: ``(L, head_dim / 2)`` complex ``exp(i theta)`` for the ``L = prod(grid)`` tokens in
    row-major order (:func:`apply_rope`); with ``cls_token=True`` a first row of ones (no rotation) is prepended.
    """

    inv_freq: torch.Tensor
    axis: torch.Tensor

    def __init__(
        self, *, head_dim: int, plane_base: float = PLANE_ROPE_BASE, depth_base: float = DEPTH_ROPE_BASE
    ) -> None:
        super().__init__()
        self.pairs = rope_pairs(head_dim)
        freqs, axes = [], []
        for a, (n, base) in enumerate(zip(self.pairs, (plane_base, plane_base, depth_base), strict=True)):
            freqs.append(base ** (-torch.arange(n, dtype=torch.float64) / n))
            axes.append(torch.full((n,), a))
        self.register_buffer("inv_freq", torch.cat(freqs).float(), persistent=False)
        self.register_buffer("axis", torch.cat(axes), persistent=False)

    def angles(self, grid: Sequence[int]) -> torch.Tensor:
        """``(L, head_dim / 2)`` rotation angles of the tokens of ``grid``."""
        coords = torch.cartesian_prod(*(torch.arange(g, device=self.inv_freq.device) for g in grid))
        coords = coords.reshape(-1, 3).to(self.inv_freq.dtype)  # (L, 3); cartesian_prod of one axis is 1D
        return coords[:, self.axis] * self.inv_freq

    def forward(self, grid: Sequence[int], *, cls_token: bool = False) -> torch.Tensor:
        theta = self.angles(grid)
        if cls_token:
            theta = torch.cat((theta.new_zeros(1, theta.shape[1]), theta))
        return torch.complex(theta.cos(), theta.sin())


class _Attention(nn.Module):
    """Multi-head self-attention with q/v biases (no k bias) and RoPE on q and k (the cls row of the rotation is
    one: no rotation).

    One ``F.linear`` with the bias ``(q_bias, 0, v_bias)`` (the zero k part is a buffer); q, k and v are views of
    its output, RoPE is one complex product each on q and k (:func:`apply_rope`), and the heads are split by views
    only: the forward pass makes no copies besides those of the arithmetic itself.
    """

    k_bias: torch.Tensor

    def __init__(self, *, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("k_bias", torch.zeros(width), persistent=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """``x (B, N, W)``, ``rope (N, Dh / 2)`` or ``(B, N, Dh / 2)`` complex (row 0: the cls token's ones)."""
        batch, length, _ = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each (B, N, H, Dh); the backward stacks their gradients in one copy
        rope = rope.unsqueeze(-2)  # broadcast over the heads
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, H, N, Dh) -> (B, N, W)


class _SwiGLU(nn.Module):
    """``w3(LN(SiLU(w1 x) * w2 x))``: SwiGLU with a LayerNorm on the hidden features (sub-LN, EVA-02)."""

    def __init__(self, *, width: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.norm = nn.LayerNorm(hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.norm(F.silu(gate) * value))


class _Block(nn.Module):
    def __init__(self, *, width: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _Attention(width=width, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = _SwiGLU(width=width, hidden=hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class _DecoderStage(nn.Module):
    """SAC transposed conv ``k = s = 2`` (when ``up``) -> SAC ``3^3`` conv -> GroupNorm -> GELU."""

    def __init__(self, *, in_channels: int, out_channels: int, up: bool) -> None:
        super().__init__()
        self.up = None
        if up:
            self.up = SACConvTranspose(in_channels=in_channels, out_channels=out_channels, kernel_size=2, stride=2)
        mid = out_channels if up else in_channels
        self.conv = SACConv(in_channels=mid, out_channels=out_channels, kernel_size=3, stride=1, bias=False)
        self.norm = nn.GroupNorm(math.gcd(8, out_channels), out_channels)

    def forward(self, x: torch.Tensor, state: SACState) -> tuple[torch.Tensor, SACState]:
        if self.up is not None:
            x, state = self.up(x, state)
        x, state = self.conv(x, state)
        return F.gelu(self.norm(x)), state


@register_network("pumit_vit")
class PUMITViT(nn.Module):
    """PUMIT's spacing-adaptive ViT with optional MIM, classification and segmentation heads (module doc).

    Args:
        in_channels: input channels ``C`` (3 in the spec: RGB; grey images replicated).
        patch_size: in-plane patch ``P`` (a power of 2; 16 in the spec). The depth patch is ``max(P >> DA, 1)``.
        width: token features ``W`` (768 ViT-B, 1024 ViT-L).
        num_layers: transformer blocks (12 ViT-B, 24 ViT-L).
        num_heads: attention heads (12 ViT-B, 16 ViT-L); ``W / num_heads`` must be even and >= 6.
        mlp_ratio: SwiGLU hidden width over ``W`` (8/3).
        pos_grid: size ``(gx, gy, gz)`` of the learned absolute position grid (spec: 10 x 10 x 5, depth last).
        max_da: the DA of a 2D image; DAs above it are refused.
        plane_rope_base: RoPE base of ``X`` and ``Y``.
        depth_rope_base: RoPE base of ``Z``.
        codebook_size: ``K`` for masked image modelling (a mask token and the MIM head), or ``None``.
        num_classes: classes of the classification head, or ``None``.
        pool: what :meth:`classify` pools: ``"cls"`` (the cls token) or ``"mean"`` (the mean of the grid tokens).
        out_channels: channels of the segmentation decoder's output, or ``None``.
        decoder_channels: the decoder's channels per stage, ``log2(P) + 1`` of them (the last at full resolution);
            default halves ``W`` per stage, at least 8.

    Raises:
        ValueError: a patch size that is not a power of 2, a width not divisible by ``num_heads``, a bad head
            dimension, pool name or decoder channel count.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        patch_size: int = 16,
        width: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 8 / 3,
        pos_grid: Sequence[int] = (10, 10, 5),
        max_da: int = MAX_DA,
        plane_rope_base: float = PLANE_ROPE_BASE,
        depth_rope_base: float = DEPTH_ROPE_BASE,
        codebook_size: int | None = None,
        num_classes: int | None = None,
        pool: Literal["cls", "mean"] = "cls",
        out_channels: int | None = None,
        decoder_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of 2, got {patch_size}")
        if width % num_heads:
            raise ValueError(f"width ({width}) must be divisible by num_heads ({num_heads})")
        if len(pos_grid) != 3 or min(pos_grid) < 1:
            raise ValueError(f"pos_grid must be three positive sizes (gx, gy, gz), got {tuple(pos_grid)}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.in_channels, self.patch_size, self.width = in_channels, patch_size, width
        self.max_da, self.pool = max_da, pool
        self.patch_embed = SACConv(
            in_channels=in_channels, out_channels=width, kernel_size=patch_size, stride=patch_size
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, width, *pos_grid))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.rope = RotaryEmbedding3D(
            head_dim=width // num_heads, plane_base=plane_rope_base, depth_base=depth_rope_base
        )
        hidden = int(width * mlp_ratio)
        self.blocks = nn.ModuleList(_Block(width=width, num_heads=num_heads, hidden=hidden) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)

        self.mask_token: nn.Parameter | None = None
        self.mim_head: nn.Module | None = None
        if codebook_size is not None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            self.mim_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, codebook_size))
        self.cls_head = nn.Linear(width, num_classes) if num_classes is not None else None
        self.decoder: nn.ModuleList | None = None
        self.seg_head: nn.Module | None = None
        if out_channels is not None:
            self._build_decoder(out_channels, decoder_channels)
        self._init_weights()

    def _build_decoder(self, out_channels: int, decoder_channels: Sequence[int] | None) -> None:
        stages = self.patch_size.bit_length() - 1
        if decoder_channels is None:
            decoder_channels = [max(self.width >> (i + 1), 8) for i in range(stages + 1)]
        if len(decoder_channels) != stages + 1:
            raise ValueError(
                f"decoder_channels needs log2(patch_size) + 1 = {stages + 1} entries, got {tuple(decoder_channels)}"
            )
        chans = [self.width, *decoder_channels]
        self.decoder = nn.ModuleList(
            _DecoderStage(in_channels=chans[i], out_channels=chans[i + 1], up=True) for i in range(stages)
        )
        self.decoder.append(
            _DecoderStage(in_channels=chans[stages] + self.in_channels, out_channels=chans[stages + 1], up=False)
        )
        self.seg_head = nn.Conv3d(chans[-1], out_channels, kernel_size=1)

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.cls_token, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ geometry

    def depth_patch(self, da: int) -> int:
        """The depth patch ``max(P >> DA, 1)`` of the SAC patch embedding at ``da``."""
        return max(self.patch_size >> da, 1)

    def token_grid(self, spatial_shape: Sequence[int], da: int) -> Grid:
        """Token grid ``(G_x, G_y, G_z)`` of an input of spatial shape ``(X, Y)`` or ``(X, Y, Z)`` at ``da``
        (``ceil`` of each axis over its patch; a 2D shape has ``G_z = 1``)."""
        shape = (*spatial_shape, 1) if len(spatial_shape) == 2 else tuple(spatial_shape)
        p, pz = self.patch_size, self.depth_patch(da)
        return -(-shape[0] // p), -(-shape[1] // p), -(-shape[2] // pz)

    def _as_volume(self, x: torch.Tensor, da: int) -> torch.Tensor:
        """Check ``x`` and ``da``, make a 2D image a one-slice volume, zero-pad to whole patches."""
        if x.ndim not in (4, 5) or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PUMITViT expects an image (B, {self.in_channels}, X, Y) or a volume (B, {self.in_channels}, X, Y, Z)"
                f" with the slice axis last, got shape {tuple(x.shape)}"
            )
        if isinstance(da, bool) or not isinstance(da, int) or not 0 <= da <= self.max_da:
            raise ValueError(f"da must be an int in [0, {self.max_da}] (one DA per batch), got {da!r}")
        if x.ndim == 4:
            if da != self.max_da:
                raise ValueError(f"a 2D image is a one-slice volume at DA {self.max_da}, got da={da}")
            x = x.unsqueeze(-1)
        grid = self.token_grid(x.shape[2:], da)
        patch = (self.patch_size, self.patch_size, self.depth_patch(da))
        pads = [g * p - s for g, p, s in zip(grid, patch, x.shape[2:], strict=True)]
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        return x

    def _embed(self, x: torch.Tensor, da: int) -> tuple[torch.Tensor, Grid, SACState]:
        """``x`` -> patch tokens with absolute position ``(B, L, W)``, the grid, the SAC state after the embedding."""
        z, state = self.patch_embed(self._as_volume(x, da), SACState(da))
        grid: Grid = tuple(z.shape[2:])  # type: ignore[assignment]
        return z.flatten(2).transpose(1, 2) + position_tokens(self.pos_embed, grid), grid, state

    def _check_visible(self, visible: torch.Tensor, batch: int, length: int) -> None:
        if visible.ndim != 2 or visible.shape[0] != batch or visible.dtype != torch.long:
            raise ValueError(f"visible must be a LongTensor (B={batch}, n), got {visible.dtype} {tuple(visible.shape)}")
        if visible.numel() and (int(visible.min()) < 0 or int(visible.max()) >= length):
            raise ValueError(f"visible indices must lie in [0, L={length}) (cls excluded)")

    # ------------------------------------------------------------------ encoder

    def encode(self, x: torch.Tensor, da: int, *, visible: torch.Tensor | None = None) -> ViTTokens:
        """Encode an image or volume.

        Args:
            x: ``(B, C, X, Y)`` (2D, at ``da = max_da``) or ``(B, C, X, Y, Z)``.
            da: the batch's degree of anisotropy.
            visible: optional ``(B, n)`` indices into the ``L`` grid tokens to keep (MAE-style encoding of the
                visible tokens only, e.g. from :func:`medmodal.losses.pumit.random_visible`).

        Returns:
            :class:`ViTTokens`: tokens ``(B, 1 + n, W)`` (``n = L`` without ``visible``) and the grid.
        """
        tokens, grid, _ = self._embed(x, da)
        rope = self.rope(grid, cls_token=True)  # (1 + L, Dh / 2)
        if visible is not None:
            self._check_visible(visible, tokens.shape[0], tokens.shape[1])
            tokens = tokens.gather(1, visible.unsqueeze(-1).expand(-1, -1, self.width))
            rope = rope[torch.cat((visible.new_zeros(visible.shape[0], 1), visible + 1), dim=1)]  # (B, 1 + n, .)
        seq = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        for block in self.blocks:
            seq = block(seq, rope)
        return ViTTokens(self.norm(seq), grid)

    def forward(self, x: torch.Tensor, da: int) -> torch.Tensor:
        """``encode(x, da).tokens``: ``(B, 1 + L, W)``."""
        return self.encode(x, da).tokens

    def forward_mim(
        self, x: torch.Tensor, da: int, visible: torch.Tensor, mask_layer_ids: Iterable[int]
    ) -> torch.Tensor:
        """Masked image modelling logits (spec §2.4; scattering rules in the module doc).

        Args:
            x: ``(B, C, X, Y)`` or ``(B, C, X, Y, Z)``.
            da: the batch's degree of anisotropy.
            visible: ``(B, n)`` indices of the visible grid tokens (distinct; the cls token is always visible).
            mask_layer_ids: blocks (0-based) that run on the whole sequence with mask tokens.

        Returns:
            ``(B, L, K)`` logits at every grid position (the loss reads the masked ones).
        """
        if self.mim_head is None or self.mask_token is None:
            raise ValueError("forward_mim needs a model built with codebook_size")
        layer_ids = set(mask_layer_ids)
        if not layer_ids <= set(range(len(self.blocks))):
            raise ValueError(f"mask_layer_ids must lie in [0, {len(self.blocks)}), got {sorted(layer_ids)}")
        tokens, grid, _ = self._embed(x, da)
        batch, length, width = tokens.shape
        self._check_visible(visible, batch, length)
        rope_all = self.rope(grid, cls_token=True)  # (1 + L, Dh / 2)
        cls = self.cls_token.expand(batch, -1, -1)
        # positions of cls + visible tokens in the full sequence, expanded over features
        kept = torch.cat((visible.new_zeros(batch, 1), visible + 1), dim=1)  # (B, 1 + n)
        rope_visible = rope_all[kept]
        keep = kept.unsqueeze(-1).expand(-1, -1, width)
        seq = torch.cat((cls, self.mask_token.expand(batch, length, -1)), dim=1)
        seq = seq.scatter(1, keep, torch.cat((cls, tokens.gather(1, keep[:, 1:] - 1)), dim=1))
        part: torch.Tensor | None = None  # cls + visible tokens while a run of unmasked blocks lasts
        for i, block in enumerate(self.blocks):
            if i in layer_ids:
                if part is not None:  # write the run's result back once (the masked positions kept theirs)
                    seq, part = seq.scatter(1, keep, part), None
                seq = block(seq, rope_all)
            else:
                part = block(seq.gather(1, keep) if part is None else part, rope_visible)
        if part is not None:
            seq = seq.scatter(1, keep, part)
        return self.mim_head(self.norm(seq[:, 1:]))

    # ------------------------------------------------------------------ fine-tuning heads

    def classify(self, x: torch.Tensor, da: int) -> torch.Tensor:
        """``(B, num_classes)`` logits from the cls token or the mean grid token (``pool``)."""
        if self.cls_head is None:
            raise ValueError("classify needs a model built with num_classes")
        tokens = self.encode(x, da).tokens
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return self.cls_head(pooled)

    def segment(self, x: torch.Tensor, da: int) -> torch.Tensor:
        """``(B, out_channels, *S)`` logits on the input's exact spatial shape ``S`` (2D in, 2D out)."""
        if self.decoder is None or self.seg_head is None:
            raise ValueError("segment needs a model built with out_channels")
        volume = self._as_volume(x, da)
        tokens, grid = self.encode(x, da)
        feat = tokens[:, 1:].transpose(1, 2).unflatten(2, grid)  # (B, W, *G)
        state = SACState(da, self.patch_size.bit_length() - 1)  # the state after the patch embedding
        *stages, last = self.decoder
        for stage in stages:
            feat, state = stage(feat, state)
        feat, state = last(torch.cat((feat, volume), dim=1), state)
        out = self.seg_head(feat)  # (B, out_channels, *padded shape)
        if x.ndim == 4:
            return out[:, :, : x.shape[2], : x.shape[3], 0]
        return out[:, :, : x.shape[2], : x.shape[3], : x.shape[4]]


def pumit_vit_tiny(**kwargs: object) -> PUMITViT:
    """A tiny variant for tests and CPU runs: width 32, 2 blocks, 2 heads, patch 8 (overridable)."""
    defaults: dict[str, object] = {"width": 32, "num_layers": 2, "num_heads": 2, "patch_size": 8}
    return PUMITViT(**{**defaults, **kwargs})  # type: ignore[arg-type]


def pumit_vit_base(**kwargs: object) -> PUMITViT:
    """ViT-B of the spec: width 768, 12 blocks, 12 heads, patch 16."""
    return PUMITViT(**{"width": 768, "num_layers": 12, "num_heads": 12, **kwargs})  # type: ignore[arg-type]


def pumit_vit_large(**kwargs: object) -> PUMITViT:
    """ViT-L of the spec: width 1024, 24 blocks, 16 heads, patch 16."""
    return PUMITViT(**{"width": 1024, "num_layers": 24, "num_heads": 16, **kwargs})  # type: ignore[arg-type]


class _FineTuned(nn.Module):
    """What the fine-tuning wrappers share: the data's channels as the ViT's input, missing ones zero-filled with
    ``torch.where`` before anything reads them, and one DA per network (the preprocessing's target spacing fixes it
    for a whole data set): ``da`` for 3D inputs (default 0, isotropic), always ``max_da`` for 2D inputs."""

    def __init__(self, *, spatial_dims: int, modalities: Sequence[str], da: int | None, vit: dict[str, object],
                 set_here: Sequence[str], **heads: object) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        for key in set_here:
            if key in vit:
                raise TypeError(f"unexpected keyword argument {key!r} (set by the fine-tuning wrapper)")
        self.spatial_dims, self.modalities = spatial_dims, tuple(modalities)
        self.vit = PUMITViT(in_channels=len(self.modalities), **heads, **vit)  # type: ignore[arg-type]
        self.da = self.vit.max_da if spatial_dims == 2 else (0 if da is None else da)
        if not 0 <= self.da <= self.vit.max_da:
            raise ValueError(f"da must lie in [0, {self.vit.max_da}], got {da}")

    def _input(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != len(self.modalities):
            raise ValueError(
                f"expected image (B, {len(self.modalities)}, *S) with {self.spatial_dims} spatial axes, "
                f"got {tuple(image.shape)}"
            )
        return mask_missing(image, available)


@register_network("pumit_vit_seg")
class PUMITViTSegmenter(_FineTuned):
    """:meth:`PUMITViT.segment` under the registry's contract (``forward(image, available)``).

    The modalities are the ViT's input channels (missing ones zero-filled); the DA is fixed per network (see
    :class:`_FineTuned`).

    Args:
        spatial_dims: 2 or 3.
        modalities: modality names, in the batch's channel order.
        out_channels: segmentation output channels.
        da: the degree of anisotropy of every 3D input (``None``: 0).
        **vit: :class:`PUMITViT` keyword arguments (``patch_size``, ``width``, ``num_layers``, ...; not
            ``in_channels`` or ``out_channels``).

    Shapes: ``image (B, M, *S)``, ``available (B, M) bool`` -> logits ``(B, out_channels, *S)``; the wrapped
    ViT is ``self.vit`` (load pretrained backbone weights into it).
    """

    def __init__(self, *, spatial_dims: int, modalities: Sequence[str], out_channels: int, da: int | None = None,
                 **vit: object) -> None:
        super().__init__(spatial_dims=spatial_dims, modalities=modalities, da=da, vit=vit,
                         set_here=("in_channels", "out_channels", "codebook_size", "num_classes"),
                         out_channels=out_channels)

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        return self.vit.segment(self._input(image, available), self.da)


@register_network("pumit_vit_seg_tiny")
def pumit_vit_seg_tiny(**kwargs: object) -> PUMITViTSegmenter:
    """The tiny segmenter for tests: width 32, 2 blocks, 2 heads, patch 8 (overridable)."""
    defaults: dict[str, object] = {"width": 32, "num_layers": 2, "num_heads": 2, "patch_size": 8}
    return PUMITViTSegmenter(**{**defaults, **kwargs})  # type: ignore[arg-type]


@register_network("pumit_vit_cls")
class PUMITViTClassifier(_FineTuned):
    """:meth:`PUMITViT.classify` under the registry's contract (``forward(image, available)``): fine-tuning a
    pretrained ViT for whole-image classification.

    The spec's fine-tuning head (and MedCoSS's, ``shared/methods/medcoss.md`` §2.8): the grid tokens are
    mean-pooled (``pool="mean"``; ``"cls"`` takes the cls token) into a Linear layer. Missing modalities and the DA
    as in :class:`PUMITViTSegmenter`.

    Args:
        spatial_dims: 2 or 3.
        modalities: modality names, in the batch's channel order.
        num_classes: classes (>= 2).
        out_channels: ignored (the data sets it for segmenters; a classifier has ``num_classes`` outputs).
        da: the degree of anisotropy of every 3D input (``None``: 0).
        pool: ``"mean"`` (default) or ``"cls"``.
        **vit: :class:`PUMITViT` keyword arguments (not ``in_channels``, ``codebook_size`` or ``out_channels``).

    Shapes: ``image (B, M, *S)``, ``available (B, M) bool`` -> logits ``(B, num_classes)``; the wrapped ViT is
    ``self.vit`` (pretrained backbone weights load into it).
    """

    #: the registry contract: whole-image class logits, not a dense map
    predicts = "classes"

    def __init__(self, *, spatial_dims: int, modalities: Sequence[str], num_classes: int, out_channels: int = 0,
                 da: int | None = None, pool: Literal["cls", "mean"] = "mean", **vit: object) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(spatial_dims=spatial_dims, modalities=modalities, da=da, vit=vit,
                         set_here=("in_channels", "codebook_size", "decoder_channels"), num_classes=num_classes,
                         pool=pool)
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        return self.vit.classify(self._input(image, available), self.da)


@register_network("pumit_vit_cls_tiny")
def pumit_vit_cls_tiny(**kwargs: object) -> PUMITViTClassifier:
    """The tiny classifier for tests: width 32, 2 blocks, 2 heads, patch 8, 2 classes (overridable)."""
    defaults: dict[str, object] = {"width": 32, "num_layers": 2, "num_heads": 2, "patch_size": 8, "num_classes": 2}
    return PUMITViTClassifier(**{**defaults, **kwargs})  # type: ignore[arg-type]
