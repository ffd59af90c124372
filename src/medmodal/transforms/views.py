"""Weak and strong views for FixMatch-style pseudo-labelling (MultiMix, spec ``multimix.md`` §2.4), on tensors.

A view is a sampler plus a deterministic function (TorchIO's pattern, like :mod:`medmodal.transforms.augment`):
:meth:`Views.sample` draws a :class:`ViewParams` from a ``torch.Generator`` and :meth:`Views.apply` applies it,
so the same parameters always give the same output and can be logged (:meth:`ViewParams.describe`).

* **Weak** (:func:`weak_views`): a flip of spatial axis 0 (the picture's left–right, images being ``(X, Y)``)
  with probability 0.5, then a random crop back to the input size from the image padded by ``pad`` voxels per
  side (reflect padding; ``pad = round(size / 8)``, 32 at 256 as in the released code).
* **Strong** (:func:`strong_views`): the same with ``pad = max(1, round(size / 64))`` (4 at 256), then
  ``n_ops = 2`` operations drawn uniformly *with replacement* from :data:`OPS`, each applied with probability
  0.5 at a magnitude ``m`` uniform in 1..9 (the released ``RandAugmentMC(n=2, m=10)``: FixMatch's RandAugment
  variant, PIL, without Cutout and without ``Color``, which does nothing to a grayscale image).

Every op takes and returns a ``(C, *S)`` float tensor in the model's [-1, 1] space; the 8-bit ops map it to
``u = (x + 1) / 2`` in [0, 1] (grey level ``255·u``) and back. Magnitude ``m`` scales the op's range linearly
(``m/10`` of the maximum, plus the offset of the released pool); ops marked ± get a random sign. The mapping,
exactly (``s`` = the sign, ``n`` = the image size along the op's axis):

============= ============================================================ =====================================
op            value at magnitude m (m = 1..9)                              effect (``u`` in [0, 1])
============= ============================================================ =====================================
auto_contrast —                                                            per channel ``(u - min) / (max - min)``;
                                                                           a constant channel is unchanged
brightness    factor ``f = 0.05 + 0.09·m`` (0.14..0.86)                    ``u·f`` (darkens only, as released)
contrast      factor ``f = 0.05 + 0.09·m``                                 ``μ + f·(u - μ)``, ``μ`` = channel mean
                                                                           (MONAI ``ScaleIntensityFixedMean``)
equalize      —                                                            PIL's histogram-equalisation LUT on
                                                                           the 256 grey levels, per channel
identity      —                                                            unchanged (exactly)
posterize     bits ``b = 4 + ⌊4·m/10⌋`` (4, 4, 5, 5, 6, 6, 6, 7, 7)        keep the top ``b`` bits of the level
rotate ±      ``s·⌊30·m/10⌋`` = ±3..27 degrees                             rotation about the centre in the
                                                                           (X, Y) plane, + = counter-clockwise
                                                                           on the displayed picture
sharpness     factor ``f = 0.05 + 0.09·m``                                 ``g + f·(u - g)``, ``g`` = PIL's SMOOTH
                                                                           filter (centre 5, neighbours 1, 3^d
                                                                           kernel), border voxels kept: blurs
shear_x ±     ``k = s·0.03·m`` (±0.03..0.27)                               ``out(x, y) = in(x + k·(y - c_y), y)``
shear_y ±     ``k = s·0.03·m``                                             ``out(x, y) = in(x, y + k·(x - c_x))``
solarize      threshold ``t = 256 - ⌊256·m/10⌋`` (231, 205, 180, 154,      ``1 - u`` where ``round(255·u) >= t``
              128, 103, 77, 52, 26)
translate_x ± ``s·⌊0.03·m·n⌋`` voxels along X                              content moves by that many voxels
translate_y ± ``s·⌊0.03·m·n⌋`` voxels along Y                              (toward higher indices when +)
============= ============================================================ =====================================

Choices, stated (differences from the released PIL code in *italics*):

* Geometric ops resample the image *bilinearly* (PIL used nearest) with MONAI's :class:`~monai.transforms.Affine`
  and fill what comes from outside with black (-1, PIL's fill 0) by default (``padding_mode="reflection"`` or
  ``"border"`` are offered); a mask gets the same geometry with nearest interpolation and fills 0.
  *Shears are about the image centre* (PIL shears about the top-left corner, which also shifts the content by
  ``k·c``).
* The crop is done as an index map per axis (no padded copy): ``pad_mode`` ``"reflect"`` (torchvision's reflect:
  the edge voxel is not repeated), ``"symmetric"`` (repeated) or ``"edge"``; any ``pad`` works, also one
  larger than the image. The flip is folded into the same index map (flip first, then crop, as torchvision).
* Brightness, contrast, auto-contrast, solarize and sharpness are computed on floats (PIL rounds to 8 bits);
  posterize and equalize quantise to the 256 grey levels ``round(255·u)``, as PIL, and return those levels.
  ``contrast`` uses the exact channel mean (PIL rounds it to a grey level).
* 3D: flips and crops act per axis (the flip on ``flip_axes``, default axis 0 only; the crop on every axis);
  rotate, shear and translate act in the (X, Y) plane, the same on every Z slice; the intensity ops use the
  whole volume (sharpness a 3×3×3 kernel with centre 5, so weights /31).
* The output is clipped to [-1, 1]. Parameters are drawn in a fixed order from the generator (flips, crop
  offsets, then per op: which, magnitude, sign, applied), all of them always, so the stream of draws does not
  depend on the outcome.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from monai.transforms import Affine, ScaleIntensityFixedMean
from monai.utils import convert_to_tensor

#: the 13 operations of the released pool, in its order (FixMatch's RandAugment without Color and Cutout).
OPS = ("auto_contrast", "brightness", "contrast", "equalize", "identity", "posterize", "rotate", "sharpness",
       "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
#: the ops that move voxels (a mask follows them); they are also the ops that draw a random sign.
GEOMETRIC_OPS = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})
#: the largest magnitude: ``m`` scales an op's range by ``m / MAX_MAGNITUDE`` (the released ``PARAMETER_MAX``).
MAX_MAGNITUDE = 10
PAD_MODES = ("reflect", "symmetric", "edge")
PADDING_MODES = ("constant", "reflection", "border")
_MONAI_PADDING = {"constant": "zeros", "reflection": "reflection", "border": "border"}


class OpDraw(NamedTuple):
    """One drawn operation: its name (in :data:`OPS`), magnitude ``m``, sign (±1; +1 for ops without one) and
    whether the ``op_prob`` coin let it apply."""

    name: str
    magnitude: int
    sign: int
    applied: bool


@dataclass(frozen=True)
class ViewParams:
    """The random draws of one view, enough to replay it with :meth:`Views.apply`.

    Attributes:
        spatial_shape: ``S`` of the image it was drawn for.
        flip_axes: the spatial axes flipped (before the crop).
        pad: padding per spatial axis of the crop.
        crop_offsets: start of the crop per axis in the padded image, in ``[0, 2·pad]``; ``offsets == pad`` (no
            flip) gives the input back.
        ops: the drawn operations in the order they are applied (applied or not).
    """

    spatial_shape: tuple[int, ...]
    flip_axes: tuple[int, ...] = ()
    pad: tuple[int, ...] = ()
    crop_offsets: tuple[int, ...] = ()
    ops: tuple[OpDraw, ...] = ()

    def __post_init__(self) -> None:
        d = len(self.spatial_shape)
        pad = self.pad or (0,) * d
        offsets = self.crop_offsets or pad
        object.__setattr__(self, "pad", tuple(int(p) for p in pad))
        object.__setattr__(self, "crop_offsets", tuple(int(o) for o in offsets))
        object.__setattr__(self, "ops", tuple(OpDraw(*op) for op in self.ops))
        if len(self.pad) != d or len(self.crop_offsets) != d:
            raise ValueError(f"pad {self.pad} and crop_offsets {self.crop_offsets} need {d} entries")
        if any(not 0 <= o <= 2 * p for o, p in zip(self.crop_offsets, self.pad, strict=True)):
            raise ValueError(f"crop_offsets {self.crop_offsets} must lie in [0, 2*pad] for pad {self.pad}")
        if any(not 0 <= a < d for a in self.flip_axes):
            raise ValueError(f"flip_axes {self.flip_axes} must be spatial axes in [0, {d})")
        for op in self.ops:
            if op.name not in OPS:
                raise ValueError(f"unknown op {op.name!r}; expected one of {', '.join(OPS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready values (``ops`` as a list of dicts)."""
        out = asdict(self)
        out["ops"] = [op._asdict() for op in self.ops]
        return out

    def describe(self) -> str:
        """One line for a log, e.g. ``flip 0; shift (+3, -1); rotate m=5 -15° | solarize m=2 t=205 (skipped)``."""
        shift = ", ".join(f"{o - p:+d}" for o, p in zip(self.crop_offsets, self.pad, strict=True))
        parts = [f"flip {','.join(map(str, self.flip_axes)) or 'none'}", f"shift ({shift})"]
        ops = []
        for op in self.ops:
            value = op_value(op.name, op.magnitude, op.sign, self.spatial_shape)
            unit = {"rotate": "°", "translate_x": " vox", "translate_y": " vox"}.get(op.name, "")
            text = f"{op.name} m={op.magnitude}" + ("" if value is None else f" {value:+g}{unit}")
            ops.append(text + ("" if op.applied else " (skipped)"))
        if ops:
            parts.append(" | ".join(ops))
        return "; ".join(parts)


