"""Spatially adaptive convolutions (``shared/methods/pumit.md`` §2.1–2.2) and their invariants §3.1, 3.2, 3.3, 3.11.

Volumes are ``(B, C, X, Y, Z)`` with the slice axis last; the isotropic reference repeats each slice along ``Z``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medmodal.layers.sac import (
    SACConv,
    SACConvTranspose,
    SACState,
    degree_of_anisotropy,
    inflate_2d_weight,
    sac_interpolate,
)

D64 = torch.float64


def _conv(k: int, s: int, cin: int = 2, cout: int = 3, **kw: object) -> SACConv:
    torch.manual_seed(k * 10 + s)
    return SACConv(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, **kw).to(D64)


# ---------------------------------------------------------------- degree of anisotropy and state


@pytest.mark.parametrize(
    ("spacing", "da"),
    [
        ((0.8, 0.8, 6.5), 3),  # 6.5 / 0.8 = 8.1 -> floor(log2) = 3
        ((0.6, 0.6, 1.0), 0),
        ((1.0, 1.0, 1.99), 0),
        ((1.0, 1.0, 2.0), 1),
        ((0.5, 1.0, 1.0), 1),  # the finer in-plane spacing counts
        ((1.0, 1.0, 0.3), 0),  # finer slices than in-plane: clipped at 0
        ((0.1, 0.1, 100.0), 5),  # 1000x: clipped at max_da
        ((0.7, 0.7), 5),  # a 2D image is "2D"
    ],
)
def test_degree_of_anisotropy_from_spacing(spacing: tuple[float, ...], da: int) -> None:
    assert degree_of_anisotropy(spacing) == da


def test_degree_of_anisotropy_max_da_and_errors() -> None:
    assert degree_of_anisotropy((0.7, 0.7), max_da=3) == 3
    assert degree_of_anisotropy((0.1, 0.1, 100.0), max_da=4) == 4
    for bad in [(1.0, 1.0, 0.0), (1.0, float("nan"), 1.0), (1.0, 1.0, -2.0), (1.0,), (1.0, 1.0, 1.0, 1.0)]:
        with pytest.raises(ValueError, match="spacing"):
            degree_of_anisotropy(bad)


def test_state_bookkeeping() -> None:
    s = SACState(da=3)
    assert (s.n, s.pending, s.up_remaining) == (0, 3, 0)
    assert SACState(da=3, n=5).pending == 0 and SACState(da=3, n=5).up_remaining == 2
    assert s.advance(2) == SACState(3, 2) and s.advance(2).pending == 1
    with pytest.raises(AttributeError):
        s.n = 1  # type: ignore[misc]  # frozen
    for da, n in [(-1, 0), (0, -1), (1.5, 0)]:
        with pytest.raises(ValueError, match="SACState"):
            SACState(da, n)  # type: ignore[arg-type]

    conv, x = _conv(4, 4), torch.randn(1, 2, 8, 8, 6, dtype=D64)
    y, s2 = conv(x, SACState(da=1))  # m = 2, p = 1: depth stride 2
    assert s2 == SACState(1, 2) and y.shape == (1, 3, 2, 2, 3)
    y, s3 = _conv(2, 2, cin=3)(y, s2)  # p = 0: a plain 3D conv
    assert s3 == SACState(1, 3) and y.shape == (1, 3, 1, 1, 1)
    y, s3b = _conv(3, 1, cin=3)(y, s3)
    assert s3b == s3 and y.shape == (1, 3, 1, 1, 1)


# ---------------------------------------------------------------- invariant 1: DA = 0 is the plain conv


@pytest.mark.parametrize(("k", "s", "pad"), [(2, 2, 0), (4, 4, 0), (4, 4, 1), (3, 1, 1), (1, 1, 0)])
@pytest.mark.parametrize("n", [0, 2])
def test_da0_equals_plain_conv_bitwise(k: int, s: int, pad: int, n: int) -> None:
    conv = _conv(k, s, padding=pad)
    x = torch.randn(2, 2, 9, 11, 10, dtype=D64)
    y, state = conv(x, SACState(0, n))
    assert torch.equal(y, F.conv3d(x, conv.weight, conv.bias, stride=s, padding=pad))
    assert state.n == n + int(math.log2(s))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_da0_transposed_equals_plain_conv_transpose_bitwise(k: int) -> None:
    torch.manual_seed(k)
    tconv = SACConvTranspose(in_channels=3, out_channels=2, kernel_size=k, stride=k).to(D64)
    x = torch.randn(2, 3, 3, 5, 4, dtype=D64)
    m = int(math.log2(k))
    y, state = tconv(x, SACState(0, m + 1))
    assert torch.equal(y, F.conv_transpose3d(x, tconv.weight, tconv.bias, stride=k))
    assert state == SACState(0, 1) and y.shape == (2, 2, 3 * k, 5 * k, 4 * k)


# ---------------------------------------------------------------- invariant 2: repeat equivalence


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("a", [0, 1, 2, 3])
def test_repeat_equivalence(m: int, a: int) -> None:
    k = 2**m
    conv = _conv(k, k)
    depth_stride = max(k >> a, 1)
    depth = 3 * depth_stride  # three output slices
    x = torch.randn(1, 2, 2 * k + 1, 3 * k - 1, depth, dtype=D64)  # uneven in-plane: the floor drops the rest
    x_iso = x.repeat_interleave(2**a, dim=-1)
    ref = F.conv3d(x_iso, conv.weight, conv.bias, stride=k)
    if m <= a:
        ref = ref[..., :: 2 ** (a - m)]
    y, state = conv(x, SACState(a))
    assert y.shape == ref.shape == (1, 3, 2, 2, 3)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert state == SACState(a, m)


def test_repeat_equivalence_through_two_layers() -> None:
    """k = s = 4 then k = s = 2 at DA 2 equals the two plain convs on the isotropic repeat (the second layer sees a
    volume that the first made isotropic)."""
    c1, c2 = _conv(4, 4), _conv(2, 2, cin=3)
    x = torch.randn(1, 2, 16, 16, 6, dtype=D64)
    y, state = c2(*c1(x, SACState(2)))
    x_iso = x.repeat_interleave(4, dim=-1)
    ref = F.conv3d(F.conv3d(x_iso, c1.weight, c1.bias, stride=4), c2.weight, c2.bias, stride=2)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert state == SACState(2, 3) and y.shape == (1, 3, 2, 2, 3)


# ---------------------------------------------------------------- invariant 3: the 3^3 collapse


@pytest.mark.parametrize("state", [SACState(1), SACState(5), SACState(4, 3)])
def test_3cubed_collapse(state: SACState) -> None:
    conv = _conv(3, 1)
    x = torch.randn(2, 2, 17, 18, 5, dtype=D64)
    y, out_state = conv(x, state)
    assert torch.equal(y, F.conv3d(x, conv.weight.sum(-1, keepdim=True), conv.bias, padding=(1, 1, 0)))
    assert out_state == state and y.shape == (2, 3, 17, 18, 5)


def test_3cubed_collapse_matches_repeats_away_from_slice_boundaries() -> None:
    conv = _conv(3, 1)
    x = torch.randn(1, 2, 7, 9, 4, dtype=D64)
    iso = F.conv3d(x.repeat_interleave(4, dim=-1), conv.weight, conv.bias, padding=1)
    y, _ = conv(x, SACState(2))
    # iso slice 4j + 1 has both depth neighbours inside slice j's block of repeats.
    torch.testing.assert_close(y, iso[..., 1::4], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, iso[..., 0::4])  # at a block boundary the 3D conv sees the neighbour slice


def test_adapted_kernel_gradient_is_shared_by_summed_taps() -> None:
    conv = _conv(4, 4)
    x = torch.randn(1, 2, 8, 8, 4, dtype=D64)
    y, _ = conv(x, SACState(1))  # depth stride 2: taps (0, 1) and (2, 3) summed
    y.square().sum().backward()
    g = conv.weight.grad
    assert g is not None
    torch.testing.assert_close(g[..., 0], g[..., 1], rtol=0, atol=0)
    torch.testing.assert_close(g[..., 2], g[..., 3], rtol=0, atol=0)
    assert not torch.allclose(g[..., 0], g[..., 2])


# ---------------------------------------------------------------- transposed conv and interpolation


@pytest.mark.parametrize(
    ("k", "state", "depth_scale", "n_after"),
    [(2, SACState(2, 4), 2, 3), (4, SACState(2, 3), 2, 1), (4, SACState(0, 4), 4, 2), (4, SACState(5, 4), 1, 2)],
)
def test_transposed_depth_stride(k: int, state: SACState, depth_scale: int, n_after: int) -> None:
    torch.manual_seed(0)
    tconv = SACConvTranspose(in_channels=3, out_channels=2, kernel_size=k, stride=k).to(D64)
    x = torch.randn(1, 3, 3, 2, 5, dtype=D64)
    y, out = tconv(x, state)
    assert y.shape == (1, 2, 3 * k, 2 * k, 5 * depth_scale) and out.n == n_after
    w = tconv.weight.unflatten(-1, (depth_scale, k // depth_scale)).sum(-1)
    assert torch.equal(y, F.conv_transpose3d(x, w, tconv.bias, stride=(k, k, depth_scale)))


@pytest.mark.parametrize("mode", ["area", "trilinear", "nearest-exact"])
def test_interpolate_depth_only_when_isotropic(mode: str) -> None:
    x = torch.randn(1, 2, 9, 8, 6, dtype=D64)
    y, s = sac_interpolate(x, SACState(2, 1), scale_factor=0.5, mode=mode)  # p = 1: in-plane only
    assert y.shape == (1, 2, 4, 4, 6) and s == SACState(2, 2)
    y, s = sac_interpolate(x, SACState(2, 2), scale_factor=0.5, mode=mode)  # p = 0: depth too
    assert y.shape == (1, 2, 4, 4, 3) and s == SACState(2, 3)
    y, s = sac_interpolate(x, SACState(2, 3), scale_factor=2, mode=mode)  # u = 1: depth too
    assert y.shape == (1, 2, 18, 16, 12) and s == SACState(2, 2)
    y, s = sac_interpolate(x, SACState(2, 2), scale_factor=2, mode=mode)  # u = 0: in-plane only
    assert y.shape == (1, 2, 18, 16, 6) and s == SACState(2, 1)


def test_interpolate_values() -> None:
    x = torch.randn(1, 1, 4, 4, 3, dtype=D64)
    y, _ = sac_interpolate(x, SACState(1), scale_factor=0.5, mode="area")  # in-plane 2x2 means, depth kept
    torch.testing.assert_close(y, F.avg_pool3d(x, (2, 2, 1)))
    up, _ = sac_interpolate(x, SACState(0, 1), scale_factor=2, mode="nearest-exact")
    assert torch.equal(up, x.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4))


# ---------------------------------------------------------------- invariant 11: 2D weight inflation


def test_inflate_average_on_depth_constant_volume_reproduces_2d_conv() -> None:
    torch.manual_seed(0)
    w2d, b = torch.randn(3, 2, 3, 3, dtype=D64), torch.randn(3, dtype=D64)
    x2d = torch.randn(2, 2, 17, 18, dtype=D64)
    ref = F.conv2d(x2d, w2d, b, padding=1)
    w3d = inflate_2d_weight(w2d, 3, "average")
    assert w3d.shape == (3, 2, 3, 3, 3)
    vol = x2d.unsqueeze(-1).expand(-1, -1, -1, -1, 5)
    y = F.conv3d(vol, w3d, b, padding=(1, 1, 0))
    for z in range(y.shape[-1]):
        torch.testing.assert_close(y[..., z], ref, rtol=1e-12, atol=1e-12)
    # The same through a SAC patch embedding (k = s = 4) at DA 0.
    conv = _conv(4, 4)
    w4 = torch.randn(3, 2, 4, 4, dtype=D64)
    with torch.no_grad():
        conv.weight.copy_(inflate_2d_weight(w4, 4))
    y, _ = conv(x2d.unsqueeze(-1).expand(-1, -1, -1, -1, 8), SACState(0))
    ref4 = F.conv2d(x2d, w4, conv.bias, stride=4)
    torch.testing.assert_close(y, ref4.unsqueeze(-1).expand_as(y), rtol=1e-12, atol=1e-12)


def test_inflate_center_reproduces_2d_conv_per_slice() -> None:
    torch.manual_seed(1)
    w2d = torch.randn(3, 2, 3, 3, dtype=D64)
    w3d = inflate_2d_weight(w2d, 3, "center")
    assert torch.equal(w3d[..., 1], w2d) and not w3d[..., 0].any() and not w3d[..., 2].any()
    vol = torch.randn(1, 2, 7, 9, 4, dtype=D64)  # not depth-constant
    y = F.conv3d(vol, w3d, padding=1)
    for z in range(4):
        torch.testing.assert_close(y[..., z], F.conv2d(vol[..., z], w2d, padding=1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="'average' or 'center'"):
        inflate_2d_weight(w2d, 3, "middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"2D kernel \(O, I, kx, ky\)"):
        inflate_2d_weight(w3d, 3)


# ---------------------------------------------------------------- odd sizes, 2D images and errors


def test_odd_in_plane_sizes_floor_like_conv3d() -> None:
    conv = _conv(2, 2)
    x = torch.randn(1, 2, 17, 19, 4, dtype=D64)
    y, _ = conv(x, SACState(3))
    assert y.shape == (1, 3, 8, 9, 4)
    ref = F.conv3d(x[:, :, :16, :18], conv.weight.sum(-1, keepdim=True), conv.bias, stride=(2, 2, 1))
    assert torch.equal(y, ref)


def test_2d_image_as_one_slice_volume() -> None:
    conv = _conv(4, 4)
    x2d = torch.randn(2, 2, 16, 12, dtype=D64)
    y, state = conv(x2d.unsqueeze(-1), SACState(degree_of_anisotropy((0.5, 0.5))))
    assert y.shape == (2, 3, 4, 3, 1) and state == SACState(5, 2)
    torch.testing.assert_close(y[..., 0], F.conv2d(x2d, conv.weight.sum(-1), conv.bias, stride=4))


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="power of 2"):
        SACConv(in_channels=1, out_channels=1, kernel_size=6, stride=6)
    with pytest.raises(ValueError, match="kernel_size == stride"):
        SACConv(in_channels=1, out_channels=1, kernel_size=3, stride=2)
    with pytest.raises(ValueError, match="power of 2"):
        SACConvTranspose(in_channels=1, out_channels=1, kernel_size=3, stride=3)
    with pytest.raises(ValueError, match="kernel_size == stride"):
        SACConvTranspose(in_channels=1, out_channels=1, kernel_size=4, stride=2)
    conv = SACConv(in_channels=2, out_channels=3, kernel_size=2, stride=2)
    with pytest.raises(ValueError, match=r"one-slice volume \(B, C, X, Y, 1\)"):
        conv(torch.randn(1, 2, 8, 8), SACState(5))
    with pytest.raises(ValueError, match="expects 2 input channels"):
        conv(torch.randn(1, 4, 8, 8, 1), SACState(5))
    tconv = SACConvTranspose(in_channels=2, out_channels=1, kernel_size=4, stride=4)
    with pytest.raises(ValueError, match="needs n >= 2"):
        tconv(torch.randn(1, 2, 2, 2, 2), SACState(0, 1))
    with pytest.raises(ValueError, match="0.5 or 2"):
        sac_interpolate(torch.randn(1, 1, 4, 4, 4), SACState(0), scale_factor=3)
    with pytest.raises(ValueError, match="past the input resolution"):
        sac_interpolate(torch.randn(1, 1, 4, 4, 4), SACState(0), scale_factor=2)
    with pytest.raises(ValueError, match="mode"):
        sac_interpolate(torch.randn(1, 1, 4, 4, 4), SACState(0), scale_factor=0.5, mode="bicubic")  # type: ignore
