"""ShaSpec: shared-specific feature modelling for missing modalities (Wang et al., *Multi-modal Learning with
Missing Modality via Shared-Specific Feature Modelling*, CVPR 2023, arXiv 2307.14126).

Every available modality ``m`` is encoded twice: by a **shared** encoder E_sha (one set of weights for all
modalities, giving ``r_m``) and by its own **specific** encoder E_spec[m] (giving ``s_m``). A fusion conv P,
shared by all modalities, adds a residual: ``f_m = r_m + P([r_m, s_m])`` (paper Eq. 3). A missing slot is
filled from the shared features of the available ones (Eq. 4). The M slots are concatenated, so every task
head sees a fixed width ``M·C`` whatever is missing. This module is the generic, dimension-agnostic
("unet") backbone of ``shared/methods/shaspec.md`` §2.2; the losses live in :mod:`medmodal.losses.shaspec`.

Paper-versus-released-code switches (spec §2.5; the default is the paper's intent):

* ``missing_fill``: ``"mean"`` of the available ``r_j`` (Eq. 4); ``"first"``, the released code's rule: the
  ``r_j`` of the first modality of its drawn subset list, which it *shuffles* in random mode, so a **random
  available** modality. The network is pure, so the draw is the caller's: ``fill_source (B,)`` names the
  modality per sample (the ShaSpec training system draws it from its seeded generator); without it, as in
  evaluation, the first available modality in modality order is used (a deterministic choice [ours]).
  ``"first_in_order"`` always uses the first available modality in modality order, in training too.
* ``skip_fill``: skips of a missing slot are the ``"mean"`` of the available slots' shared skips [ours], or
  the shared skips of an encoded zero image (``"zero_input"``, the code; needs ``missing_input="zero"``).
* ``missing_input``: missing modalities are not encoded at all (``"skip"``), or zero images are encoded
  (``"zero"``, the code: then the specific/shared features of missing slots exist for auxiliary losses).

With every modality present, the three switches have no effect (tested exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetUpBlock
from torch import nn

from medmodal.networks.registry import register_network
from medmodal.networks.unet import (
    InstanceNorm,
    UNetEncoder,
    crop_to,
    grouped_encoders,
    mask_missing,
    pad_to_multiple,
    use_fast_layers,
)

MissingFill = Literal["mean", "first", "first_in_order"]
SkipFill = Literal["mean", "zero_input"]
MissingInput = Literal["skip", "zero"]
ClsPool = Literal["avg", "avgmax"]
ClsHead = Literal["paper", "relu"]


@dataclass
class ShaSpecFeatures:
    """What :meth:`ShaSpecNet.encode` computes once and :meth:`ShaSpecNet.decode` may decode many times.

    Attributes:
        shared: per encoder level ``(B, M, C_l, *S_l)`` shared-encoder features at the padded size; the last
            is the bottleneck ``r``. Zeros for slots that were not encoded.
        specific: ``(B, M, C, *s)`` specific bottleneck features ``s``; zeros where not encoded.
        encoded: ``(B, M) bool``, the slots that went through the encoders.
        size: the unpadded spatial size ``S`` of the input.
        zero_shared: with ``skip_fill="zero_input"`` only: per level ``(C_l, *S_l)`` shared features of an
            all-zero image (the released code's skips for a missing slot), else ``None``.
    """

    shared: list[torch.Tensor]
    specific: torch.Tensor
    encoded: torch.Tensor
    size: tuple[int, ...]
    zero_shared: list[torch.Tensor] | None = None


@dataclass
class ShaSpecOutput:
    """Outputs of :meth:`ShaSpecNet.decode` (``s`` is the bottleneck size of the padded input).

    Attributes:
        logits: ``(B, out_channels, *S)`` segmentation logits, or ``None`` without a decoder.
        class_logits: ``(B, num_classes)``, or ``None`` without a classification head.
        shared: ``(B, M, C, *s)`` raw shared bottleneck features ``r`` (for the DAO loss).
        specific: ``(B, M, C, *s)`` specific bottleneck features ``s``.
        fused: ``(B, M, C, *s)`` fused slots ``f`` (missing slots filled).
        domain_logits: ``(B, M, M)``; row ``m`` = the DCO head's modality logits for slot ``m`` (meaningless
            for slots that were not encoded).
        available: ``(B, M) bool`` the availability this output was decoded under.
    """

    logits: torch.Tensor | None
    class_logits: torch.Tensor | None
    shared: torch.Tensor
    specific: torch.Tensor
    fused: torch.Tensor
    domain_logits: torch.Tensor
    available: torch.Tensor


def _conv_cls(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _bcast(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B, M)`` → ``(B, M, 1, ..., 1)`` with ``ndim`` dimensions in all."""
    return mask.reshape(*mask.shape, *([1] * (ndim - mask.ndim)))


