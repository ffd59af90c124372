"""PUMIT's SAC patch discriminator (``shared/methods/pumit.md`` §2.3): patch-map shapes in 2D and 3D at every kind
of anisotropy, the plain convolution stack at DA 0 and the summed-depth-tap stack for a 2D image (bit for bit in
float64), gradients, registry and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmodal.networks.pumit_discriminator import PUMITDiscriminator
from medmodal.networks.registry import create_network

WIDTHS = (8, 16)  # L = 2 downsamplings: patches of 4 x 4 x 2^max(2 - da, 0) voxels


@pytest.mark.parametrize(
    ("shape", "da", "grid"),
    [
        ((24, 12, 8), 0, (6, 3, 2)),  # isotropic: depth downsampled with the plane
        ((24, 12, 8), 1, (6, 3, 4)),  # one in-plane-only step first
        ((24, 12, 8), 2, (6, 3, 8)),  # anisotropic through both steps: depth kept
        ((24, 12, 8), 5, (6, 3, 8)),
        ((24, 12, 1), 5, (6, 3, 1)),  # a 2D image as a one-slice volume
    ],
)
def test_patch_logit_map_shape(shape: tuple[int, ...], da: int, grid: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    disc = PUMITDiscriminator(in_channels=1, widths=WIDTHS)
    logits = disc(torch.randn(2, 1, *shape), da)
    assert logits.shape == (2, 1, *grid)
    assert disc.patch_size(da) == tuple(s // g for s, g in zip(shape, grid, strict=True))


def _reference(disc: PUMITDiscriminator, x: torch.Tensor, *, collapse: bool) -> torch.Tensor:
    """The same stack written with plain ``F.conv3d``: the weights as they are (``collapse=False``, DA 0) or with
    the depth taps summed and no depth padding (``collapse=True``, an image that stays anisotropic throughout)."""

    def conv(module, x: torch.Tensor) -> torch.Tensor:  # module: SACConv
        w = module.weight.sum(-1, keepdim=True) if collapse else module.weight
        k = module.weight.shape[-1]
        if k == 2:  # downsampling k = s = 2
            stride = (2, 2, 1) if collapse else 2
            return F.conv3d(x, w, module.bias, stride=stride)
        return F.conv3d(x, w, module.bias, padding=(1, 1, 0) if collapse else 1)

    for block in disc.blocks:
        x = conv(block.conv, x)
        x = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
        x = F.leaky_relu(x, block.act.negative_slope)
    return conv(disc.head, x)


def test_da0_is_the_plain_conv_stack_and_2d_sums_the_depth_taps() -> None:
    torch.manual_seed(0)
    disc = PUMITDiscriminator(in_channels=2, widths=WIDTHS).double()
    for p in disc.parameters():  # GroupNorm starts at (1, 0): make its affine part count
        torch.nn.init.normal_(p)
    x3 = torch.randn(2, 2, 12, 8, 8, dtype=torch.float64)
    assert torch.equal(disc(x3, 0), _reference(disc, x3, collapse=False))
    x2 = torch.randn(2, 2, 12, 8, 1, dtype=torch.float64)
    assert torch.equal(disc(x2, 5), _reference(disc, x2, collapse=True))


def test_every_parameter_gets_a_gradient_and_the_registry_builds_it() -> None:
    torch.manual_seed(0)
    disc = create_network("pumit_discriminator", in_channels=1, widths=[8, 8, 16], post_convs=2)
    assert isinstance(disc, PUMITDiscriminator) and disc.num_downsamplings == 3
    disc(torch.randn(2, 1, 16, 8, 4), 1).square().mean().backward()
    missing = [n for n, p in disc.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    # the spec's widths; GroupNorm after every conv, including the first
    full = PUMITDiscriminator()
    assert full.widths == (128, 256, 512)
    assert [b.norm.num_channels for b in full.blocks] == [128, 256, 512, 512]


def test_clear_errors() -> None:
    disc = PUMITDiscriminator(widths=WIDTHS)
    with pytest.raises(ValueError, match=r"one-slice volume"):
        disc(torch.randn(1, 1, 16, 16), 5)
    with pytest.raises(ValueError, match=r"expects an image \(B, 1, X, Y, Z\)"):
        disc(torch.randn(1, 3, 16, 16, 4), 0)
    with pytest.raises(ValueError, match=r"multiple of its patch \(4, 4, 2\)"):
        disc(torch.randn(1, 1, 16, 16, 3), 1)
    with pytest.raises(ValueError, match="multiples of norm_groups"):
        PUMITDiscriminator(widths=(8, 12))
