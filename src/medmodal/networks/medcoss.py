"""MedCoSS's shared encoder and its pretext heads (Ye et al., CVPR 2024, arXiv 2311.17597; ``shared/methods/medcoss.md``
§2.1, §2.3, §2.7).

One transformer encodes every modality. A modality is keyed by its name in the method (``"report"``, ``"xray"``,
``"ct"``, ...) and has a **kind**; the encoder holds one tokenizer per kind, so a new modality of a known kind needs
no new weights:

* ``"text"``: ``ids (B, L) long`` -> token embedding + fixed sinusoidal position (at most ``max_text_len``) + a
  learned token-type vector (one segment type) -> LayerNorm. No cls token; ``attention_mask (B, L)`` (1 = real
  token) hides padding keys.
* ``"image2d"``: ``(B, C, X, Y)`` -> ``Conv2d(k = s = patch)`` + learned position -> LayerNorm, cls token prepended.
  A grey image (``C = 1``) is replicated to ``image_channels_2d`` (3, RGB) channels (spec §2.1).
* ``"image3d"``: ``(B, C, X, Y, Z)`` -> ``Conv3d(k = s = patch)`` + learned position -> LayerNorm, cls token prepended.

Image tokens are ordered row-major over the token grid ``G = S / patch`` (last axis fastest), ``L = prod(G)``; a
spatial size that is not a multiple of the patch is an error (the data pipeline crops or resizes). Uni-Perceiver's
image "temporal position" is one learned vector for a single frame, a constant offset that the patch embedding's
bias already represents, so it is not built (add it to ``patch_embed.bias`` to load such weights).

**Image position** (spec §2.7 ``pos_embed``): ``"resampled"`` (default) stores a learned grid ``(1, W, *pos_grid)``
(the pre-training grid: 14 x 14 for 224² at patch 16; 12 x 12 x 1 for a 192 x 192 x 16 volume, slice axis last) and
resamples it to the input's grid with :func:`medmodal.networks.pumit_vit.resample_position_grid`, so a larger
fine-tuning input gets an interpolated grid and never an untrained row. ``"linear_index"`` is the official code's
table of ``prod(pos_grid)`` rows indexed by the token's row-major linear index (only to load official weights: a grid
of another shape scrambles the layout, and one with more tokens than rows is refused).

**Blocks** (spec §2.1): ``depth`` pre-norm blocks ``x + DropPath(γ1 · Attn(LN x))`` then
``x + DropPath(γ2 · MLP(LN x))``: MONAI's :class:`~monai.networks.blocks.SABlock` (qkv bias,
:func:`torch.nn.functional.scaled_dot_product_attention`), MONAI's GELU :class:`~monai.networks.blocks.MLPBlock`
(hidden ``mlp_ratio · W``), MONAI's :class:`~monai.networks.layers.DropPath` with the same rate in every block
(0.1), layer-scale vectors ``γ`` initialised to ``layer_scale_init`` (1e-3). **No final LayerNorm.**

**Text attention** (spec §2.7 ``text_attention``): ``"bidirectional"`` (default, BERT-style MLM) or ``"causal"``
(the official code's decoder-style mask, only to reproduce official weights). Images always attend bidirectionally.
A query always attends to itself, so a padded position (no real key before it under a causal mask) gives finite
garbage rather than NaN; real positions never read padding.

**MAE** (spec §2.3): :meth:`MedCoSSEncoder.encode` takes ``keep (B, n)``, the indices of the grid tokens a sample
keeps (from :func:`medmodal.losses.medcoss.random_keep`); the cls token is always kept. :class:`MAEDecoder` scatters
the encoded tokens into a sequence of mask tokens, adds its own learned positions (resampled to the grid), and
predicts the ``prod(patch) · C`` values of every patch (:func:`medmodal.losses.medcoss.patchify` order).
:class:`MLMHead` maps text tokens to vocabulary logits. Both heads are separate modules: the method re-initialises
them at every stage (spec §2.2, ``decoder_reinit_per_stage``); the teacher is a frozen copy of the encoder alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from monai.networks.blocks import MLPBlock, SABlock
from monai.networks.layers import DropPath
from torch import nn

from medmodal.networks.pumit_vit import resample_position_grid
from medmodal.networks.registry import register_network

__all__ = [
    "KINDS",
    "MAEDecoder",
    "MLMHead",
    "MedCoSSBlock",
    "MedCoSSEncoder",
    "Tokens",
    "medcoss_vit_base",
    "medcoss_vit_tiny",
    "sinusoidal_positions",
]

Kind = Literal["text", "image2d", "image3d"]
#: The tokenizer kinds, in a fixed order.
KINDS: tuple[str, ...] = ("text", "image2d", "image3d")
_IMAGE_DIMS = {"image2d": 2, "image3d": 3}


class Tokens(NamedTuple):
    """What :meth:`MedCoSSEncoder.tokenize` returns.

    Attributes:
        tokens: ``(B, N, W)``; for images ``N = 1 + L`` with the cls token at index 0, for text ``N = L``.
        key_mask: ``(B, N)`` bool, True for a real token (all True for images; the attention mask for text).
        grid: the image's token grid ``G`` (``L = prod(G)``), or ``None`` for text.
        kind: the tokenizer kind that produced them.
    """

    tokens: torch.Tensor
    key_mask: torch.Tensor
    grid: tuple[int, ...] | None
    kind: str

    @property
    def num_prefix(self) -> int:
        """Tokens before the sequence positions that ``keep`` indexes: 1 (the cls token) for images, 0 for text."""
        return 0 if self.grid is None else 1


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The fixed Transformer position table ``(length, width)``: ``sin(p / 10000^(2i/W))`` in column ``2i`` and the
    cosine in column ``2i + 1`` (Vaswani et al. 2017; spec §2.1, text tokenizer)."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.pow(10000.0, -torch.arange(0, width, 2, dtype=torch.float64) / width)
    table = torch.zeros(length, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: width // 2])
    return table.float()


class MedCoSSBlock(nn.Module):
    """A pre-norm transformer block: ``x + DropPath(γ1 · SA(LN x))``, ``x + DropPath(γ2 · MLP(LN x))``.

    Args:
        width: token features ``W``.
        heads: attention heads (``W`` divisible by it).
        mlp_ratio: MLP hidden width over ``W``.
        drop_path: stochastic-depth rate (active in training mode only).
        layer_scale_init: initial value of the layer-scale vectors ``γ``, or ``None`` for no layer scale.

    ``forward(x (B, N, W), attn_mask=None) -> (B, N, W)``; ``attn_mask`` is a bool mask broadcastable to
    ``(B, heads, N, N)``, True where a query may attend to a key.
    """

    def __init__(
        self,
        *,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SABlock(width, heads, qkv_bias=True, use_flash_attention=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLPBlock(width, int(width * mlp_ratio), act="GELU")
        self.drop_path = DropPath(drop_path)
        self.gamma1 = self.gamma2 = None
        if layer_scale_init is not None:
            self.gamma1 = nn.Parameter(torch.full((width,), float(layer_scale_init)))
            self.gamma2 = nn.Parameter(torch.full((width,), float(layer_scale_init)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.attn(self.norm1(x), attn_mask=attn_mask)
        x = x + self.drop_path(y if self.gamma1 is None else self.gamma1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma2 is None else self.gamma2 * y)


def _init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) for linear, convolution and embedding weights; zero biases; unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d | nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_grid(grid: Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    if len(grid) != dims or min(grid) < 1:
        raise ValueError(f"{name} must be {dims} positive sizes, got {grid}")
    return grid


def _resampled(pos: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """A learned grid ``(1, W, *g)`` (2D or 3D) resampled to ``grid`` and flattened to ``(1, prod(grid), W)``."""
    if len(grid) == 2:  # resample_position_grid works on 3D grids: a 2D grid is one slice thick
        pos = resample_position_grid(pos.unsqueeze(-1), (*grid, 1)).squeeze(-1)
    else:
        pos = resample_position_grid(pos, grid)
    return pos.flatten(2).transpose(1, 2)


class _ImageTokenizer(nn.Module):
    """Patch embedding ``Conv(k = s = patch)`` + learned position (resampled grid or linear-index table) + LayerNorm."""

    def __init__(
        self,
        *,
        dims: int,
        channels: int,
        width: int,
        patch: tuple[int, ...],
        pos_grid: tuple[int, ...],
        pos_embed: str,
    ) -> None:
        super().__init__()
        self.dims, self.channels, self.patch, self.pos_embed_mode = dims, channels, patch, pos_embed
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.patch_embed = conv(channels, width, kernel_size=patch, stride=patch)
        rows = math.prod(pos_grid)
        shape = (1, width, *pos_grid) if pos_embed == "resampled" else (1, rows, width)
        self.pos_embed = nn.Parameter(torch.zeros(shape))
        self.pos_grid = pos_grid
        self.norm = nn.LayerNorm(width)

    def grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        bad = [s for s, p in zip(spatial, self.patch, strict=True) if s % p]
        if bad:
            raise ValueError(
                f"image{self.dims}d spatial shape {tuple(spatial)} must be a multiple of the patch {self.patch} "
                "on every axis (crop or resize the input)"
            )
        return tuple(s // p for s, p in zip(spatial, self.patch, strict=True))

    def positions(self, grid: tuple[int, ...]) -> torch.Tensor:
        """``(1, prod(grid), W)`` positions of the grid's tokens in row-major order."""
        if self.pos_embed_mode == "resampled":
            return _resampled(self.pos_embed, grid)
        length, rows = math.prod(grid), self.pos_embed.shape[1]
        if length > rows:
            raise ValueError(
                f"pos_embed='linear_index' has {rows} position rows (pos_grid {self.pos_grid}) but the input's token "
                f"grid {grid} has {length} tokens; use pos_embed='resampled' or a smaller input"
            )
        return self.pos_embed[:, :length]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        grid = self.grid(x.shape[2:])
        z = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, L, W), row-major over the grid
        return self.norm(z + self.positions(grid)), grid


