"""The MultiMix network: a U-Net whose bottleneck also feeds a classifier, joined by a saliency bridge.

MultiMix (A. Haque, A.-A.-Z. Imran, A. Wang, D. Terzopoulos, *MultiMix: Sparingly-Supervised, Extreme Multitask
Learning From Medical Images*, ISBI 2021; journal extension *Generalized Multi-Task Learning from Substantially
Unlabeled Multi-Source Medical Image Data*, MELBA 2021) trains one encoder–decoder for classification and
segmentation at once. This module is the pure network of ``shared/methods/multimix.md`` §2.1, generalised to
2D and 3D, any encoder depth and M input channels; the losses and the five-stream training live in the method.

Architecture (``L = len(channels)`` encoder levels, ``S`` the input size, ``S_l = ⌊S / 2^l⌋``):

=========================================================  =================================================
block                                                      output
=========================================================  =================================================
``encoder[l]`` = ``double_conv``, max-pool 2 before        ``(B, channels[l], *S_l)``, ``l = 0 … L-1``
levels ``1 … L-1``
classification branch: max-pool 2 of the last level,      ``(B, num_classes)`` logits
global average pool, ``cls_head`` = Linear
saliency ``s = |∂ Σ_i max_c logit_ic / ∂x|``               ``(B, M, *S)``, ≥ 0, detached
bridge ``b``: concat[x, s] resized to ``S_{L-2}``          ``(B, 2M, *S_{L-2})``
``decoder[0]``: concat[up(enc_{L-1}), enc_{L-2}, b]        ``(B, channels[L-2], *S_{L-2})``
``decoder[k]``: concat[up(previous), enc_{L-2-k}]          ``(B, channels[L-2-k], *S_{L-2-k})``
``seg_head``: 1×1 convolution                              ``(B, out_channels, *S)`` logits
=========================================================  =================================================

``double_conv(c_in, c_out)`` = conv 3 → instance norm → LeakyReLU(``negative_slope``) → conv 3 → instance norm
→ LeakyReLU → ``nn.Dropout(dropout)`` (element-wise, as the released code). With the defaults and a 256² grey
image this is the spec's table: 16@256² … 256@16², and the first decoder stage receives 256 + 128 + 2 = **386**
channels at 32² (spec §3 invariant 4).

Choices [ours] where the spec generalises or the released code (ayaanzhaque/MultiMix, ``MultiMix.py``) is
specific:

* Up-sampling is bilinear/trilinear with ``align_corners=True`` to the **exact size of the skip**; for even sizes
  this is the released ×2, for odd sizes (e.g. 17×18×19, where max-pooling floors) it lands on the skip. The
  bridge is resized the same way to the first decoder stage's size (the released ``scale_factor=0.125`` for
  five levels at 256²).
* The 3×3 convolutions have no bias: an affine-free instance norm subtracts each channel's mean, so a bias
  before it is cancelled exactly (the released code's biases are dead parameters). The released decoder's
  unused ``Conv(17 → 1)`` is omitted (spec §2.1).
* Saliency (spec §2.1 "medmodal version", switch ``saliency_impl``): ``torch.autograd.grad`` on a detached copy
  of the zero-filled input with the encoder and head in eval mode (dropout off); parameter ``.grad`` fields are
  never touched, and ``s`` enters the decoder as a constant (no second-order terms). The saliency of a missing
  channel (``available`` False) is set to 0. ``restore_mode_after_saliency`` (spec §2.5
  ``eval_mode_after_saliency``): ``True`` restores every encoder/head sub-module's previous train/eval flag;
  ``False`` reproduces the released ``generate_saliency``, which ends with ``encoder.train()``: the encoder
  (and head) is left in **training** mode, so after ``net.eval()`` the encoder's dropout is active in every later
  call (the decoder keeps its own mode, as in the released code).
* Inputs of any size work without padding, as long as every axis is at least ``2^L`` (``2^(L-1)`` without a
  classifier): the classifier max-pools the last level once more.

Missing channels (``available`` False) are zero-filled with ``torch.where`` before anything reads them, so NaN
or inf in a missing channel cannot reach the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medmodal.networks.registry import register_network
from medmodal.networks.unet import mask_missing, use_fast_layers


class MultiMixOutput(NamedTuple):
    """What :meth:`MultiMixNet.multitask` returns.

    Attributes:
        seg_logits: ``(B, out_channels, *S)`` segmentation logits, or ``None`` without a decoder.
        class_logits: ``(B, num_classes)`` classification logits, or ``None`` without a classifier.
        saliency: ``(B, M, *S)`` detached saliency map (≥ 0) when the saliency bridge is on, else ``None``.
    """

    seg_logits: torch.Tensor | None
    class_logits: torch.Tensor | None
    saliency: torch.Tensor | None


def _conv_cls(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _interp_mode(spatial_dims: int) -> str:
    return "trilinear" if spatial_dims == 3 else "bilinear"


class DoubleConv(nn.Sequential):
    """The released code's ``double_conv``: (conv 3 → instance norm → LeakyReLU) ×2 → dropout.

    Instance norm without affine parameters or running statistics; the convolutions have no bias (the norm
    cancels it). Dropout is plain element-wise ``nn.Dropout``, as in the released code.

    Shapes: ``(B, in_channels, *S)`` → ``(B, out_channels, *S)``.
    """

    def __init__(
        self, *, spatial_dims: int, in_channels: int, out_channels: int, dropout: float, negative_slope: float
    ) -> None:
        conv = _conv_cls(spatial_dims)
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        super().__init__(
            conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm(out_channels, affine=False, track_running_stats=False),
            nn.LeakyReLU(negative_slope, inplace=True),
            conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm(out_channels, affine=False, track_running_stats=False),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.Dropout(dropout),
        )


@register_network("multimix_unet")
class MultiMixNet(nn.Module):
    """MultiMix (Haque et al., ISBI 2021; MELBA 2021): U-Net + bottleneck classifier + saliency bridge.

    Args:
        spatial_dims: 2 or 3.
        modalities: modality names in the batch's channel order (MultiMix: ``("xray",)``).
        out_channels: segmentation logit channels (MultiMix: 1, a sigmoid lung mask).
        num_classes: classification logits (MultiMix: 2).
        channels: encoder widths per level, at least two levels; the spec's ``(16, 32, 64, 128, 256)``.
        dropout: probability of the ``nn.Dropout`` ending every ``double_conv`` (spec: 0.25).
        negative_slope: LeakyReLU slope (spec: 0.2).
        classify: build the classification branch (``cls_head``).
        segment: build the decoder and segmentation head.
        saliency_bridge: feed concat[x, saliency] to the first decoder stage (needs ``classify`` and
            ``segment``); without it the first decoder stage has no bridge channels (the paper's UMTL baseline).
        restore_mode_after_saliency: restore the encoder's train/eval mode after the saliency pass (spec §2.5
            default); ``False`` leaves the encoder in training mode as the released code does (see the module
            docstring).
        saliency_impl: ``"autograd_grad"`` (default: the gradient of the input only, parameter gradients
            untouched) or ``"backward"`` (the released code: ``score.backward()``, read the input's ``.grad``, then
            ``zero_grad()`` every parameter; it discards accumulated gradients and fires DDP's gradient hooks, so
            use it single-process only).

    Attributes:
        bridge_channels: ``2·M`` with the saliency bridge, else 0.
        auxiliary_parameter_prefixes: ``("cls_head.",)`` when the network also segments: :meth:`forward`'s
            segmentation output does not reach the classifier (the saliency is a constant for the decoder).

    Shapes: ``image (B, M, *S)``, ``available (B, M) bool`` → :meth:`forward` gives ``(B, out_channels, *S)``
    logits; :meth:`multitask` gives a :class:`MultiMixOutput`; :meth:`classify` ``(B, num_classes)``;
    :meth:`saliency` ``(B, M, *S)``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        modalities: Sequence[str],
        out_channels: int,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: float = 0.25,
        negative_slope: float = 0.2,
        classify: bool = True,
        segment: bool = True,
        saliency_bridge: bool = True,
        restore_mode_after_saliency: bool = True,
        saliency_impl: str = "autograd_grad",
    ) -> None:
        super().__init__()
        if saliency_impl not in ("autograd_grad", "backward"):
            raise ValueError(f"saliency_impl must be 'autograd_grad' or 'backward', got {saliency_impl!r}")
        self.saliency_impl = saliency_impl
        self.spatial_dims = spatial_dims
        self.modalities = tuple(modalities)
        self.channels = tuple(int(c) for c in channels)
        self.out_channels = int(out_channels)
        self.num_classes = int(num_classes)
        _validate(self, dropout, negative_slope, classify, segment, saliency_bridge)
        self.has_classifier = bool(classify)
        self.has_decoder = bool(segment)
        self.saliency_bridge = bool(saliency_bridge)
        self.restore_mode_after_saliency = bool(restore_mode_after_saliency)
        num_mod = len(self.modalities)
        self.bridge_channels = 2 * num_mod if self.saliency_bridge else 0

        block = {"spatial_dims": spatial_dims, "dropout": dropout, "negative_slope": negative_slope}
        widths = (num_mod, *self.channels)
        self.encoder = nn.ModuleList(
            DoubleConv(in_channels=widths[i], out_channels=widths[i + 1], **block) for i in range(len(self.channels))
        )
        self.cls_head = nn.Linear(self.channels[-1], self.num_classes) if self.has_classifier else None
        if self.has_decoder:
            stages = []
            for k, level in enumerate(reversed(range(len(self.channels) - 1))):
                c_in = self.channels[level + 1] + self.channels[level] + (self.bridge_channels if k == 0 else 0)
                stages.append(DoubleConv(in_channels=c_in, out_channels=self.channels[level], **block))
            self.decoder: nn.ModuleList | None = nn.ModuleList(stages)
            self.seg_head: nn.Module | None = _conv_cls(spatial_dims)(self.channels[0], self.out_channels, 1)
        else:
            self.decoder = None
            self.seg_head = None
        self.auxiliary_parameter_prefixes: tuple[str, ...] = (
            ("cls_head.",) if self.has_classifier and self.has_decoder else ()
        )
        use_fast_layers(self)  # channels-last-friendly instance norm and 1×1 conv, same (empty) state dict

    # ------------------------------------------------------------------ public API
    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``(B, out_channels, *S)`` (the registry contract), saliency bridge included."""
        if not self.has_decoder:
            raise ValueError(
                "this MultiMixNet was built with segment=False and has no segmentation output; "
                "call .classify(image, available) for the class logits"
            )
        out = self._run(self._prepare(image, available), available, classify=False, segment=True)
        assert out.seg_logits is not None
        return out.seg_logits

    def multitask(self, image: torch.Tensor, available: torch.Tensor) -> MultiMixOutput:
        """Both heads on one encoder pass; the saliency (bridge on) is computed once, before it.

        Returns:
            :class:`MultiMixOutput` with ``seg_logits (B, out_channels, *S)``, ``class_logits (B, num_classes)``
            (each ``None`` when its head is not built) and ``saliency (B, M, *S)`` (``None`` without bridge).
        """
        x = self._prepare(image, available)
        return self._run(x, available, classify=self.has_classifier, segment=self.has_decoder)

    def classify(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` from the encoder and head only (no saliency, no decoder)."""
        self._need_classifier("classify")
        x = self._prepare(image, available)
        return self._class_logits(self._encode(x)[-1])

    def saliency(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """The saliency map ``|∂ Σ_i max_c logit_ic / ∂x|``: ``(B, M, *S)``, ≥ 0, detached.

        Computed in eval mode (dropout off) with ``torch.autograd.grad``; parameter gradients are untouched and
        the train/eval mode is restored (``restore_mode_after_saliency``). Works under ``torch.no_grad()`` (it
        enables gradients inside); under ``torch.inference_mode()`` it raises ``RuntimeError`` (inference
        tensors cannot be differentiated), use ``torch.no_grad()`` there.
        """
        self._need_classifier("saliency")
        return self._saliency(self._prepare(image, available), available)

    # ------------------------------------------------------------------ internals
    def _need_classifier(self, what: str) -> None:
        if self.cls_head is None:
            raise ValueError(
                f"MultiMixNet.{what} needs the classification branch; build the network with classify=True"
            )

    def _prepare(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Validate shapes and zero-fill the missing channels: ``(B, M, *S)`` → ``(B, M, *S)``."""
        num_mod, levels = len(self.modalities), len(self.channels)
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != num_mod:
            raise ValueError(f"expected image (B, {num_mod}, *{self.spatial_dims}D), got {tuple(image.shape)}")
        minimum = 2 ** (levels if self.has_classifier else levels - 1)
        size = tuple(image.shape[2:])
        bottleneck = [s // 2 ** (levels - 1) for s in size]
        if min(size) < minimum or math.prod(bottleneck) < 2:
            why = "the classifier max-pools the last level once more" if self.has_classifier else (
                "instance norm needs more than one voxel at the last level")
            raise ValueError(
                f"image spatial size {size} is too small for {levels} levels: every axis needs >= {minimum} ({why})"
            )
        return mask_missing(image, available)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, M, *S)`` → per level ``(B, channels[l], *S_l)``."""
        pool = F.max_pool3d if self.spatial_dims == 3 else F.max_pool2d
        feats = []
        for level, stage in enumerate(self.encoder):
            x = stage(x if level == 0 else pool(x, 2))
            feats.append(x)
        return feats

    def _class_logits(self, last: torch.Tensor) -> torch.Tensor:
        """Max-pool 2, global average pool, Linear: ``(B, channels[-1], *S_{L-1})`` → ``(B, num_classes)``."""
        assert self.cls_head is not None
        pool = F.max_pool3d if self.spatial_dims == 3 else F.max_pool2d
        return self.cls_head(pool(last, 2).flatten(2).mean(-1))

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        return F.interpolate(x, size=tuple(size), mode=_interp_mode(self.spatial_dims), align_corners=True)

    def _decode(self, feats: Sequence[torch.Tensor], bridge: torch.Tensor | None) -> torch.Tensor:
        """Encoder features (+ bridge ``(B, 2M, *S_{L-2})``) → ``(B, out_channels, *S)`` logits."""
        assert self.decoder is not None and self.seg_head is not None
        h = feats[-1]
        for k, (stage, skip) in enumerate(zip(self.decoder, reversed(feats[:-1]), strict=True)):
            parts = [self._resize(h, skip.shape[2:]), skip]
            if k == 0 and bridge is not None:
                parts.append(bridge)
            h = stage(torch.cat(parts, dim=1))
        return self.seg_head(h)

    def _saliency(self, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``|∂ Σ_i max_c logit_ic / ∂x|`` of the zero-filled ``x (B, M, *S)``, eval mode; missing channels 0."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "MultiMixNet saliency needs autograd, which torch.inference_mode() disables; "
                "run the network under torch.no_grad() instead"
            )
        assert self.cls_head is not None
        parts = [m for part in (self.encoder, self.cls_head) for m in part.modules()]
        modes = [m.training for m in parts]
        for m in parts:
            m.train(False)
        try:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                score = self._class_logits(self._encode(leaf)[-1]).max(dim=1).values.sum()
                if self.saliency_impl == "backward":  # the released code: backward, then model.zero_grad()
                    score.backward()
                    grad = leaf.grad
                    for p in self.parameters():
                        p.grad = None
                else:
                    (grad,) = torch.autograd.grad(score, leaf)
        finally:
            if self.restore_mode_after_saliency:
                for m, mode in zip(parts, modes, strict=True):
                    m.train(mode)
            else:  # the released generate_saliency ends with encoder.train()
                self.encoder.train()
                self.cls_head.train()
        return mask_missing(grad.abs(), available)

    def _run(self, x: torch.Tensor, available: torch.Tensor, *, classify: bool, segment: bool) -> MultiMixOutput:
        sal = self._saliency(x, available) if self.saliency_bridge and segment else None
        feats = self._encode(x)
        class_logits = self._class_logits(feats[-1]) if classify else None
        seg_logits = None
        if segment:
            bridge = None
            if sal is not None:
                bridge = self._resize(torch.cat([x, sal], dim=1), feats[-2].shape[2:])
            seg_logits = self._decode(feats, bridge)
        return MultiMixOutput(seg_logits, class_logits, sal)


def _validate(
    net: MultiMixNet, dropout: float, negative_slope: float, classify: bool, segment: bool, saliency_bridge: bool
) -> None:
    if net.spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {net.spatial_dims}")
    if not net.modalities or len(set(net.modalities)) != len(net.modalities):
        raise ValueError(f"modalities must be non-empty and unique, got {net.modalities}")
    if len(net.channels) < 2 or min(net.channels) < 1:
        raise ValueError(f"channels needs at least two positive levels, got {net.channels}")
    if not (classify or segment):
        raise ValueError("classify=False and segment=False leave the network without an output; enable one")
    if segment and net.out_channels < 1:
        raise ValueError(f"out_channels must be >= 1 when segment=True, got {net.out_channels}")
    if classify and net.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 when classify=True, got {net.num_classes}")
    if saliency_bridge and not (classify and segment):
        raise ValueError(
            "saliency_bridge=True needs classify=True and segment=True (the saliency comes from the classifier "
            "and feeds the decoder); pass saliency_bridge=False"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if negative_slope < 0.0:
        raise ValueError(f"negative_slope must be >= 0, got {negative_slope}")


@register_network("multimix_unet_tiny")
def multimix_unet_tiny(
    *,
    spatial_dims: int,
    modalities: Sequence[str],
    out_channels: int,
    num_classes: int = 2,
    classify: bool = True,
    segment: bool = True,
    saliency_bridge: bool = True,
    restore_mode_after_saliency: bool = True,
    saliency_impl: str = "autograd_grad",
) -> MultiMixNet:
    """A four-level (4, 8, 16, 32) :class:`MultiMixNet` for tests (every axis >= 16)."""
    return MultiMixNet(
        spatial_dims=spatial_dims,
        modalities=modalities,
        out_channels=out_channels,
        num_classes=num_classes,
        channels=(4, 8, 16, 32),
        classify=classify,
        segment=segment,
        saliency_bridge=saliency_bridge,
        restore_mode_after_saliency=restore_mode_after_saliency,
        saliency_impl=saliency_impl,
    )
