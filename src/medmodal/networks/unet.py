"""Dimension-agnostic U-Net pieces and the multi-modal "zero-fill" U-Net baseline.

The encoder and decoder are separate modules so that methods which fuse features at the bottleneck
(ShaSpec, Wang et al., CVPR 2023) can reuse them. Blocks come from MONAI's dynamic U-Net
(``UnetBasicBlock``: conv-norm-act ×2, ``UnetUpBlock``: transposed conv + skip concatenation), following
nnU-Net (Isensee et al., Nat. Methods 2021). Inputs of any size work: they are zero-padded to a multiple of
``2 ** (len(channels) - 1)`` and the output is cropped back.

Speed on CPU (``benchmarks/train_step.py``): medmodal trains 3D networks in the channels-last memory format,
where oneDNN's convolutions are fastest. Two of PyTorch's layers leave that format or take a slow path there,
so :func:`use_fast_layers` swaps them, keeping every parameter and the outputs (up to float rounding):

* affine-free instance norm: ``F.instance_norm`` views ``(B, C, *S)`` as ``(1, B·C, *S)``, which copies a
  channels-last tensor to the contiguous format and returns it there, so the next convolution converts it
  back (forward and backward). :class:`InstanceNorm` computes the same statistics with the batch-norm
  (``B = 1``) or group-norm (``groups = C``) kernels, which work in channels-last directly.
* 1×1 convolutions (the output head): oneDNN's backward of a 1×1×1 Conv3d with few output channels is ~10×
  slower than the equivalent matrix product, which is what :class:`PointwiseConv3d` computes on a
  channels-last input.

:func:`grouped_encoders` runs M encoders of equal architecture on M inputs as one grouped computation
(``groups = M`` convolutions), e.g. ShaSpec's modality-specific encoders, instead of M small calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

from medmodal.networks.registry import register_network


def _channels_last_format(ndim: int) -> torch.memory_format | None:
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


def _is_channels_last(x: torch.Tensor) -> bool:
    """True for a channels-last (2D or 3D) tensor that is not also plain contiguous (``C > 1``)."""
    fmt = _channels_last_format(x.ndim)
    return fmt is not None and x.shape[1] > 1 and x.is_contiguous(memory_format=fmt) and not x.is_contiguous()


class InstanceNorm(nn.Module):
    """Instance normalisation without affine parameters or running statistics, format-preserving.

    Every ``(sample, channel)`` is normalised over its spatial positions with the biased variance, exactly
    what ``nn.InstanceNorm{2,3}d(affine=False)`` (MONAI's ``"instance"`` norm) computes. A channels-last
    input stays channels-last: batch norm in training mode over a single sample, or group norm with one group
    per channel, both of which have channels-last CPU kernels. Other inputs use ``F.instance_norm``.

    A single sample always goes through batch norm, in either format: on CPU (torch 2.13) ``F.instance_norm``
    of a batch of one returns a wrong input gradient when the incoming gradient is channels-last (in the
    U-Net and ShaSpec as built the gradient reaching it is contiguous, so their training was not affected).

    Shapes: ``(B, C, *S)`` → ``(B, C, *S)``, same memory format.
    """

    def __init__(self, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # also avoids F.instance_norm's wrong input gradient (see the class docstring)
            return F.batch_norm(x, None, None, training=True, eps=self.eps)
        if _is_channels_last(x):
            return F.group_norm(x, x.shape[1], eps=self.eps)
        return F.instance_norm(x, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _pointwise(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor | None:
    """A 1×1 convolution of a channels-last ``x`` as one matrix product over ``(B·S, C_in)``, else ``None``."""
    if not _is_channels_last(x):
        return None
    return F.linear(x.movedim(1, -1), conv.weight.flatten(1), conv.bias).movedim(-1, 1)


class PointwiseConv2d(nn.Conv2d):
    """A 1×1, stride-1 ``nn.Conv2d`` that computes a channels-last input as a matrix product (same result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _pointwise(self, x)
        return super().forward(x) if y is None else y


class PointwiseConv3d(nn.Conv3d):
    """A 1×1×1, stride-1 ``nn.Conv3d`` that computes a channels-last input as a matrix product (same result).

    oneDNN's backward of a small 1×1×1 Conv3d (e.g. 8 → 3 channels at 2×32³) takes ~10 ms on 2 threads,
    the matrix product well under 1 ms.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _pointwise(self, x)
        return super().forward(x) if y is None else y


def _is_plain_pointwise(conv: nn.Module) -> bool:
    """A 1×1 convolution without stride, dilation, padding or groups (``type`` check: not a subclass)."""
    return (
        type(conv) in (nn.Conv2d, nn.Conv3d)
        and all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and all(d == 1 for d in conv.dilation)
        and (isinstance(conv.padding, str) or not any(conv.padding))  # "same"/"valid" pad nothing at k = 1
        and conv.groups == 1
    )


def use_fast_layers(module: nn.Module) -> nn.Module:
    """Swap, in place, every affine-free ``nn.InstanceNorm{2,3}d`` without running statistics for
    :class:`InstanceNorm` and every plain 1×1 ``nn.Conv{2,3}d`` for :class:`PointwiseConv2d`/``3d`` sharing
    its parameters. The state dict (names, shapes, values) is unchanged, so saved weights load either way.

    Returns ``module``.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) in (nn.InstanceNorm2d, nn.InstanceNorm3d)
                and not child.affine
                and not child.track_running_stats
            ):
                setattr(parent, name, InstanceNorm(eps=child.eps))
            elif _is_plain_pointwise(child):
                cls = PointwiseConv3d if isinstance(child, nn.Conv3d) else PointwiseConv2d
                new = cls(child.in_channels, child.out_channels, 1, bias=child.bias is not None,
                          device="meta")
                new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new)
    return module


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class UNetEncoder(nn.Module):
    """Encoder: ``len(channels)`` stages, the first at full resolution, each next one stride 2.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        channels: feature channels per stage, e.g. ``(16, 32, 64, 128)``.
        norm: MONAI norm name (``"instance"``, ``"batch"``, ...).

    Shapes: ``(B, in_channels, *S)`` → list of ``(B, channels[i], *S / 2**i)`` (the last is the bottleneck).
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str = "instance",
    ) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two stages, got {tuple(channels)}")
        self.spatial_dims = spatial_dims
        self.channels = tuple(int(c) for c in channels)
        act = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
        stages = []
        prev = in_channels
        for i, ch in enumerate(self.channels):
            stages.append(
                UnetBasicBlock(
                    spatial_dims, prev, ch, kernel_size=3, stride=1 if i == 0 else 2, norm_name=norm, act_name=act
                )
            )
            prev = ch
        self.stages = nn.ModuleList(stages)
        use_fast_layers(self)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be a multiple of this (the total downsampling factor)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class UNetDecoder(nn.Module):
    """Decoder mirroring :class:`UNetEncoder` with skip connections and a 1×1 output convolution.

    Shapes: list of encoder features (bottleneck last) → ``(B, out_channels, *S)``.
    """

    def __init__(
        self, *, spatial_dims: int, channels: Sequence[int], out_channels: int, norm: str = "instance"
    ) -> None:
        super().__init__()
        _check_dims(spatial_dims)
        channels = tuple(int(c) for c in channels)
        act = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
        self.ups = nn.ModuleList(
            UnetUpBlock(
                spatial_dims,
                channels[i + 1],
                channels[i],
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm,
                act_name=act,
            )
            for i in reversed(range(len(channels) - 1))
        )
        self.head = UnetOutBlock(spatial_dims, channels[0], out_channels)
        use_fast_layers(self)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = up(x, skip)
        return self.head(x)


def _grouped_conv(convs: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``convs[m]`` on channel group m of ``x`` as one ``groups=M`` convolution (weights concatenated)."""
    c = convs[0]
    conv_fn = F.conv3d if isinstance(c, nn.Conv3d) else F.conv2d
    weight = torch.cat([conv.weight for conv in convs])
    bias = None if c.bias is None else torch.cat([conv.bias for conv in convs])
    return conv_fn(x, weight, bias, c.stride, c.padding, c.dilation, len(convs))


