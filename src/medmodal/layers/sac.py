"""Spatially adaptive convolutions (SAC) of PUMIT (Luo et al., *Pre-trained Universal Medical Image Transformer*,
arXiv 2312.07630; ``shared/methods/pumit.md`` §2.1–2.2, the normative rules taken from the official code).

A volume is ``(B, C, X, Y, Z)`` with the thick slice axis LAST (``Z``); a 2D image ``(B, C, X, Y)`` is the one-slice
volume ``(B, C, X, Y, 1)`` (callers reshape). Conv weights are ``(O, I, kx, ky, kz)``; "summing the depth taps"
sums over the last kernel axis.

While a volume is anisotropic (its degree of anisotropy, DA, exceeds the number ``n`` of 2x downsamplings applied so
far) the layers downsample in-plane only: a downsampling conv with ``k = s = 2^m`` gets the depth stride
``d_s = max(2^m >> p, 1)`` with ``p = max(DA - n, 0)`` pending in-plane-only downsamplings, its depth taps are summed
in contiguous groups of ``k / d_s`` and its depth padding dropped; a ``3^3`` stride-1 conv sums all of its depth taps.
This is exactly a plain conv on the volume made isotropic by repeating every slice ``2^DA`` times, computed without
the repeats (spec §2.2 "Why summing", invariant 2). With ``DA = 0`` every layer is the plain
:func:`torch.nn.functional.conv3d` / :func:`~torch.nn.functional.conv_transpose3d` (invariant 1).

The state ``(DA, n)`` travels explicitly next to the tensor as a frozen :class:`SACState`: ``y, state = layer(x,
state)``. There is no tensor subclass (the official one breaks gradient checkpointing and ``torch.compile``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# one definition of the degree of anisotropy and of a 2D image's DA, in the data layer (collections use them)
from medmodal.data.collections import MAX_DA, degree_of_anisotropy

__all__ = [
    "MAX_DA",
    "SACConv",
    "SACConvTranspose",
    "SACState",
    "degree_of_anisotropy",
    "inflate_2d_weight",
    "sac_interpolate",
]

InterpolationMode = Literal["area", "trilinear", "nearest-exact"]
InflationMode = Literal["average", "center"]


@dataclass(frozen=True)
class SACState:
    """The anisotropy state carried through a SAC network (spec §2.1).

    Attributes:
        da: the degree of anisotropy of the input, fixed per input (``>= 0``).
        n: the number of 2x downsamplings applied so far (``>= 0``).
    """

    da: int
    n: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.da, int) and isinstance(self.n, int)) or self.da < 0 or self.n < 0:
            raise ValueError(f"SACState needs integers da >= 0 and n >= 0, got da={self.da!r}, n={self.n!r}")

    @property
    def pending(self) -> int:
        """``p = max(da - n, 0)``: in-plane-only downsamplings still to come."""
        return max(self.da - self.n, 0)

    @property
    def up_remaining(self) -> int:
        """``u = max(n - da, 0)``: depth upsamplings still to come on the way back."""
        return max(self.n - self.da, 0)

    def advance(self, m: int) -> SACState:
        """The state after ``m`` 2x downsamplings (``m < 0``: upsamplings)."""
        return replace(self, n=self.n + m)


def _log2_exact(k: int, what: str) -> int:
    if k < 1 or k & (k - 1):
        raise ValueError(f"{what} must be a power of 2 (k = s = 2^m), got {k}")
    return k.bit_length() - 1


def _group_depth_taps(weight: torch.Tensor, depth_len: int) -> torch.Tensor:
    """Sum the last (depth) kernel axis of ``weight`` in contiguous groups so that its length becomes ``depth_len``."""
    k = weight.shape[-1]
    if depth_len == k:
        return weight
    return weight.unflatten(-1, (depth_len, k // depth_len)).sum(-1)


def _check_input(x: torch.Tensor, channels: int | None, name: str) -> None:
    if x.ndim != 5:
        raise ValueError(
            f"{name} expects a volume (B, C, X, Y, Z) with the slice axis last, got {x.ndim}D shape {tuple(x.shape)}; "
            "reshape a 2D image (B, C, X, Y) to the one-slice volume (B, C, X, Y, 1)"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} expects {channels} input channels, got shape {tuple(x.shape)}")


class SACConv(nn.Module):
    """A spatially adaptive 3D convolution (spec §2.2).

    Two kinds, chosen by ``kernel_size`` and ``stride``:

    * **downsampling**, ``kernel_size == stride == 2^m``: in-plane stride ``2^m``; depth stride
      ``d_s = max(2^m >> p, 1)``; when adapted (``p > 0``) the depth padding is 0 and the depth taps are summed in
      contiguous groups of ``k / d_s`` (all of them when ``d_s = 1``). Then ``n <- n + m``.
    * **same-size**, ``stride == 1`` and odd ``kernel_size`` (the spec's ``3^3``): if ``p > 0`` all depth taps are
      summed (a ``k x k x 1`` kernel, depth padding 0); otherwise a plain conv. ``n`` is unchanged.

    The summed kernel is computed from the parameter at every call (no repeated input is materialised), so the
    parameter always has the full ``(out_channels, in_channels, k, k, k)`` shape and loads 3D checkpoints as is.

    Args:
        in_channels: ``I``.
        out_channels: ``O``.
        kernel_size: ``k`` (isotropic).
        stride: ``s`` (isotropic), ``k`` or 1.
        padding: isotropic zero padding; default 0 for downsampling and ``k // 2`` for the same-size kind. The depth
            padding is dropped whenever the depth taps are summed.
        bias: learn an additive bias.

    Shapes: ``x (B, I, X, Y, Z)`` -> ``(B, O, X', Y', Z')`` with ``X' = floor((X + 2 pad - k) / s) + 1`` in-plane.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if stride == 1 and kernel_size % 2 == 1:
            self.m = 0
            self.downsampling = kernel_size == 1
        elif kernel_size == stride:
            self.m = _log2_exact(kernel_size, "SACConv kernel_size (= stride)")
            self.downsampling = True
        else:
            raise ValueError(
                f"SACConv supports kernel_size == stride == 2^m (downsampling) or an odd kernel_size with stride 1, "
                f"got kernel_size={kernel_size}, stride={stride}"
            )
        if padding is None:
            padding = 0 if self.downsampling else kernel_size // 2
        if padding < 0:
            raise ValueError(f"SACConv padding must be >= 0, got {padding}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        # nn.Conv3d only for its parameters and their default (Kaiming-uniform) initialisation.
        conv = nn.Conv3d(in_channels, out_channels, kernel_size, bias=bias)
        self.weight = conv.weight
        self.bias = conv.bias

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )

    def adapted(self, state: SACState) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
        """The effective ``(weight, stride, padding)`` of this layer in ``state`` (the weight summed over depth
        groups when adapted)."""
        s, pad, p = self.stride, self.padding, state.pending
        if p == 0:
            return self.weight, (s, s, s), (pad, pad, pad)
        depth_stride = max(s >> p, 1) if self.downsampling else 1
        depth_len = depth_stride if self.downsampling else 1
        return _group_depth_taps(self.weight, depth_len), (s, s, depth_stride), (pad, pad, 0)

    def forward(self, x: torch.Tensor, state: SACState) -> tuple[torch.Tensor, SACState]:
        """``x (B, I, X, Y, Z)`` in ``state`` -> ``(y (B, O, X', Y', Z'), state with n + m)``."""
        _check_input(x, self.in_channels, "SACConv")
        weight, stride, padding = self.adapted(state)
        return F.conv3d(x, weight, self.bias, stride=stride, padding=padding), state.advance(self.m)


class SACConvTranspose(nn.Module):
    """A spatially adaptive 3D transposed convolution with ``kernel_size == stride == 2^m`` (spec §2.2).

    In-plane stride ``2^m``; depth stride ``min(2^u, 2^m)`` with ``u = max(n - DA, 0)`` depth upsamplings remaining;
    the depth taps summed in contiguous groups as in :class:`SACConv`. Then ``n <- n - m``.

    The parameter has :class:`torch.nn.ConvTranspose3d`'s shape ``(in_channels, out_channels, k, k, k)``.

    Args:
        in_channels: ``I``.
        out_channels: ``O``.
        kernel_size: ``k = 2^m``.
        stride: ``s = k``.
        bias: learn an additive bias.

    Shapes: ``x (B, I, X, Y, Z)`` -> ``(B, O, 2^m X, 2^m Y, d_s Z)``.

    Raises (at call time) ValueError when ``n < m``: the layer would upsample past the input resolution.
    """

    def __init__(
        self, *, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool = True
    ) -> None:
        super().__init__()
        if kernel_size != stride:
            raise ValueError(f"SACConvTranspose needs kernel_size == stride == 2^m, got {kernel_size} and {stride}")
        self.m = _log2_exact(kernel_size, "SACConvTranspose kernel_size (= stride)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        self.weight = conv.weight
        self.bias = conv.bias

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor, state: SACState) -> tuple[torch.Tensor, SACState]:
        """``x (B, I, X, Y, Z)`` in ``state`` -> ``(y (B, O, X', Y', Z'), state with n - m)``."""
        _check_input(x, self.in_channels, "SACConvTranspose")
        if state.n < self.m:
            raise ValueError(
                f"SACConvTranspose with stride {self.stride} needs n >= {self.m} downsamplings to undo, got {state}"
            )
        s = self.stride
        depth_stride = min(1 << state.up_remaining, s)
        weight = _group_depth_taps(self.weight, depth_stride)
        y = F.conv_transpose3d(x, weight, self.bias, stride=(s, s, depth_stride))
        return y, state.advance(-self.m)


def sac_interpolate(
    x: torch.Tensor, state: SACState, *, scale_factor: float, mode: InterpolationMode = "trilinear"
) -> tuple[torch.Tensor, SACState]:
    """Spatially adaptive 2x resampling (spec §2.2, interpolation variants).

    * ``scale_factor=0.5``: halve ``X`` and ``Y`` (floor); halve ``Z`` only if ``p = 0``; ``n <- n + 1``.
    * ``scale_factor=2``: double ``X`` and ``Y``; double ``Z`` only if ``u > 0``; ``n <- n - 1`` (needs ``n >= 1``).

    Args:
        x: ``(B, C, X, Y, Z)``.
        state: the SAC state of ``x``.
        scale_factor: 0.5 or 2.
        mode: ``"area"``, ``"trilinear"`` (``align_corners=False``) or ``"nearest-exact"``.
    """
    _check_input(x, None, "sac_interpolate")
    if mode not in ("area", "trilinear", "nearest-exact"):
        raise ValueError(f"sac_interpolate mode must be 'area', 'trilinear' or 'nearest-exact', got {mode!r}")
    sx, sy, sz = x.shape[2:]
    if scale_factor == 0.5:
        size = (sx // 2, sy // 2, sz // 2 if state.pending == 0 else sz)
        new_state = state.advance(1)
    elif scale_factor == 2:
        if state.n < 1:
            raise ValueError(f"sac_interpolate cannot upsample past the input resolution, got {state}")
        size = (2 * sx, 2 * sy, 2 * sz if state.up_remaining > 0 else sz)
        new_state = state.advance(-1)
    else:
        raise ValueError(f"sac_interpolate scale_factor must be 0.5 or 2, got {scale_factor!r}")
    if min(size) < 1:
        raise ValueError(f"sac_interpolate cannot halve a volume of spatial shape {(sx, sy, sz)}")
    align = False if mode == "trilinear" else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align), new_state


def inflate_2d_weight(w2d: torch.Tensor, depth: int, mode: InflationMode = "average") -> torch.Tensor:
    """Inflate a 2D conv kernel ``(O, I, kx, ky)`` to a 3D one ``(O, I, kx, ky, depth)`` (spec §2.2, [code]).

    * ``"average"``: repeat over depth and divide by ``depth``; on a volume constant along depth the 3D conv (no
      depth padding) reproduces the 2D conv on every slice (invariant 11).
    * ``"center"``: the 2D kernel in slice ``depth // 2``, zeros elsewhere; with depth padding ``depth // 2`` the 3D
      conv reproduces the 2D conv slice by slice on any volume.
    """
    if w2d.ndim != 4:
        raise ValueError(f"inflate_2d_weight expects a 2D kernel (O, I, kx, ky), got shape {tuple(w2d.shape)}")
    if depth < 1:
        raise ValueError(f"inflate_2d_weight depth must be >= 1, got {depth}")
    if mode == "average":
        return w2d.unsqueeze(-1).expand(*w2d.shape, depth) / depth
    if mode == "center":
        w = w2d.new_zeros(*w2d.shape, depth)
        w[..., depth // 2] = w2d
        return w
    raise ValueError(f"inflate_2d_weight mode must be 'average' or 'center', got {mode!r}")
