"""The registry contract: every registered network runs forward and backward in 2D and 3D, every parameter
gets a gradient, and garbage in a missing channel never changes the output."""

from __future__ import annotations

import pytest
import torch

from medmodal.networks.registry import create_network, list_networks

MODS = ("t1", "t1c", "t2", "flair")
SHAPES = {2: (21, 23), 3: (17, 18, 19)}
# Full-size entries are exercised in their tiny variant only (same code, smaller widths).
TINY = [n for n in list_networks() if n.endswith("_tiny")]


def test_registry_lists_real_and_tiny_networks() -> None:
    names = list_networks()
    assert "unet" in names and "unet_tiny" in names


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward_every_parameter_gets_gradient(name: str, dims: int) -> None:
    torch.manual_seed(0)
    net = create_network(name, spatial_dims=dims, modalities=MODS, out_channels=3)
    x = torch.randn(2, len(MODS), *SHAPES[dims])
    available = torch.ones(2, len(MODS), dtype=torch.bool)
    out = net(x, available)
    # a classifier (``predicts = "classes"``) returns (B, num_classes) logits; everything else dense logits
    if getattr(net, "predicts", "dense") == "classes":
        assert out.shape == (2, net.num_classes)
    else:
        assert out.shape == (2, 3, *SHAPES[dims])
    out.square().mean().backward()
    # Auxiliary heads (e.g. ShaSpec's domain classifier) feed the training losses, not `forward`'s output;
    # a network declares them and its own tests check their gradients.
    aux = tuple(getattr(net, "auxiliary_parameter_prefixes", ()))
    assert all(p and any(n.startswith(p) for n, _ in net.named_parameters()) for p in aux), aux
    missing = [
        n
        for n, p in net.named_parameters()
        if p.requires_grad and not n.startswith(aux) and (p.grad is None or not p.grad.any())
    ]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dims", [2, 3])
def test_missing_channels_are_never_read(name: str, dims: int) -> None:
    torch.manual_seed(0)
    net = create_network(name, spatial_dims=dims, modalities=MODS, out_channels=3).eval()
    if getattr(net, "reads_missing_channels", False):
        pytest.skip(f"{name} reads its missing channels by design (a diffusion denoiser's noisy inputs)")
    x = torch.randn(2, len(MODS), *SHAPES[dims])
    available = torch.tensor([[True, False, True, False], [False, False, False, True]])
    x_zero = torch.where(available[(...,) + (None,) * dims], x, torch.zeros(()))
    garbage = x_zero.clone()
    garbage[:, 1] = 1e6 * torch.randn_like(garbage[:, 1])
    garbage[0, 3] = float("nan")
    garbage[1, 0] = float("inf")
    with torch.no_grad():
        a = net(x_zero, available)
        b = net(garbage, available)
    assert torch.equal(a, b)


def test_unknown_network_and_bad_kwargs_are_clear_errors() -> None:
    with pytest.raises(KeyError, match="unknown network 'unte'.*unet"):
        create_network("unte", spatial_dims=3, modalities=MODS, out_channels=3)
    with pytest.raises(TypeError, match="network 'unet'.*chanels"):
        create_network("unet", spatial_dims=3, modalities=MODS, out_channels=3, chanels=(4, 8))
    with pytest.raises(ValueError, match="spatial_dims"):
        create_network("unet", spatial_dims=4, modalities=MODS, out_channels=3)


def test_wrong_input_shape_is_a_clear_error() -> None:
    net = create_network("unet_tiny", spatial_dims=3, modalities=MODS, out_channels=3)
    with pytest.raises(ValueError, match=r"expected image \(B, 4"):
        net(torch.randn(2, 3, 9, 9, 9), torch.ones(2, 3, dtype=torch.bool))