def grouped_encoders(encoders: Sequence[UNetEncoder], x: torch.Tensor) -> list[torch.Tensor]:
    """Run M encoders of one architecture, encoder m on channel group m of ``x``, as one computation.

    Each convolution of a stage runs once as a ``groups=M`` convolution whose weight is the M encoders'
    weights concatenated (gradients flow back into every encoder's own parameters); instance norm and the
    activation act per sample and channel, so they run on all ``M·C`` channels at once. For M small-batch
    inputs this replaces M calls of small convolutions by one call of M times the work, and the result
    equals ``torch.cat([encoders[m](x_m)[l] for m in range(M)], dim=1)`` at every level ``l`` (up to float
    rounding), where ``x_m = x[:, m·C_in:(m+1)·C_in]``.

    Args:
        encoders: M :class:`UNetEncoder` of equal ``spatial_dims``, ``in_channels`` and ``channels`` with
            instance norm (``norm="instance"``; a norm with batch statistics or parameters cannot be grouped).
        x: ``(B, M·C_in, *S)``.

    Returns:
        Per level ``l``, ``(B, M·channels[l], *S / 2**l)``, modality-major along channels.
    """
    first = encoders[0]
    if any(e.channels != first.channels or e.spatial_dims != first.spatial_dims for e in encoders):
        raise ValueError("grouped_encoders needs encoders of one architecture (spatial_dims, channels)")
    feats = []
    for level, stage in enumerate(first.stages):
        blocks = [e.stages[level] for e in encoders]
        for b in blocks:
            if not (isinstance(b.norm1, InstanceNorm) and isinstance(b.norm2, InstanceNorm)):
                raise ValueError(f"grouped_encoders needs instance norm, got {type(b.norm1).__name__}")
        x = stage.lrelu(stage.norm1(_grouped_conv([b.conv1.conv for b in blocks], x)))
        x = stage.lrelu(stage.norm2(_grouped_conv([b.conv2.conv for b in blocks], x)))
        feats.append(x)
    return feats


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of ``(B, C, *S)`` at the end up to a multiple; returns the original ``S``."""
    size = tuple(x.shape[2:])
    pad: list[int] = []
    for s in reversed(size):
        pad += [0, (-s) % multiple]
    if any(pad):
        x = F.pad(x, pad)
    return x, size


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``(B, C, *S')`` to ``size`` (from the start)."""
    return x[(slice(None), slice(None), *(slice(0, s) for s in size))]


