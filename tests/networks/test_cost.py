"""Parameter and FLOP counting of networks (networks/cost.py)."""

from __future__ import annotations

import torch
from torch import nn

from medmodal.networks.cost import network_cost
from medmodal.networks.registry import create_network


class _OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 5, kernel_size=3, padding=1, bias=False)

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


def test_one_convolution_has_the_analytic_cost():
    net = _OneConv()
    cost = network_cost(net, batch=3, modalities=2, patch=(5, 6, 7))
    fwd = 2 * 3 * 5 * 2 * 27 * (5 * 6 * 7)  # 2 FLOPs per multiply-add, per output voxel and channel
    assert cost.parameters == 5 * 2 * 27
    assert cost.forward_flops == fwd
    assert cost.step_flops == 2 * fwd  # backward: weight gradient only (the input needs no gradient)


def test_cost_leaves_the_network_as_it_was():
    net = create_network("unet", spatial_dims=2, modalities=("a", "b"), out_channels=3, channels=(4, 8))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cost = network_cost(net, batch=2, modalities=2, patch=(17, 18))
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    wide = network_cost(create_network("unet", spatial_dims=2, modalities=("a", "b"), out_channels=3,
                                       channels=(8, 16)), batch=2, modalities=2, patch=(17, 18))
    assert 3 * cost.step_flops < wide.step_flops < 5 * cost.step_flops  # twice the width: ~4x the FLOPs


class _GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 8, kernel_size=3, padding=1, groups=4, bias=False)

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        return self.conv(image * 1.0)


def test_grouped_convolution_backward_costs_what_its_forward_costs():
    """torch's formula counts a grouped convolution's weight gradient `groups` times too high."""
    cost = network_cost(_GroupedConv(), batch=2, modalities=4, patch=(5, 6, 7))
    fwd = 2 * 2 * 8 * (4 // 4) * 27 * (5 * 6 * 7)
    assert cost.forward_flops == fwd
    assert cost.step_flops == 2 * fwd  # weight gradient only: the input needs no gradient