class _TextTokenizer(nn.Module):
    """Token embedding + fixed sinusoidal position + a learned token-type vector + LayerNorm."""

    positions: torch.Tensor

    def __init__(self, *, vocab_size: int, max_len: int, width: int) -> None:
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, width)
        self.type_embed = nn.Parameter(torch.zeros(width))
        self.register_buffer("positions", sinusoidal_positions(max_len, width), persistent=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(ids) + self.positions[: ids.shape[1]] + self.type_embed)


@register_network("medcoss_vit")
class MedCoSSEncoder(nn.Module):
    """MedCoSS's shared encoder with one tokenizer per kind (module doc; spec §2.1).

    Args:
        width: token features ``W`` (768, ViT-B).
        depth: transformer blocks (12).
        heads: attention heads (12).
        mlp_ratio: MLP hidden width over ``W`` (4: 3072).
        drop_path: stochastic-depth rate of every block (0.1).
        layer_scale_init: initial layer-scale value (1e-3), or ``None`` for no layer scale.
        kinds: the tokenizers to build, a subset of :data:`KINDS` (default all three).
        patch_size_2d: 2D patch (int or two sizes; 16).
        patch_size_3d: 3D patch (int or three sizes; 16³).
        image_channels_2d: channels of the 2D tokenizer (3, RGB; a grey input is replicated).
        image_channels_3d: channels of the 3D tokenizer (1).
        vocab_size: text vocabulary size (49 411 in the official table; the text helper's tokenizer sets it).
        max_text_len: the longest text, in tokens (the sinusoidal table's length; 512 as in Uni-Perceiver).
        pos_grid_2d: the learned 2D position grid (``resampled``) or the table's shape (``linear_index``: its
            product is the row count, 32 x 32 = 1024 rows for official weights). Default the 224² pre-training grid.
        pos_grid_3d: the same for 3D (default 12 x 12 x 1, a 192 x 192 x 16 pre-training volume, slice axis last;
            16 x 16 x 16 = 4096 rows for official weights).
        text_attention: ``"bidirectional"`` (default) or ``"causal"`` (spec §2.7).
        pos_embed: ``"resampled"`` (default) or ``"linear_index"`` (spec §2.7).

    Raises:
        ValueError: a width not divisible by ``heads``, an unknown kind, switch value or malformed size.
    """

    def __init__(
        self,
        *,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        layer_scale_init: float | None = 1e-3,
        kinds: Sequence[str] = KINDS,
        patch_size_2d: int | Sequence[int] = 16,
        patch_size_3d: int | Sequence[int] = 16,
        image_channels_2d: int = 3,
        image_channels_3d: int = 1,
        vocab_size: int = 49411,
        max_text_len: int = 512,
        pos_grid_2d: Sequence[int] = (14, 14),
        pos_grid_3d: Sequence[int] = (12, 12, 1),
        text_attention: Literal["bidirectional", "causal"] = "bidirectional",
        pos_embed: Literal["resampled", "linear_index"] = "resampled",
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        if text_attention not in ("bidirectional", "causal"):
            raise ValueError(f"text_attention must be 'bidirectional' or 'causal', got {text_attention!r}")
        if pos_embed not in ("resampled", "linear_index"):
            raise ValueError(f"pos_embed must be 'resampled' or 'linear_index', got {pos_embed!r}")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
        self.width, self.text_attention, self.pos_embed = width, text_attention, pos_embed
        self.tokenizers = nn.ModuleDict()
        if "text" in kinds:
            if vocab_size < 1 or max_text_len < 1:
                raise ValueError(f"vocab_size and max_text_len must be positive, got {vocab_size}, {max_text_len}")
            self.tokenizers["text"] = _TextTokenizer(vocab_size=vocab_size, max_len=max_text_len, width=width)
        image_settings = {
            "image2d": (patch_size_2d, image_channels_2d, pos_grid_2d),
            "image3d": (patch_size_3d, image_channels_3d, pos_grid_3d),
        }
        for kind, (patch, channels, grid) in image_settings.items():
            if kind not in kinds:
                continue
            dims = _IMAGE_DIMS[kind]
            patch_t = _check_grid((patch,) * dims if isinstance(patch, int) else patch, dims, f"patch_size_{dims}d")
            grid_t = _check_grid(grid, dims, f"pos_grid_{dims}d")
            self.tokenizers[kind] = _ImageTokenizer(
                dims=dims, channels=channels, width=width, patch=patch_t, pos_grid=grid_t, pos_embed=pos_embed
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if any(k in kinds for k in _IMAGE_DIMS) else None
        self.blocks = nn.ModuleList(
            MedCoSSBlock(
                width=width, heads=heads, mlp_ratio=mlp_ratio, drop_path=drop_path, layer_scale_init=layer_scale_init
            )
            for _ in range(depth)
        )
        _init_weights(self)
        for name, p in self.named_parameters():
            if name == "cls_token" or name.endswith(("pos_embed", "type_embed")):
                nn.init.trunc_normal_(p, std=0.02)

    # ------------------------------------------------------------------ kinds and geometry

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds this encoder has a tokenizer for."""
        return tuple(k for k in KINDS if k in self.tokenizers)

    def has_kind(self, kind: str) -> bool:
        """Whether the encoder has a tokenizer for ``kind``."""
        return kind in self.tokenizers

    def _tokenizer(self, kind: str) -> nn.Module:
        if kind not in self.tokenizers:
            raise ValueError(f"the encoder has no tokenizer of kind {kind!r}; it has {', '.join(self.kinds)}")
        return self.tokenizers[kind]

    def patch_size(self, kind: str) -> tuple[int, ...]:
        """The patch of an image kind."""
        tok = self._tokenizer(kind)
        if not isinstance(tok, _ImageTokenizer):
            raise ValueError(f"kind {kind!r} has no patches (an image kind is one of {tuple(_IMAGE_DIMS)})")
        return tok.patch

    def image_input(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, *S)`` as the ``kind`` tokenizer reads it: checked and, if grey, replicated to the tokenizer's
        channels (the MAE target is this image, patchified).

        Raises:
            ValueError: the wrong number of spatial axes or channels.
        """
        tok = self._tokenizer(kind)
        if not isinstance(tok, _ImageTokenizer):
            raise ValueError(f"kind {kind!r} takes token ids, not an image")
        if x.ndim != tok.dims + 2 or x.shape[1] not in (1, tok.channels) or not x.is_floating_point():
            raise ValueError(
                f"kind {kind!r} expects a float image (B, {tok.channels} or 1, {', '.join('XYZ'[: tok.dims])}), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        return x.expand(-1, tok.channels, *x.shape[2:]) if x.shape[1] != tok.channels else x

    # ------------------------------------------------------------------ tokenizers and encoder

    def tokenize(self, kind: str, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Tokens:
        """Tokenize a batch of one kind.

        Args:
            kind: ``"text"``, ``"image2d"`` or ``"image3d"``.
            x: ``ids (B, L) long`` for text; ``(B, C, X, Y)`` / ``(B, C, X, Y, Z)`` float for images.
            attention_mask: text only, ``(B, L)`` bool or 0/1 (1 = real token); ``None`` = all real.

        Returns:
            :class:`Tokens`: ``(B, L, W)`` text tokens, or ``(B, 1 + L, W)`` image tokens (cls first).
        """
        tok = self._tokenizer(kind)
        if isinstance(tok, _TextTokenizer):
            if x.ndim != 2 or x.dtype != torch.long:
                raise ValueError(f"text expects ids (B, L) long, got {x.dtype} {tuple(x.shape)}")
            if x.shape[1] > tok.max_len:
                raise ValueError(f"text of {x.shape[1]} tokens is longer than max_text_len={tok.max_len}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= tok.vocab_size):
                raise ValueError(f"token ids must lie in [0, vocab_size={tok.vocab_size})")
            if attention_mask is None:
                key_mask = torch.ones_like(x, dtype=torch.bool)
            elif attention_mask.shape != x.shape:
                raise ValueError(f"attention_mask must be (B, L) = {tuple(x.shape)}, got {tuple(attention_mask.shape)}")
            else:
                key_mask = attention_mask.bool()
            return Tokens(tok(x), key_mask, None, kind)
        if attention_mask is not None:
            raise ValueError("attention_mask is for text; images have no padding")
        z, grid = tok(self.image_input(kind, x))
        assert self.cls_token is not None
        z = torch.cat((self.cls_token.expand(z.shape[0], -1, -1), z), dim=1)
        return Tokens(z, torch.ones(z.shape[:2], dtype=torch.bool, device=z.device), grid, kind)

    def _attention_mask(self, key_mask: torch.Tensor, causal: bool) -> torch.Tensor | None:
        """The bool ``(B, 1, N, N)`` attention mask (True = may attend), or ``None`` when nothing is masked."""
        if not causal and bool(key_mask.all()):
            return None
        n = key_mask.shape[1]
        allowed = key_mask[:, None, None, :].expand(-1, 1, n, -1)
        if causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=key_mask.device).tril()
        return allowed | torch.eye(n, dtype=torch.bool, device=key_mask.device)  # a query always sees itself

    def encode(self, tokens: Tokens, *, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks on tokenized input.

        Args:
            tokens: from :meth:`tokenize`.
            keep: optional ``(B, n)`` long indices of the sequence positions to keep (grid tokens for images, the
                cls token excluded and always kept; text positions for text), e.g.
                :func:`medmodal.losses.medcoss.random_keep`'s ``keep``. Student and teacher given the same ``keep``
                see the same tokens (spec §2.3).

        Returns:
            ``(B, prefix + n, W)`` features (``prefix`` = 1 cls token for images); no final LayerNorm.
        """
        seq, key_mask = tokens.tokens, tokens.key_mask
        if keep is not None:
            prefix = tokens.num_prefix
            length = seq.shape[1] - prefix
            if keep.ndim != 2 or keep.shape[0] != seq.shape[0] or keep.dtype != torch.long:
                raise ValueError(
                    f"keep must be a LongTensor (B={seq.shape[0]}, n), got {keep.dtype} {tuple(keep.shape)}"
                )
            if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= length):
                raise ValueError(f"keep indices must lie in [0, L={length}) (cls excluded)")
            body = seq[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))
            seq = torch.cat((seq[:, :prefix], body), dim=1)
            key_mask = torch.cat((key_mask[:, :prefix], key_mask[:, prefix:].gather(1, keep)), dim=1)
        causal = tokens.kind == "text" and self.text_attention == "causal"
        attn_mask = self._attention_mask(key_mask, causal) if tokens.kind == "text" else None
        for block in self.blocks:
            seq = block(seq, attn_mask)
        return seq

    def forward(
        self,
        kind: str,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``encode(tokenize(kind, x, attention_mask), keep=keep)``."""
        return self.encode(self.tokenize(kind, x, attention_mask), keep=keep)


class MAEDecoder(nn.Module):
    """MAE decoder for one image kind (spec §2.1): Linear ``W -> Wd``, ``depth`` blocks, LayerNorm, Linear to the
    ``prod(patch) · channels`` values of a patch.

    The encoded cls + kept tokens are scattered into a sequence of a learned mask token (one row per grid position),
    the learned decoder positions (``(1, Wd, *pos_grid)``, zero-initialised as in the official code, resampled to the
    input's grid; the cls token gets none) are added to the grid positions, and the blocks run on cls + all ``L``
    positions.

    Args:
        spatial_dims: 2 or 3 (which image kind it decodes).
        patch_size: the encoder's patch of that kind.
        channels: values per pixel of the target (the tokenizer's channels: 3 in 2D, 1 in 3D).
        encoder_width: ``W``.
        width: ``Wd`` (512).
        depth: decoder blocks (8).
        heads: decoder heads (16).
        mlp_ratio: decoder MLP ratio (4).
        pos_grid: the learned decoder position grid (the encoder's ``pos_grid`` of the kind).

    ``forward(encoded (B, 1 + n, W), keep (B, n), grid) -> (B, L, prod(patch) · channels)``, ``L = prod(grid)``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        patch_size: int | Sequence[int],
        channels: int,
        encoder_width: int,
        width: int = 512,
        depth: int = 8,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        pos_grid: Sequence[int],
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if width % heads:
            raise ValueError(f"decoder width ({width}) must be divisible by heads ({heads})")
        patch = (patch_size,) * spatial_dims if isinstance(patch_size, int) else tuple(patch_size)
        self.patch = _check_grid(patch, spatial_dims, "patch_size")
        self.spatial_dims, self.channels = spatial_dims, channels
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, width, *_check_grid(pos_grid, spatial_dims, "pos_grid")))
        self.blocks = nn.ModuleList(MedCoSSBlock(width=width, heads=heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, math.prod(self.patch) * channels)
        _init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, encoded: torch.Tensor, keep: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        grid = tuple(grid)
        if len(grid) != self.spatial_dims:
            raise ValueError(f"a {self.spatial_dims}D decoder got a {len(grid)}D grid {grid}")
        batch, n = keep.shape
        if encoded.ndim != 3 or encoded.shape[:2] != (batch, 1 + n):
            raise ValueError(
                f"encoded must be (B={batch}, 1 + n={1 + n}, W) for keep {tuple(keep.shape)}, "
                f"got {tuple(encoded.shape)}"
            )
        z = self.embed(encoded)
        length, width = math.prod(grid), z.shape[-1]
        body = self.mask_token.expand(batch, length, -1).scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), z[:, 1:])
        seq = torch.cat((z[:, :1], body + _resampled(self.pos_embed, grid)), dim=1)
        for block in self.blocks:
            seq = block(seq)
        return self.head(self.norm(seq[:, 1:]))


class MLMHead(nn.Module):
    """Masked-language-model head (spec §2.1): Linear-GELU-LayerNorm (``W``), then Linear ``W -> vocab_size`` with
    a bias, not tied to the token embedding.

    ``forward(tokens (B, L, W)) -> (B, L, vocab_size)`` logits.
    """

    def __init__(self, *, width: int, vocab_size: int) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.decoder = nn.Linear(width, vocab_size)
        _init_weights(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(tokens))


def medcoss_vit_tiny(**kwargs: object) -> MedCoSSEncoder:
    """The CPU recipe's encoder (spec §7): width 64, 2 blocks, 4 heads, patch 8 / 8³, position grids of a 32² image
    and a 32 x 32 x 8 volume, a 64-word vocabulary of texts up to 32 tokens (all overridable)."""
    defaults: dict[str, object] = {
        "width": 64,
        "depth": 2,
        "heads": 4,
        "patch_size_2d": 8,
        "patch_size_3d": 8,
        "pos_grid_2d": (4, 4),
        "pos_grid_3d": (4, 4, 1),
        "vocab_size": 64,
        "max_text_len": 32,
    }
    return MedCoSSEncoder(**{**defaults, **kwargs})  # type: ignore[arg-type]


def medcoss_vit_base(**kwargs: object) -> MedCoSSEncoder:
    """The spec's ViT-B encoder (the constructor's defaults; overridable)."""
    return MedCoSSEncoder(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- fine-tuning


def _finetune_encoder(spatial_dims: int, modalities: Sequence[str], encoder: dict[str, object]) -> MedCoSSEncoder:
    """The image encoder of a fine-tuning network: one tokenizer of the data's kind; its channels are the
    pretrained ones (3 in 2D: 1 or 3 modalities are read as grey / RGB) unless the data has another count (then
    the patch embedding is new and not loaded from the pretrained run)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    for key in ("kinds", "image_channels_2d", "image_channels_3d", "vocab_size", "max_text_len"):
        if key in encoder:
            raise TypeError(f"unexpected keyword argument {key!r} (set by the fine-tuning network)")
    m = len(modalities)
    kind = "image2d" if spatial_dims == 2 else "image3d"
    channels = {"image_channels_2d": 3 if m in (1, 3) else m} if spatial_dims == 2 else {"image_channels_3d": m}
    return MedCoSSEncoder(kinds=(kind,), **channels, **encoder)  # type: ignore[arg-type]


def _pad_to_patches(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    pad: list[int] = []
    for size, p in zip(reversed(x.shape[2:]), reversed(tuple(patch)), strict=True):
        pad += [0, (-size) % p]
    return nn.functional.pad(x, pad) if any(pad) else x


@register_network("medcoss_vit_cls")
class MedCoSSClassifier(nn.Module):
    """Fine-tuning head for classification (spec §2.8): the mean of the encoder's patch tokens (the cls token
    dropped), LayerNorm, Linear. ``self.encoder`` takes the pretrained encoder's weights (``medmodal train --from``).

    Args:
        spatial_dims: 2 or 3; modalities: the input channels' names (missing ones are zero-filled);
        num_classes: classes; out_channels: ignored (set for segmenters by the data);
        **encoder: :class:`MedCoSSEncoder` arguments of the pretrained encoder (width, depth, heads, patch sizes,
            position grids).

    ``forward(image (B, M, *S), available (B, M)) -> (B, num_classes)``; sizes that are not whole patches are
    zero-padded at the high end.
    """

    predicts = "classes"

    def __init__(self, *, spatial_dims: int, modalities: Sequence[str], num_classes: int, out_channels: int = 0,
                 **encoder: object) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.spatial_dims, self.modalities, self.num_classes = spatial_dims, tuple(modalities), num_classes
        self.encoder = _finetune_encoder(spatial_dims, modalities, encoder)
        self.kind = "image2d" if spatial_dims == 2 else "image3d"
        self.norm = nn.LayerNorm(self.encoder.width)
        self.head = nn.Linear(self.encoder.width, num_classes)

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        from medmodal.networks.unet import mask_missing

        x = _pad_to_patches(mask_missing(image, available), self.encoder.patch_size(self.kind))
        tokens = self.encoder(self.kind, x)
        return self.head(self.norm(tokens[:, 1:].mean(dim=1)))


@register_network("medcoss_vit_seg")
class MedCoSSSegmenter(nn.Module):
    """Fine-tuning head for segmentation (spec §2.8): a UNETR-style decoder (Hatamizadeh et al., WACV 2022) over
    the encoder's hidden states, built from MONAI's UNETR blocks, in 2D or 3D.

    With a patch of ``2^n``, the skips are the hidden states after ``n - 1`` evenly spaced blocks (ViT-B with patch
    16: after blocks 3, 6 and 9 of 12, 0-based 2, 5, 8, as UNETR and the released code) upsampled by ``2^(n-1)``,
    ..., ``2``; the final tokens go up through ``n`` :class:`~monai.networks.blocks.UnetrUpBlock` stages, each
    joined with the next skip, the last with a convolution of the input image.

    Args:
        spatial_dims, modalities, out_channels: the data's; feature_size: channels of the full-resolution stage
            (doubling per stage down); **encoder: the pretrained encoder's arguments.

    ``forward(image (B, M, *S), available (B, M)) -> (B, out_channels, *S)``.
    """

    def __init__(self, *, spatial_dims: int, modalities: Sequence[str], out_channels: int, feature_size: int = 16,
                 **encoder: object) -> None:
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        self.spatial_dims, self.modalities = spatial_dims, tuple(modalities)
        self.encoder = _finetune_encoder(spatial_dims, modalities, encoder)
        self.kind = "image2d" if spatial_dims == 2 else "image3d"
        patch = self.encoder.patch_size(self.kind)
        if len(set(patch)) != 1 or patch[0] < 2 or patch[0] & (patch[0] - 1):
            raise ValueError(f"the segmenter needs one power-of-2 patch size per axis, got {patch}")
        n = patch[0].bit_length() - 1
        depth, width = len(self.encoder.blocks), self.encoder.width
        self.skip_layers = [min(depth - 1, max(0, round(depth * k / n) - 1)) for k in range(1, n)]
        norm, dims = "instance", spatial_dims
        self.stem = UnetrBasicBlock(dims, len(self.modalities), feature_size, kernel_size=3, stride=1,
                                    norm_name=norm, res_block=True)
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(dims, width, feature_size * 2 ** k, num_layer=n - k - 1, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=norm, conv_block=True, res_block=True)
            for k in range(1, n))
        # decoder stage j (0 = full resolution) outputs feature_size * 2^j channels
        self.ups = nn.ModuleList(
            UnetrUpBlock(dims, width if j == n - 1 else feature_size * 2 ** (j + 1), feature_size * 2 ** j,
                         kernel_size=3, upsample_kernel_size=2, norm_name=norm, res_block=True)
            for j in range(n))
        self.out = UnetOutBlock(dims, feature_size, out_channels)

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        from medmodal.networks.unet import mask_missing

        size = image.shape[2:]
        x = _pad_to_patches(mask_missing(image, available), self.encoder.patch_size(self.kind))
        tokens = self.encoder.tokenize(self.kind, x)
        grid = tokens.grid
        seq, hidden = tokens.tokens, []
        for block in self.encoder.blocks:
            seq = block(seq)
            hidden.append(seq)

        def as_grid(t: torch.Tensor) -> torch.Tensor:
            return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)

        feat = as_grid(seq)
        skips = [self.stem(x)] + [up(as_grid(hidden[i])) for up, i in zip(self.skips, self.skip_layers,
                                                                            strict=True)]
        for j in reversed(range(len(self.ups))):
            feat = self.ups[j](feat, skips[j])
        out = self.out(feat)
        return out[(slice(None), slice(None), *(slice(0, s) for s in size))]


def _tiny_encoder(kwargs: dict[str, object]) -> dict[str, object]:
    defaults: dict[str, object] = {"width": 32, "depth": 2, "heads": 2, "patch_size_2d": 8, "patch_size_3d": 8,
                                   "pos_grid_2d": (4, 4), "pos_grid_3d": (4, 4, 2)}
    return {**defaults, **kwargs}


@register_network("medcoss_vit_cls_tiny")
def medcoss_vit_cls_tiny(**kwargs: object) -> MedCoSSClassifier:
    """The tiny classifier for tests: width 32, 2 blocks, 2 heads, patch 8, 2 classes (overridable)."""
    return MedCoSSClassifier(**_tiny_encoder({"num_classes": 2, **kwargs}))  # type: ignore[arg-type]


@register_network("medcoss_vit_seg_tiny")
def medcoss_vit_seg_tiny(**kwargs: object) -> MedCoSSSegmenter:
    """The tiny segmenter for tests: width 32, 2 blocks, 2 heads, patch 8, feature size 8 (overridable)."""
    return MedCoSSSegmenter(**_tiny_encoder({"feature_size": 8, **kwargs}))  # type: ignore[arg-type]