def op_value(name: str, magnitude: int, sign: int = 1, spatial_shape: Sequence[int] | None = None) -> float | None:
    """The parameter an op gets at magnitude ``m`` (the table of the module docstring), or ``None`` for the ops
    without one. Translations need ``spatial_shape`` (voxels = ``⌊0.03·m·n⌋`` of the size ``n`` of the axis)."""
    m = int(magnitude)
    if name in ("auto_contrast", "equalize", "identity"):
        return None
    if name in ("brightness", "contrast", "sharpness"):
        return 0.05 + 0.9 * m / MAX_MAGNITUDE
    if name == "posterize":
        return 4 + 4 * m // MAX_MAGNITUDE
    if name == "solarize":
        return 256 - 256 * m // MAX_MAGNITUDE
    if name == "rotate":
        return sign * (30 * m // MAX_MAGNITUDE)
    if name in ("shear_x", "shear_y"):
        return sign * 0.3 * m / MAX_MAGNITUDE
    if name in ("translate_x", "translate_y"):
        if spatial_shape is None:
            raise ValueError(f"{name} needs the spatial shape")
        n = int(spatial_shape[0 if name == "translate_x" else 1])
        return sign * (3 * m * n // (10 * MAX_MAGNITUDE))
    raise ValueError(f"unknown op {name!r}; expected one of {', '.join(OPS)}")


# ---------------------------------------------------------------------------------------------------------------
# deterministic functions on (C, *S) tensors in [-1, 1]


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    return (image + 1.0) / 2.0


def _from_unit(u: torch.Tensor) -> torch.Tensor:
    return u * 2.0 - 1.0


def _levels(image: torch.Tensor) -> torch.Tensor:
    """The 8-bit grey levels ``round(255·u)`` as int64, clamped to [0, 255]."""
    return torch.round(_to_unit(image) * 255.0).clamp_(0, 255).to(torch.int64)


def _crop_index(n: int, pad: int, offset: int, mode: str) -> torch.Tensor:
    """Indices into an axis of length ``n`` of the crop ``[offset, offset + n)`` of that axis padded by ``pad``."""
    j = torch.arange(n) + (offset - pad)
    if n == 1:
        return torch.zeros_like(j)
    if mode == "edge":
        return j.clamp(0, n - 1)
    if mode == "reflect":  # period 2(n - 1): ... 2 1 | 0 1 2 ... n-1 | n-2 ...
        j = j.remainder(2 * (n - 1))
        return torch.where(j > n - 1, 2 * (n - 1) - j, j)
    j = j.remainder(2 * n)  # symmetric, period 2n: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...
    return torch.where(j >= n, 2 * n - 1 - j, j)


def flip_crop(
    image: torch.Tensor,
    *,
    flip_axes: Sequence[int] = (),
    pad: Sequence[int],
    offsets: Sequence[int],
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """Flip the given spatial axes, pad each axis by ``pad`` and crop ``S`` voxels from ``offsets`` (torchvision's
    ``RandomHorizontalFlip`` + ``RandomCrop(padding=pad)``), as one gather per axis.

    Args:
        image: ``(C, *S)`` of any dtype (images and masks alike; values are only moved).
        flip_axes: spatial axes to flip.
        pad, offsets: per spatial axis; ``offsets[i]`` in ``[0, 2·pad[i]]``, ``offsets == pad`` is no shift.
        pad_mode: ``"reflect"``, ``"symmetric"`` or ``"edge"``.

    Returns:
        ``(C, *S)``, same dtype.
    """
    out = image
    for axis, n in enumerate(image.shape[1:]):
        if int(offsets[axis]) == int(pad[axis]) and axis not in flip_axes:
            continue  # no shift, no flip: the axis is kept as it is
        idx = _crop_index(n, int(pad[axis]), int(offsets[axis]), pad_mode)
        if axis in flip_axes:  # flip, then crop: crop index i of the flipped image is voxel n-1-i of the input
            idx = n - 1 - idx
        out = out.index_select(axis + 1, idx.to(image.device))
    return out


def auto_contrast(image: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to the full range [-1, 1] (PIL ``autocontrast``, cutoff 0); constant channels are
    kept. ``(C, *S)`` -> ``(C, *S)``."""
    flat = image.reshape(image.shape[0], -1)
    lo = flat.amin(1).view(-1, *([1] * (image.ndim - 1)))
    hi = flat.amax(1).view(-1, *([1] * (image.ndim - 1)))
    span = hi - lo
    stretched = (image - lo) / torch.where(span > 0, span, torch.ones_like(span)) * 2.0 - 1.0
    return torch.where(span > 0, stretched, image)


def brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``Brightness``: blend with black, ``u·factor``."""
    return _from_unit(_to_unit(image) * factor)


def contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``Contrast``: blend with the channel mean, ``μ + factor·(u - μ)`` (MONAI ``ScaleIntensityFixedMean``;
    linear, so computed directly in [-1, 1])."""
    out = ScaleIntensityFixedMean(factor=factor - 1.0, fixed_mean=True, channel_wise=True, dtype=None)(image)
    return convert_to_tensor(out, track_meta=False)


def equalize(image: torch.Tensor) -> torch.Tensor:
    """PIL ``equalize`` on the 256 grey levels ``round(255·u)``, per channel, its LUT reproduced exactly: with
    ``step = (N - count of the highest level present) // 255``, level ``i`` -> ``(step // 2 + #voxels below i) //
    step`` clamped to 255; identity when ``step == 0`` or the channel has one level."""
    q = _levels(image).reshape(image.shape[0], -1)
    c, n = q.shape
    hist = torch.zeros(c, 256, dtype=torch.int64, device=q.device).scatter_add_(1, q, torch.ones_like(q))
    last = hist.gather(1, q.amax(1, keepdim=True))
    step = (n - last) // 255
    below = hist.cumsum(1) - hist
    lut = torch.where(step > 0, (step // 2 + below) // step.clamp(min=1), torch.arange(256, device=q.device))
    lut = torch.where((hist > 0).sum(1, keepdim=True) > 1, lut.clamp(max=255), torch.arange(256, device=q.device))
    return _from_unit(lut.gather(1, q).to(image.dtype) / 255.0).reshape(image.shape)


def posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    """PIL ``posterize``: keep the top ``bits`` of the grey level ``round(255·u)``."""
    step = 2 ** (8 - int(bits))
    q = torch.div(_levels(image), step, rounding_mode="floor") * step
    return _from_unit(q.to(image.dtype) / 255.0)


def solarize(image: torch.Tensor, threshold: int) -> torch.Tensor:
    """PIL ``solarize``: invert (``u -> 1 - u``) where the grey level ``round(255·u) >= threshold``."""
    return torch.where(_levels(image) >= threshold, -image, image)


def sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``Sharpness``: ``g + factor·(x - g)`` with ``g`` the SMOOTH filter (a ``3^d`` kernel, centre 5, every
    neighbour 1, normalised) on the interior and the input on the border voxels; ``factor < 1`` blurs."""
    d = image.ndim - 1
    if min(image.shape[1:]) < 3:
        return image
    kernel = torch.ones((3,) * d, dtype=image.dtype, device=image.device)
    kernel[(1,) * d] = 5.0
    kernel = (kernel / kernel.sum()).expand(image.shape[0], 1, *kernel.shape)
    conv = F.conv2d if d == 2 else F.conv3d
    smooth = conv(image[None], kernel, groups=image.shape[0])[0]
    inner = (slice(None),) + (slice(1, -1),) * d
    degenerate = image.clone()
    degenerate[inner] = smooth
    return degenerate + factor * (image - degenerate)


def _affine_xy(
    image: torch.Tensor, matrix: Sequence[Sequence[float]], shift: Sequence[float], *, mode: str, padding_mode: str,
    fill: float,
) -> torch.Tensor:
    """Resample ``(C, *S)`` in the (X, Y) plane: ``out(p) = in(c + A·(p - c) + t)`` about the centre ``c`` (MONAI
    ``Affine``'s convention: the matrix maps output to input coordinates). Other axes are untouched."""
    d = image.ndim - 1
    full = torch.eye(d + 1, dtype=torch.float64)
    full[:2, :2] = torch.as_tensor(matrix, dtype=torch.float64)
    full[:2, d] = torch.as_tensor(shift, dtype=torch.float64)
    if torch.equal(full, torch.eye(d + 1, dtype=torch.float64)):
        return image
    dtype = image.dtype
    work = image.to(torch.float32) - fill if padding_mode == "constant" else image.to(torch.float32)
    affine = Affine(affine=full, mode=mode, padding_mode=_MONAI_PADDING[padding_mode], image_only=True,
                    device=image.device)
    out = convert_to_tensor(affine(work), track_meta=False)
    if padding_mode == "constant":
        out = out + fill
    if dtype.is_floating_point:
        return out.to(dtype)
    return (out > 0.5) if dtype == torch.bool else torch.round(out).to(dtype)


def rotate(image: torch.Tensor, degrees: float, *, mode: str = "bilinear", padding_mode: str = "constant",
           fill: float = -1.0) -> torch.Tensor:
    """Rotate the (X, Y) plane about its centre, ``+`` = counter-clockwise on the displayed picture (X to the
    right, Y down, PIL's ``rotate``): the voxel right of the centre moves above it. ``(C, *S)`` -> ``(C, *S)``."""
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    return _affine_xy(image, [[cos, -sin], [sin, cos]], (0.0, 0.0), mode=mode, padding_mode=padding_mode, fill=fill)


def shear(image: torch.Tensor, factor: float, *, axis: Literal[0, 1], mode: str = "bilinear",
          padding_mode: str = "constant", fill: float = -1.0) -> torch.Tensor:
    """Shear about the centre: axis 0 (X) ``out(x, y) = in(x + k·(y - c_y), y)``, axis 1 (Y) the transpose."""
    matrix = [[1.0, factor], [0.0, 1.0]] if axis == 0 else [[1.0, 0.0], [factor, 1.0]]
    return _affine_xy(image, matrix, (0.0, 0.0), mode=mode, padding_mode=padding_mode, fill=fill)


def translate(image: torch.Tensor, voxels: float, *, axis: Literal[0, 1], mode: str = "bilinear",
              padding_mode: str = "constant", fill: float = -1.0) -> torch.Tensor:
    """Move the content by ``voxels`` along spatial axis 0 (X) or 1 (Y), toward higher indices when positive."""
    shift = (-float(voxels), 0.0) if axis == 0 else (0.0, -float(voxels))
    return _affine_xy(image, [[1.0, 0.0], [0.0, 1.0]], shift, mode=mode, padding_mode=padding_mode, fill=fill)


def apply_op(
    image: torch.Tensor, op: OpDraw, *, mask: torch.Tensor | None = None, interpolation: str = "bilinear",
    padding_mode: str = "constant",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one drawn op (regardless of ``op.applied``) at its magnitude (table of the module docstring).

    Args:
        image: ``(C, *S)`` in [-1, 1].
        op: the op, its magnitude and sign.
        mask: ``(C', *S)`` or ``None``; geometric ops move it too (nearest, fill 0), intensity ops leave it.
        interpolation: of the image for the geometric ops, ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"constant"`` (black, -1), ``"reflection"`` or ``"border"``.

    Returns:
        ``(image, mask)``.
    """
    name = op.name
    value = op_value(name, op.magnitude, op.sign, image.shape[1:])
    if name not in GEOMETRIC_OPS:
        simple = {"auto_contrast": auto_contrast, "equalize": equalize, "identity": lambda x: x}
        if name in simple:
            return simple[name](image), mask
        fn = {"brightness": brightness, "contrast": contrast, "posterize": posterize, "sharpness": sharpness,
              "solarize": solarize}[name]
        return fn(image, value), mask

    def move(x: torch.Tensor, mode: str, fill: float) -> torch.Tensor:
        kw: dict[str, Any] = {"mode": mode, "padding_mode": padding_mode, "fill": fill}
        if name == "rotate":
            return rotate(x, value, **kw)
        if name.startswith("shear"):
            return shear(x, value, axis=0 if name == "shear_x" else 1, **kw)
        return translate(x, value, axis=0 if name == "translate_x" else 1, **kw)

    return move(image, interpolation, -1.0), None if mask is None else move(mask, "nearest", 0.0)


# ---------------------------------------------------------------------------------------------------------------
# sampler


def _per_axis(name: str, value: int | Sequence[int], d: int) -> tuple[int, ...]:
    out = (int(value),) * d if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != d or min(out) < 0:
        raise ValueError(f"{name} must be an int >= 0 or {d} of them, got {value}")
    return out


class Views:
    """Random flip + padded crop + RandAugment-style ops (see the module docstring); sample, then apply.

    Args:
        spatial_dims: 2 or 3.
        pad: crop padding per side, an int or one per spatial axis (0 = no crop).
        pad_mode: ``"reflect"`` (torchvision's, the released code's), ``"symmetric"`` or ``"edge"``.
        flip_prob: probability of flipping each axis in ``flip_axes``, independently.
        flip_axes: the axes that may flip; default ``(0,)``, the picture's left–right.
        n_ops: how many ops to draw from ``ops`` (with replacement); 0 = no ops (the weak view).
        op_prob: probability that each drawn op is applied.
        magnitude_range: ``(lo, hi)``, the magnitude is uniform in ``lo..hi`` inclusive, ``0 <= lo <= hi <= 10``.
        ops: the pool, names from :data:`OPS`.
        interpolation: of the image in the geometric ops, ``"bilinear"`` or ``"nearest"`` (masks: nearest).
        padding_mode: what the geometric ops bring in from outside: ``"constant"`` (black, -1; mask 0, as PIL's
            fill 0), ``"reflection"`` or ``"border"`` (the mask the same way).
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        pad: int | Sequence[int] = 0,
        pad_mode: str = "reflect",
        flip_prob: float = 0.5,
        flip_axes: Sequence[int] = (0,),
        n_ops: int = 0,
        op_prob: float = 0.5,
        magnitude_range: Sequence[int] = (1, 9),
        ops: Sequence[str] = OPS,
        interpolation: str = "bilinear",
        padding_mode: str = "constant",
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.pad = _per_axis("pad", pad, spatial_dims)
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
        self.pad_mode = pad_mode
        for name, p in (("flip_prob", flip_prob), ("op_prob", op_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.flip_prob, self.op_prob = float(flip_prob), float(op_prob)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        if any(not 0 <= a < spatial_dims for a in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise ValueError(f"flip_axes must be distinct spatial axes in [0, {spatial_dims}), got {flip_axes}")
        if n_ops < 0:
            raise ValueError(f"n_ops must be >= 0, got {n_ops}")
        self.n_ops = int(n_ops)
        lo, hi = (int(m) for m in magnitude_range)
        if not 0 <= lo <= hi <= MAX_MAGNITUDE:
            raise ValueError(f"magnitude_range must satisfy 0 <= lo <= hi <= {MAX_MAGNITUDE}, got {magnitude_range}")
        self.magnitude_range = (lo, hi)
        self.ops = tuple(ops)
        unknown = [o for o in self.ops if o not in OPS]
        if unknown or (n_ops > 0 and not self.ops):
            raise ValueError(f"ops must be a non-empty selection of {', '.join(OPS)}; unknown: {unknown}")
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
        self.interpolation, self.padding_mode = interpolation, padding_mode

    def describe(self) -> str:
        """One line for the run log."""
        flips = self.flip_prob > 0 and self.flip_axes
        flip = f"flip axes {self.flip_axes} p={self.flip_prob:g}" if flips else "no flip"
        text = f"{flip}; crop pad {self.pad} ({self.pad_mode})"
        if self.n_ops:
            lo, hi = self.magnitude_range
            pool = "all 13 ops" if set(self.ops) == set(OPS) else ", ".join(self.ops)
            text += (f"; {self.n_ops} ops of {pool}, p={self.op_prob:g} each, magnitude {lo}-{hi}/{MAX_MAGNITUDE}"
                     f" ({self.interpolation}, {self.padding_mode} padding)")
        return text

    def sample(self, generator: torch.Generator | None, spatial_shape: Sequence[int]) -> ViewParams:
        """Draw the parameters of one view of an image of spatial shape ``S`` (CPU generator)."""
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != self.spatial_dims or min(shape) < 1:
            raise ValueError(f"spatial_shape {tuple(spatial_shape)} must have {self.spatial_dims} positive entries")
        flips = torch.rand(len(self.flip_axes), generator=generator) < self.flip_prob
        offsets = tuple(int(torch.randint(0, 2 * p + 1, (1,), generator=generator)) for p in self.pad)
        n, (lo, hi) = self.n_ops, self.magnitude_range
        which = torch.randint(0, len(self.ops), (n,), generator=generator).tolist() if self.ops else []
        mags = torch.randint(lo, hi + 1, (n,), generator=generator).tolist()
        signs = torch.randint(0, 2, (n,), generator=generator).tolist()
        coins = (torch.rand(n, generator=generator) < self.op_prob).tolist()
        ops = tuple(
            OpDraw(self.ops[w], int(m), (1 - 2 * s) if self.ops[w] in GEOMETRIC_OPS else 1, bool(c))
            for w, m, s, c in zip(which, mags, signs, coins, strict=True)
        )
        return ViewParams(spatial_shape=shape, flip_axes=tuple(a for a, f in zip(self.flip_axes, flips.tolist(),
                          strict=True) if f), pad=self.pad, crop_offsets=offsets, ops=ops)

    def apply(
        self, image: torch.Tensor, params: ViewParams, *, mask: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Apply drawn parameters (a pure function of ``image``, ``params`` and the settings).

        Args:
            image: ``(C, *S)`` float in [-1, 1].
            params: from :meth:`sample` for this ``S``.
            mask: ``(*S)`` or ``(C', *S)`` of any dtype (e.g. a label map), or ``None``; it gets the flip, the
                crop and the geometric ops (nearest, fill 0 or the same reflection), never the intensity ops.

        Returns:
            ``(C, *S)`` in [-1, 1] (clipped), or ``(image, mask)`` with the mask's shape and dtype when one is
            given.
        """
        d = self.spatial_dims
        if image.ndim != d + 1 or not image.is_floating_point():
            raise ValueError(f"expected a float image (C, *S) with {d} spatial axes, got {tuple(image.shape)} "
                             f"{image.dtype}")
        if tuple(image.shape[1:]) != params.spatial_shape:
            raise ValueError(f"the parameters were drawn for {params.spatial_shape}, the image is "
                             f"{tuple(image.shape[1:])}")
        squeeze = mask is not None and mask.ndim == d
        m = None if mask is None else (mask[None] if squeeze else mask)
        if m is not None and tuple(m.shape[1:]) != params.spatial_shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match the image {tuple(image.shape)}")
        geometry = {"pad": params.pad, "offsets": params.crop_offsets, "flip_axes": params.flip_axes,
                    "pad_mode": self.pad_mode}
        out = flip_crop(image, **geometry)
        m = None if m is None else flip_crop(m, **geometry)
        for op in params.ops:
            if op.applied:
                out, m = apply_op(out, op, mask=m, interpolation=self.interpolation, padding_mode=self.padding_mode)
        out = torch.nan_to_num(out, nan=0.0).clamp(-1.0, 1.0)
        if m is None:
            return out
        return out, (m[0] if squeeze else m)

    def __call__(
        self, image: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ViewParams] | tuple[torch.Tensor, ViewParams, torch.Tensor]:
        """Sample and apply: ``(image, params)``, or ``(image, params, mask)`` when a mask is given."""
        params = self.sample(generator, image.shape[1:])
        if mask is None:
            return self.apply(image, params), params
        out, m = self.apply(image, params, mask=mask)
        return out, params, m


def _sizes(size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    sizes = (int(size),) * spatial_dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(sizes) != spatial_dims or min(sizes) < 1:
        raise ValueError(f"size must be a positive int or {spatial_dims} of them, got {size}")
    return sizes


def weak_views(*, spatial_dims: int, size: int | Sequence[int]) -> Views:
    """The weak view of MultiMix/FixMatch: flip of axis 0 (p 0.5) and a reflect-padded random crop with
    ``pad = round(size / 8)`` per axis (32 at 256, the released ``int(256*0.125)``)."""
    return Views(spatial_dims=spatial_dims, pad=tuple((s + 4) // 8 for s in _sizes(size, spatial_dims)))


def strong_views(*, spatial_dims: int, size: int | Sequence[int]) -> Views:
    """The strong view: flip of axis 0 (p 0.5), reflect-padded crop with ``pad = max(1, round(size / 64))`` (4 at
    256, the released ``int(32*0.125)``), then 2 of the 13 :data:`OPS`, each with p 0.5, magnitude 1..9."""
    pad = tuple(max(1, (s + 32) // 64) for s in _sizes(size, spatial_dims))
    return Views(spatial_dims=spatial_dims, pad=pad, n_ops=2, op_prob=0.5, magnitude_range=(1, 9), ops=OPS)