def _rows(mask: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(mask).flatten()]


class ShaSpecDecoder(nn.Module):
    """U-Net decoder over the M concatenated slots.

    The bottleneck input is the M fused slots concatenated, ``(B, M·C, *s)``; the first up block takes that
    width directly (its transposed conv maps ``M·C → C_{L-2}``, as the released code's first transposed conv
    takes the 4×256 concatenation), so no extra reduction layer is needed. At every skip level the M slots'
    shared skips ``(B, M·C_l, *S_l)`` are reduced by a bias-free 1×1 conv to ``C_l`` (a bias would be
    redundant before the up block's conv + norm) and enter a MONAI ``UnetUpBlock``.

    Shapes: ``bottleneck (B, M·C, *s)``, ``skips`` list of ``(B, M·C_l, *S_l)`` (highest resolution first)
    → ``(B, out_channels, *S_padded)``.
    """

    def __init__(
        self, *, spatial_dims: int, channels: Sequence[int], num_slots: int, out_channels: int, norm: str
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        conv = _conv_cls(spatial_dims)
        act = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
        self.skip_reduce = nn.ModuleList(conv(num_slots * c, c, kernel_size=1, bias=False) for c in channels[:-1])
        levels = list(reversed(range(len(channels) - 1)))  # the up block of level i outputs channels[i]
        self.ups = nn.ModuleList(
            UnetUpBlock(
                spatial_dims,
                num_slots * channels[i + 1] if i == levels[0] else channels[i + 1],
                channels[i],
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm,
                act_name=act,
            )
            for i in levels
        )
        self.head = UnetOutBlock(spatial_dims, channels[0], out_channels)

    def forward(
        self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor], *, reduced: bool = False
    ) -> torch.Tensor:
        """``reduced``: ``skips`` are already reduced to ``(B, C_l, *S_l)`` (see :meth:`reduce_skips_subsets`)."""
        x = bottleneck
        levels = reversed(range(len(skips)))
        for up, i in zip(self.ups, levels, strict=True):
            x = up(x, skips[i] if reduced else self.skip_reduce[i](skips[i]))
        return self.head(x)

    def reduce_skips_subsets(self, level: int, feat: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The level's reduced skip of every sample under each of K masks, with missing slots mean-filled,
        without building the K filled copies.

        The reduction is linear and bias-free, ``y = Σ_m W_m x_m`` over the M slots, and a missing slot holds the
        mean of the mask's available slots, so ``y_k = Σ_j G_kj f_j`` with per-mask effective weights
        ``G_kj = [j ∈ k] (W_j + Σ_{m ∉ k} W_m / |k|)``: one matrix product of ``(B, M·C, *S)`` with K·C' output
        channels gives the same values as filling K copies and reducing each.

        Args:
            level: the skip level (index into ``skip_reduce``).
            feat: ``(B, M, C, *S)`` shared features of that level (every slot of a mask must be encoded).
            masks: ``(K, M) bool``, each with at least one True.

        Returns:
            ``(B·K, C', *S)``, sample-major (index ``b·K + k``).
        """
        conv = self.skip_reduce[level]
        batch, num_mod, width = feat.shape[:3]
        k = masks.shape[0]
        weight = conv.weight.reshape(conv.out_channels, num_mod, width)  # W_m = weight[:, m]
        avail = masks.to(weight.dtype)  # (K, M)
        missing_sum = torch.einsum("km,omc->koc", 1.0 - avail, weight)  # Σ_{m∉k} W_m
        eff = avail[:, None, :, None] * (weight[None] + (missing_sum / avail.sum(1)[:, None, None])[:, :, None, :])
        eff = eff.reshape(k * conv.out_channels, num_mod * width)  # (K·C', M·C)
        x = feat.reshape(batch, num_mod * width, *feat.shape[3:]).movedim(1, -1)  # (B, *S, M·C)
        y = torch.nn.functional.linear(x, eff)  # (B, *S, K·C')
        y = y.unflatten(-1, (k, conv.out_channels)).movedim(-2, 1).movedim(-1, 2)  # (B, K, C', *S)
        return y.reshape(batch * k, conv.out_channels, *feat.shape[3:])


@register_network("shaspec")
class ShaSpecNet(nn.Module):
    """ShaSpec (Wang et al., CVPR 2023) with a U-Net backbone, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        modalities: modality names in the batch's channel order (keys of the specific encoders).
        out_channels: segmentation output channels; 0 = no decoder (classification only).
        channels: encoder widths per stage; the bottleneck width is ``C = channels[-1]``.
        num_classes: classes of the classification head (GAP of every slot, concatenated, then ``cls_head``);
            0 = none.
        cls_hidden: hidden width of the classification head.
        cls_dropout: dropout of the classification head.
        cls_head: ``"paper"``: FC → dropout → FC (the paper's head, spec §2.2; no activation, so at evaluation it
            is one affine map); ``"relu"``: FC → ReLU → dropout → FC (a nonlinear head [ours], what medmodal
            shipped before; its checkpoints load only with ``cls_head="relu"``).
        cls_pool: how each fused slot is pooled for the classification head: ``"avg"`` (paper: GAP) or
            ``"avgmax"`` (GAP and global max pooling, concatenated).
        norm: MONAI norm name of the encoder/decoder blocks. With ``"instance"`` every bottleneck channel has
            zero mean and unit variance per sample before its activation, so a GAP head only sees the *shape* of
            each channel's distribution: on the 2D phantom it learns nothing (constant class). Classification
            wants ``"batch"`` (the paper's small classification model) or ``cls_pool="avgmax"``.
        missing_fill, skip_fill, missing_input: paper-vs-code switches, see the module docstring.

    Inputs are zero-padded at the end to a multiple of ``2**(len(channels) - 1)``; an input whose bottleneck
    would then be a single voxel (e.g. 8³ with four stages) is padded to twice that per axis, because instance
    norm cannot normalise one value and batch norm cannot at batch 1 in training (spec invariant 12,
    billhhh/ShaSpec#1). Outputs are cropped back to the input size.

    Shapes: ``image (B, M, *S)``, ``available (B, M) bool`` → :meth:`forward` gives ``(B, out_channels, *S)``
    logits (or ``(B, num_classes)`` without a decoder); :meth:`forward_features` gives a :class:`ShaSpecOutput`.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        modalities: Sequence[str],
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        num_classes: int = 0,
        cls_hidden: int = 64,
        cls_dropout: float = 0.5,
        cls_pool: ClsPool = "avg",
        cls_head: ClsHead = "paper",
        norm: str = "instance",
        missing_fill: MissingFill = "mean",
        skip_fill: SkipFill = "mean",
        missing_input: MissingInput = "skip",
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        _validate(
            spatial_dims,
            self.modalities,
            out_channels,
            num_classes,
            cls_hidden,
            cls_dropout,
            cls_pool,
            cls_head,
            missing_fill,
            skip_fill,
            missing_input,
        )
        self.cls_pool = cls_pool
        self.cls_head_kind = cls_head
        self.spatial_dims = spatial_dims
        self.missing_fill = missing_fill
        self.skip_fill = skip_fill
        self.missing_input = missing_input
        self.shared_encoder = UNetEncoder(spatial_dims=spatial_dims, in_channels=1, channels=channels, norm=norm)
        self.channels = self.shared_encoder.channels
        self.specific_encoders = nn.ModuleDict(
            {m: UNetEncoder(spatial_dims=spatial_dims, in_channels=1, channels=channels, norm=norm) for m in modalities}
        )
        num_mod, width = len(self.modalities), self.channels[-1]
        # P: one conv shared by all modalities, 2C → C, no bias, no norm, no activation (spec §2.2).
        self.fusion = _conv_cls(spatial_dims)(2 * width, width, kernel_size=3, padding=1, bias=False)
        self.decoder = (
            ShaSpecDecoder(
                spatial_dims=spatial_dims,
                channels=self.channels,
                num_slots=num_mod,
                out_channels=out_channels,
                norm=norm,
            )
            if out_channels > 0
            else None
        )
        self.cls_head = (
            nn.Sequential(
                nn.Linear(num_mod * width * (2 if cls_pool == "avgmax" else 1), cls_hidden),
                *([nn.ReLU(inplace=True)] if cls_head == "relu" else []),
                nn.Dropout(cls_dropout),
                nn.Linear(cls_hidden, num_classes),
            )
            if num_classes > 0
            else None
        )
        self.domain_head = nn.Linear(width, num_mod)  # DCO classifier g
        # Parameters that `forward`'s output alone does not reach (used by the training system's losses).
        aux = ["domain_head."]
        if self.decoder is not None and self.cls_head is not None:
            aux.append("cls_head.")
        self.auxiliary_parameter_prefixes: tuple[str, ...] = tuple(aux)
        # The decoder's norms and 1x1 convolutions in their channels-last-friendly form (same parameters), and
        # the specific encoders as one grouped computation when their norm allows it (instance norm).
        use_fast_layers(self)
        self._grouped_specific = isinstance(self.shared_encoder.stages[0].norm1, InstanceNorm)

    # ------------------------------------------------------------------ checks
    def _check_input(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        num_mod = len(self.modalities)
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != num_mod:
            raise ValueError(f"expected image (B, {num_mod}, *{self.spatial_dims}D), got {tuple(image.shape)}")
        return self._check_available(available, image.shape[0])

    def _check_available(self, available: torch.Tensor, batch: int) -> torch.Tensor:
        if tuple(available.shape) != (batch, len(self.modalities)):
            raise ValueError(
                f"available must be (B, M) = {(batch, len(self.modalities))}, got {tuple(available.shape)}"
            )
        available = available.to(torch.bool)
        empty = _rows(~available.any(1))
        if empty:
            raise ValueError(f"every sample needs at least one available modality; sample(s) {empty} have none")
        return available

    # ------------------------------------------------------------------ encode
    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Zero-pad ``(N, 1, *S)`` at the end to a multiple of the encoder's divisor ``d``, and to ``2d`` per axis
        if the bottleneck would otherwise be one voxel (no norm can normalise it); returns the original ``S``."""
        divisor = self.shared_encoder.divisor
        x, size = pad_to_multiple(x, divisor)
        if all(s == divisor for s in x.shape[2:]):
            x, _ = pad_to_multiple(x, 2 * divisor)
        return x, size

    def encode(self, image: torch.Tensor, available: torch.Tensor) -> ShaSpecFeatures:
        """Run the shared and specific encoders on the slots to encode.

        With ``missing_input="skip"`` only the available ``(sample, modality)`` pairs are gathered (missing
        channels are never read); with ``"zero"`` every pair is, missing ones as zero images. The shared
        encoder runs **once** on all gathered pairs ``(N, 1, *S)``; each specific encoder runs once on the
        samples where its modality is encoded, or, when every slot is encoded, all M run as one grouped
        computation on ``(B, M, *S)`` (:func:`~medmodal.networks.unet.grouped_encoders`, the same result).
        Inputs are zero-padded to a multiple of ``2**(L-1)``.

        Args:
            image: ``(B, M, *S)``.
            available: ``(B, M) bool``, at least one True per row.
        """
        available = self._check_input(image, available)
        if self.missing_input == "zero":
            image = mask_missing(image, available)
            encoded = torch.ones_like(available)
        else:
            encoded = available
        batch, num_mod = encoded.shape
        b_idx, m_idx = torch.nonzero(encoded, as_tuple=True)
        x, size = self._pad(image[b_idx, m_idx].unsqueeze(1))
        with_zero = self.skip_fill == "zero_input"
        if with_zero:  # one extra all-zero image in the same batched call (instance norm is per sample)
            x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
        feats = self.shared_encoder(x)
        zero_shared = [f[-1] for f in feats] if with_zero else None
        if with_zero:
            feats = [f[:-1] for f in feats]
        shared = [f.new_zeros((batch, num_mod, *f.shape[1:])).index_put((b_idx, m_idx), f) for f in feats]
        if self._grouped_specific and bool(encoded.all()):
            # One grouped call instead of M calls at batch B (image holds no missing channel here: every slot is
            # available, or missing ones were zeroed for missing_input="zero").
            xs, _ = self._pad(image)
            specific = grouped_encoders(list(self.specific_encoders.values()), xs)[-1].unflatten(1, (num_mod, -1))
        else:
            pieces = []
            for m, name in enumerate(self.modalities):
                rows = torch.nonzero(encoded[:, m]).flatten()
                if rows.numel() == 0:
                    continue  # E_spec[m] is never called when no sample has modality m
                xm, _ = self._pad(image[rows, m].unsqueeze(1))
                pieces.append((rows, m, self.specific_encoders[name](xm)[-1]))
            bottleneck = shared[-1]
            specific = bottleneck.new_zeros(bottleneck.shape)
            for rows, m, s in pieces:
                specific = specific.index_put((rows, torch.full_like(rows, m)), s)
        return ShaSpecFeatures(shared=shared, specific=specific, encoded=encoded, size=size, zero_shared=zero_shared)

    # ------------------------------------------------------------------ decode
    def _fill(
        self, feat: torch.Tensor, available: torch.Tensor, fill_source: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-sample fill ``(B, C, *s)`` for missing slots from ``feat (B, M, C, *s)``'s available slots."""
        if self.missing_fill == "mean":
            return _slot_mean(feat, available)
        if fill_source is None:
            fill_source = available.to(torch.uint8).argmax(1)  # the first True in modality order
        return feat[torch.arange(feat.shape[0], device=feat.device), fill_source]

    def _check_fill_source(self, fill_source: torch.Tensor | None, available: torch.Tensor) -> torch.Tensor | None:
        if fill_source is None:
            return None
        if self.missing_fill != "first":
            raise ValueError(f"fill_source is used by missing_fill='first' only, not {self.missing_fill!r}")
        batch, num_mod = available.shape
        if tuple(fill_source.shape) != (batch,) or fill_source.is_floating_point() or fill_source.dtype == torch.bool:
            raise ValueError(f"fill_source must be a ({batch},) integer tensor, got {fill_source.dtype} "
                             f"{tuple(fill_source.shape)}")
        fill_source = fill_source.to(device=available.device, dtype=torch.long)
        inside = (fill_source >= 0) & (fill_source < num_mod)
        picked = available[torch.arange(batch, device=available.device), fill_source.clamp(0, num_mod - 1)]
        bad = _rows(~(inside & picked))
        if bad:
            raise ValueError(f"fill_source must name an available modality; not so for sample(s) {bad}")
        return fill_source

    def decode(
        self,
        features: ShaSpecFeatures,
        available: torch.Tensor,
        *,
        fill_source: torch.Tensor | None = None,
        reduced_skips: list[torch.Tensor] | None = None,
    ) -> ShaSpecOutput:
        """Fuse the slots under ``available`` and run the heads.

        Present slot ``m``: ``f_m = r_m + P([r_m, s_m])`` (paper Eq. 3); missing slot: the ``missing_fill`` of
        the available ``r_j`` (Eq. 4). Skips of missing slots follow ``skip_fill``.

        Args:
            features: from :meth:`encode`.
            available: ``(B, M) bool``, a subset of ``features.encoded`` with at least one True per row.
            fill_source: with ``missing_fill="first"`` only: ``(B,)`` integer, the available modality whose
                ``r`` fills sample ``b``'s missing slots (the training system's random draw); ``None``: the
                first available one in modality order.
            reduced_skips: the decoder's skips already reduced under ``available`` (used by
                :meth:`decode_subsets`); then ``features.shared[:-1]`` is not read.
        """
        encoded = features.encoded
        available = self._check_available(available, encoded.shape[0])
        bad = _rows((available & ~encoded).any(1))
        if bad:
            raise ValueError(f"available must be a subset of features.encoded; not so for sample(s) {bad}")
        fill_source = self._check_fill_source(fill_source, available)
        r, s = features.shared[-1], features.specific
        batch, num_mod = available.shape
        b_idx, m_idx = torch.nonzero(available, as_tuple=True)
        r_present = r[b_idx, m_idx]
        f_present = r_present + self.fusion(torch.cat([r_present, s[b_idx, m_idx]], dim=1))
        present = r.new_zeros(r.shape).index_put((b_idx, m_idx), f_present)
        fused = torch.where(_bcast(available, r.ndim), present, self._fill(r, available, fill_source).unsqueeze(1))

        logits = None
        if self.decoder is not None and reduced_skips is not None:
            bottleneck = fused.reshape(batch, num_mod * fused.shape[2], *fused.shape[3:])
            logits = crop_to(self.decoder(bottleneck, reduced_skips, reduced=True), features.size)
        elif self.decoder is not None:
            skips = []
            for level, feat in enumerate(features.shared[:-1]):
                if self.skip_fill == "zero_input":
                    if features.zero_shared is None:
                        raise ValueError("skip_fill='zero_input' needs features encoded by this network")
                    fill = features.zero_shared[level].unsqueeze(0)
                else:
                    fill = _slot_mean(feat, available)
                filled = torch.where(_bcast(available, feat.ndim), feat, fill.unsqueeze(1))
                skips.append(filled.reshape(batch, num_mod * feat.shape[2], *feat.shape[3:]))
            bottleneck = fused.reshape(batch, num_mod * fused.shape[2], *fused.shape[3:])
            logits = crop_to(self.decoder(bottleneck, skips), features.size)

        flat = fused.flatten(3)
        pooled = flat.mean(3)  # GAP of every slot: (B, M, C)
        if self.cls_pool == "avgmax":
            pooled = torch.cat([pooled, flat.amax(3)], dim=2)  # (B, M, 2C)
        class_logits = self.cls_head(pooled.reshape(batch, -1)) if self.cls_head is not None else None
        domain_logits = self.domain_head(s.flatten(3).mean(3))  # (B, M, M)
        return ShaSpecOutput(
            logits=logits,
            class_logits=class_logits,
            shared=r,
            specific=s,
            fused=fused,
            domain_logits=domain_logits,
            available=available,
        )

    def decode_subsets(self, features: ShaSpecFeatures, masks: torch.Tensor) -> ShaSpecOutput:
        """Decode every sample under each of K availability masks in one batched decode.

        Encode once, decode K times: this is what makes the all-subset evaluation cheap.

        Args:
            features: from :meth:`encode` on a batch of B samples.
            masks: ``(K, M) bool``; each must be a subset of every sample's ``encoded`` slots.

        Returns:
            A :class:`ShaSpecOutput` of batch ``B·K``, sample-major: index ``b·K + k`` is sample b under mask k.
        """
        batch, num_mod = features.encoded.shape
        if masks.ndim != 2 or masks.shape[1] != num_mod:
            raise ValueError(f"masks must be (K, {num_mod}), got {tuple(masks.shape)}")
        masks = masks.to(device=features.encoded.device, dtype=torch.bool)
        empty = _rows(~masks.any(1))
        if empty:
            raise ValueError(f"every mask needs at least one available modality; mask(s) {empty} have none")
        k = masks.shape[0]

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(k, dim=0)

        reduced = None
        if self.decoder is not None and self.skip_fill == "mean":
            bad = _rows((masks[None] & ~features.encoded[:, None]).any(2).any(1))
            if bad:
                raise ValueError(f"every mask must be a subset of features.encoded; not so for sample(s) {bad}")
            # the K filled skip copies are never built (the skips are most of the decode's memory traffic)
            reduced = [self.decoder.reduce_skips_subsets(i, f, masks) for i, f in enumerate(features.shared[:-1])]
        expanded = ShaSpecFeatures(
            shared=[f if reduced is not None else rep(f) for f in features.shared[:-1]] + [rep(features.shared[-1])],
            specific=rep(features.specific),
            encoded=rep(features.encoded),
            size=features.size,
            zero_shared=features.zero_shared,
        )
        return self.decode(expanded, masks.repeat(batch, 1), reduced_skips=reduced)

    # ------------------------------------------------------------------ forward
    def forward_features(
        self, image: torch.Tensor, available: torch.Tensor, *, fill_source: torch.Tensor | None = None
    ) -> ShaSpecOutput:
        """``decode(encode(image, available), available, fill_source=...)``: every output the training system
        needs."""
        return self.decode(self.encode(image, available), available, fill_source=fill_source)

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``image (B, M, *S)``, ``available (B, M) bool`` → segmentation logits ``(B, out_channels, *S)``, or
        class logits ``(B, num_classes)`` when there is no decoder."""
        out = self.forward_features(image, available)
        return out.logits if out.logits is not None else out.class_logits


def _slot_mean(feat: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Mean over the available slots: ``feat (B, M, C, *s)``, ``available (B, M)`` → ``(B, C, *s)``."""
    mask = _bcast(available, feat.ndim)
    total = torch.where(mask, feat, torch.zeros((), dtype=feat.dtype, device=feat.device)).sum(1)
    count = available.sum(1).to(feat.dtype)
    return total / count.reshape(-1, *([1] * (total.ndim - 1)))


def _validate(
    spatial_dims: int,
    modalities: tuple[str, ...],
    out_channels: int,
    num_classes: int,
    cls_hidden: int,
    cls_dropout: float,
    cls_pool: str,
    cls_head: str,
    missing_fill: str,
    skip_fill: str,
    missing_input: str,
) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if not modalities:
        raise ValueError("modalities must name at least one modality")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modality names must be unique, got {modalities}")
    if any(not m or "." in m for m in modalities):
        raise ValueError(f"modality names must be non-empty and contain no '.', got {modalities}")
    if out_channels < 0 or num_classes < 0:
        raise ValueError(f"out_channels and num_classes must be >= 0, got {out_channels} and {num_classes}")
    if out_channels == 0 and num_classes == 0:
        raise ValueError("out_channels=0 (no decoder) needs num_classes > 0: the network would have no output")
    if num_classes > 0 and cls_hidden < 1:
        raise ValueError(f"cls_hidden must be >= 1, got {cls_hidden}")
    if not 0.0 <= cls_dropout < 1.0:
        raise ValueError(f"cls_dropout must be in [0, 1), got {cls_dropout}")
    if cls_pool not in ("avg", "avgmax"):
        raise ValueError(f"cls_pool must be 'avg' or 'avgmax', got {cls_pool!r}")
    if cls_head not in ("paper", "relu"):
        raise ValueError(f"cls_head must be 'paper' or 'relu', got {cls_head!r}")
    if missing_fill not in ("mean", "first", "first_in_order"):
        raise ValueError(f"missing_fill must be 'mean', 'first' or 'first_in_order', got {missing_fill!r}")
    if skip_fill not in ("mean", "zero_input"):
        raise ValueError(f"skip_fill must be 'mean' or 'zero_input', got {skip_fill!r}")
    if missing_input not in ("skip", "zero"):
        raise ValueError(f"missing_input must be 'skip' or 'zero', got {missing_input!r}")
    if skip_fill == "zero_input" and missing_input != "zero":
        raise ValueError("skip_fill='zero_input' (encoded zero images) requires missing_input='zero'")


@register_network("shaspec_tiny")
def shaspec_tiny(*, spatial_dims: int, modalities: Sequence[str], out_channels: int) -> ShaSpecNet:
    """A two-stage, 4/8-channel :class:`ShaSpecNet` for tests."""
    return ShaSpecNet(spatial_dims=spatial_dims, modalities=modalities, out_channels=out_channels, channels=(4, 8))
