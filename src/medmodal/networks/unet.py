"""Dimension-agnostic U-Net pieces and the multi-modal "zero-fill" U-Net baseline.

The encoder and decoder are separate modules so that methods which fuse features at the bottleneck
(ShaSpec, Wang et al., CVPR 2023) can reuse them. Blocks come from MONAI's dynamic U-Net
(``UnetBasicBlock``: conv-norm-act ×2, ``UnetUpBlock``: transposed conv + skip concatenation), following
nnU-Net (Isensee et al., Nat. Methods 2021). Inputs of any size work: they are zero-padded to a multiple of
``2 ** (len(channels) - 1)`` and the output is cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

from medmodal.networks.registry import register_network


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

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = up(x, skip)
        return self.head(x)


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
