"""The U-Net's speed layers (networks/unet.py) compute what PyTorch's/MONAI's own layers compute: instance
norm and 1×1 convolutions in both memory formats, 2D and 3D, and M encoders as one grouped computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmodal.networks.registry import create_network
from medmodal.networks.unet import (
    InstanceNorm,
    PointwiseConv2d,
    PointwiseConv3d,
    UNetEncoder,
    grouped_encoders,
    use_fast_layers,
)

SHAPES = {2: (9, 11), 3: (5, 6, 7)}


class _TorchInstanceNorm(nn.Module):
    """What MONAI's affine-free ``"instance"`` norm computes, through PyTorch's own kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, eps=1e-5)
FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


def _input(batch: int, channels: int, dims: int, channels_last: bool) -> torch.Tensor:
    torch.manual_seed(0)
    # per-channel offsets and scales, so that a norm over the wrong axes gives a different answer
    scale = torch.arange(1.0, channels + 1).reshape(1, channels, *([1] * dims))
    x = torch.randn(batch, channels, *SHAPES[dims]) * scale + 3 * scale
    return x.contiguous(memory_format=FORMATS[dims]) if channels_last else x


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_equals_torch_and_keeps_the_memory_format(dims: int, batch: int, channels_last: bool) -> None:
    x = _input(batch, 4, dims, channels_last).requires_grad_()
    ref_x = x.detach().double().contiguous().requires_grad_()  # float64, contiguous: the reference
    y = InstanceNorm(eps=1e-5)(x)
    ref = F.instance_norm(ref_x, eps=1e-5)
    torch.testing.assert_close(y, ref.float(), atol=1e-5, rtol=1e-5)
    # every (sample, channel) has zero mean and unit (biased) variance over space
    flat = y.detach().flatten(2)
    torch.testing.assert_close(flat.mean(2), torch.zeros(batch, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(2, correction=0), torch.ones(batch, 4), atol=1e-3, rtol=0)
    assert y.is_contiguous(memory_format=FORMATS[dims]) == channels_last
    # the incoming gradient in the input's format (with batch 1 and a channels-last gradient,
    # torch 2.13's own F.instance_norm gets the input gradient wrong on CPU)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double().contiguous())
    torch.testing.assert_close(x.grad, ref_x.grad.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_equals_conv(dims: int, channels_last: bool) -> None:
    torch.manual_seed(1)
    conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(5, 3, kernel_size=1)
    fast = (PointwiseConv3d if dims == 3 else PointwiseConv2d)(5, 3, kernel_size=1)
    fast.load_state_dict(conv.state_dict())
    x = _input(2, 5, dims, channels_last).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    y, ref = fast(x), conv(ref_x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=FORMATS[dims]) == channels_last
    y.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(fast.bias.grad, conv.bias.grad, atol=1e-3, rtol=1e-5)


def test_use_fast_layers_swaps_only_what_it_can_and_keeps_the_state_dict() -> None:
    net = nn.Sequential(
        nn.Conv3d(2, 4, 1),
        nn.InstanceNorm3d(4),
        nn.Conv3d(4, 4, 1, stride=2),  # strided: kept
        nn.InstanceNorm3d(4, affine=True),  # has parameters: kept
        nn.Conv3d(4, 4, 3, padding=1),  # 3×3: kept
        nn.Conv2d(4, 2, 1, bias=False),
    )
    state = {k: v.clone() for k, v in net.state_dict().items()}
    use_fast_layers(net)
    assert [type(m).__name__ for m in net] == [
        "PointwiseConv3d", "InstanceNorm", "Conv3d", "InstanceNorm3d", "Conv3d", "PointwiseConv2d"
    ]
    assert net[5].bias is None
    assert list(net.state_dict()) == list(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_with_fast_layers_equals_monai_layers(dims: int) -> None:
    """The registered U-Net (fast layers) and the same weights with PyTorch's layers: same outputs and
    gradients in the channels-last format the training systems use."""
    mods = ("t1", "t1c", "t2")
    torch.manual_seed(0)
    fast = create_network("unet", spatial_dims=dims, modalities=mods, out_channels=3, channels=(4, 8, 16))
    slow = create_network("unet", spatial_dims=dims, modalities=mods, out_channels=3, channels=(4, 8, 16))
    slow.load_state_dict(fast.state_dict())
    for parent in list(slow.modules()):  # back to PyTorch's own layers
        for name, child in list(parent.named_children()):
            if isinstance(child, InstanceNorm):
                setattr(parent, name, _TorchInstanceNorm())
            elif isinstance(child, (PointwiseConv2d, PointwiseConv3d)):
                conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(child.in_channels, child.out_channels, 1)
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv)
    assert not any(isinstance(m, (InstanceNorm, PointwiseConv2d, PointwiseConv3d)) for m in slow.modules())
    assert any(isinstance(m, PointwiseConv2d | PointwiseConv3d) for m in fast.modules())
    torch.manual_seed(1)
    x = torch.randn(2, 3, *SHAPES[dims]).contiguous(memory_format=FORMATS[dims])
    available = torch.tensor([[True, False, True], [True, True, True]])
    outs = []
    for net in (fast, slow):
        net.to(memory_format=FORMATS[dims])
        out = net(x, available)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for (name, a), b in zip(fast.named_parameters(), slow.parameters(), strict=True):
        scale = float(b.grad.abs().max())
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_encoders_equal_one_call_per_encoder(dims: int, channels_last: bool) -> None:
    torch.manual_seed(0)
    encoders = [UNetEncoder(spatial_dims=dims, in_channels=2, channels=(3, 5)) for _ in range(3)]
    twins = [UNetEncoder(spatial_dims=dims, in_channels=2, channels=(3, 5)) for _ in range(3)]
    for e, t in zip(encoders, twins, strict=True):
        t.load_state_dict(e.state_dict())
    x = _input(2, 6, dims, channels_last)
    grouped = grouped_encoders(encoders, x)
    looped = [twins[m](x[:, 2 * m : 2 * m + 2]) for m in range(3)]
    assert [tuple(f.shape) for f in grouped] == [(2, 9, *SHAPES[dims]), (2, 15, *((s + 1) // 2 for s in SHAPES[dims]))]
    for level, feat in enumerate(grouped):
        torch.testing.assert_close(feat, torch.cat([f[level] for f in looped], 1), atol=1e-5, rtol=1e-4)
    # gradients reach each encoder's own parameters, as in the loop
    weights = torch.arange(1.0, 16.0).reshape(1, 15, *([1] * dims))
    (grouped[-1] * weights).sum().backward()
    (torch.cat([f[-1] for f in looped], 1) * weights).sum().backward()
    for e, t in zip(encoders, twins, strict=True):
        for (name, a), b in zip(e.named_parameters(), t.parameters(), strict=True):
            scale = float(b.grad.abs().max())
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_grouped_encoders_refuse_batch_norm_and_mixed_widths() -> None:
    bn = [UNetEncoder(spatial_dims=2, in_channels=1, channels=(2, 4), norm="batch") for _ in range(2)]
    with pytest.raises(ValueError, match="instance norm"):
        grouped_encoders(bn, torch.randn(2, 2, 8, 8))
    mixed = [UNetEncoder(spatial_dims=2, in_channels=1, channels=c) for c in ((2, 4), (2, 6))]
    with pytest.raises(ValueError, match="one architecture"):
        grouped_encoders(mixed, torch.randn(2, 2, 8, 8))