def mask_missing(image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Zero every missing channel of ``image (B, M, *S)`` given ``available (B, M)``.

    ``torch.where`` rather than a product, so that NaN or inf garbage in a missing channel cannot leak.
    """
    if available.shape != image.shape[:2]:
        raise ValueError(f"available must be (B, M) = {tuple(image.shape[:2])}, got {tuple(available.shape)}")
    keep = available.to(torch.bool).reshape(*available.shape, *([1] * (image.ndim - 2)))
    return torch.where(keep, image, torch.zeros((), dtype=image.dtype, device=image.device))


@register_network("unet")
class MultiModalUNet(nn.Module):
    """The "zero-fill" baseline: a U-Net over the stacked modalities, missing ones replaced by zeros.

    This is the baseline ShaSpec (Wang et al., CVPR 2023) and M2DN compare against: the availability mask
    is applied inside ``forward`` so a missing channel's content never reaches the convolutions.

    Args:
        spatial_dims: 2 or 3.
        modalities: modality names, in the batch's channel order.
        out_channels: output channels (e.g. 3 sigmoid regions WT/TC/ET).
        channels: feature channels per resolution stage.
        norm: MONAI norm name.

    Shapes: ``image (B, M, *S)``, ``available (B, M) bool`` → logits ``(B, out_channels, *S)``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        modalities: Sequence[str],
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str = "instance",
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        if not self.modalities:
            raise ValueError("modalities must name at least one modality")
        self.spatial_dims = spatial_dims
        self.encoder = UNetEncoder(
            spatial_dims=spatial_dims, in_channels=len(self.modalities), channels=channels, norm=norm
        )
        self.decoder = UNetDecoder(
            spatial_dims=spatial_dims, channels=channels, out_channels=out_channels, norm=norm
        )

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != len(self.modalities):
            raise ValueError(
                f"expected image (B, {len(self.modalities)}, *{self.spatial_dims}D), got {tuple(image.shape)}"
            )
        x = mask_missing(image, available)
        x, size = pad_to_multiple(x, self.encoder.divisor)
        return crop_to(self.decoder(self.encoder(x)), size)


@register_network("unet_tiny")
def unet_tiny(*, spatial_dims: int, modalities: Sequence[str], out_channels: int) -> MultiModalUNet:
    """A two-stage, 4/8-channel :class:`MultiModalUNet` for tests."""
    return MultiModalUNet(
        spatial_dims=spatial_dims, modalities=modalities, out_channels=out_channels, channels=(4, 8)
    )
