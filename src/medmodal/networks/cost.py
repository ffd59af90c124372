"""What a network costs: parameters and floating-point operations per training step.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` while the network runs forward and
backward once on a batch of the given shape (every modality available), so they follow the architecture as
built, not a formula. They cover convolutions and matrix products (what the counter counts); norms,
activations and the losses add a few percent at most. One multiply-add counts as 2 FLOPs.

PyTorch's formula for a convolution's backward counts the weight gradient as if the convolution had one group,
``groups`` times too high for a grouped one (ShaSpec runs its M specific encoders as one grouped convolution);
here each gradient a backward computes (input, weight) costs what the forward costs, which holds for any
``groups`` and for transposed convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_CUSTOM = {torch.ops.aten.convolution_backward: _conv_backward_flops}


@dataclass(frozen=True)
class NetworkCost:
    """Parameters, and FLOPs of one forward and of one forward + backward on a ``batch``."""

    parameters: int
    forward_flops: int
    step_flops: int

    def describe(self) -> str:
        return (f"{self.parameters / 1e3:,.0f}k parameters, {self.step_flops / 1e9:.1f} GFLOP per training step "
                f"(forward {self.forward_flops / 1e9:.1f})")


def network_cost(network: nn.Module, *, batch: int, modalities: int, patch: Sequence[int]) -> NetworkCost:
    """Count ``network``'s parameters and the FLOPs of one training step.

    Args:
        network: ``forward(image (B, M, *S), available (B, M)) -> (B, R, *S)`` (medmodal's network contract).
        batch: ``B``, samples per step (per process).
        modalities: ``M``.
        patch: the spatial size ``S`` of a training patch.

    The network's training/eval mode and gradients are restored afterwards; its parameters are not changed.
    """
    x = torch.zeros(batch, modalities, *patch)
    available = torch.ones(batch, modalities, dtype=torch.bool)
    was_training = network.training
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in network.named_parameters()}
    network.train()
    try:
        with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fwd:
            out = network(x, available)
        forward = fwd.get_total_flops()
        with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as bwd:
            out.float().sum().backward()
        backward = bwd.get_total_flops()
    finally:
        network.train(was_training)
        for n, p in network.named_parameters():
            p.grad = grads[n]
    return NetworkCost(parameters=sum(p.numel() for p in network.parameters()), forward_flops=int(forward),
                       step_flops=int(forward + backward))
