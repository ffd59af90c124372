"""Seeded, reproducible disturbances of binary labels: synthetic candidate labels of known quality.

DeepSTAPLE's experiment I (Weihsbach et al., WBIR 2022) trains data parameters on artificially disturbed labels
and checks that the learned θ ranks them by their true Dice. Following the "sampler + deterministic function"
rule, :func:`sample_disturbance` draws the parameters of one disturbance (a :class:`LabelDisturbance`, loggable
and JSON-serialisable) and :func:`apply_disturbance` applies them without any randomness, so every noisy label
can be regenerated from its parameters. :func:`disturb_label` does both for ``count`` labels and reports each
one's Dice against the clean mask.

Kinds (2D and 3D share the code): ``elastic`` (smooth random displacement field), ``morph`` (dilation or erosion),
``shift`` (translation, zero fill), ``flip_roll`` (mirror along one axis then roll, a failed registration) and
``empty`` (no foreground, the case the risk regulariser exists for).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from medmodal.evaluation.metrics import binary_dice

#: Disturbance kinds :func:`sample_disturbance` can draw.
DISTURBANCE_KINDS: tuple[str, ...] = ("elastic", "morph", "shift", "flip_roll", "empty")


@dataclass(frozen=True)
class LabelDisturbance:
    """Parameters of one deterministic disturbance (see :func:`apply_disturbance`).

    Attributes:
        kind: ``"none"`` or one of :data:`DISTURBANCE_KINDS`.
        severity: the sampled severity in ``[0, 1]`` the parameters were derived from (for reports).
        radius: ``morph``: dilation radius in voxels (negative: erosion).
        offset: ``shift`` and ``flip_roll``: voxels per axis.
        axis: ``flip_roll``: the mirrored axis.
        magnitude: ``elastic``: largest displacement in voxels.
        smoothness: ``elastic``: Gaussian sigma (voxels) of the displacement field.
        seed: ``elastic``: seed of the displacement field.
    """

    kind: str = "none"
    severity: float = 0.0
    radius: int = 0
    offset: tuple[int, ...] = field(default_factory=tuple)
    axis: int = 0
    magnitude: float = 0.0
    smoothness: float = 1.0
    seed: int = 0

    def describe(self) -> str:
        """A short human-readable form, e.g. ``"shift (3, -1)"``."""
        if self.kind == "morph":
            return f"{'dilate' if self.radius > 0 else 'erode'} {abs(self.radius)}"
        if self.kind == "shift":
            return f"shift {tuple(self.offset)}"
        if self.kind == "flip_roll":
            return f"flip axis {self.axis}, roll {tuple(self.offset)}"
        if self.kind == "elastic":
            return f"elastic {self.magnitude:.1f} vox (sigma {self.smoothness:.1f})"
        return self.kind

    def to_dict(self) -> dict:
        d = asdict(self)
        d["offset"] = list(self.offset)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LabelDisturbance:
        return cls(**{**d, "offset": tuple(int(x) for x in d.get("offset", ()))})


def _ball(radius: int, dims: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * dims) - radius
    return (grid**2).sum(0) <= radius**2


def morph(mask: np.ndarray, *, radius: int) -> np.ndarray:
    """Dilate (``radius > 0``) or erode (``radius < 0``) a binary mask with a ball of ``|radius|`` voxels."""
    mask = np.asarray(mask, bool)
    if radius == 0:
        return mask.copy()
    ball = _ball(abs(radius), mask.ndim)
    if radius > 0:
        return ndimage.binary_dilation(mask, structure=ball)
    return ndimage.binary_erosion(mask, structure=ball, border_value=0)


def shift(mask: np.ndarray, *, offset: Sequence[int]) -> np.ndarray:
    """Translate a binary mask by whole voxels; what leaves the grid is lost, what enters is background."""
    mask = np.asarray(mask, bool)
    if len(offset) != mask.ndim:
        raise ValueError(f"offset {tuple(offset)} must have one entry per axis of a {mask.ndim}D mask")
    out = np.zeros_like(mask)
    src, dst = [], []
    for o, n in zip(offset, mask.shape, strict=True):
        o = int(o)
        src.append(slice(max(0, -o), min(n, n - o)) if abs(o) < n else slice(0, 0))
        dst.append(slice(max(0, o), min(n, n + o)) if abs(o) < n else slice(0, 0))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def flip_roll(mask: np.ndarray, *, axis: int, offset: Sequence[int]) -> np.ndarray:
    """Mirror a mask along ``axis`` and roll it (periodically) by ``offset`` voxels per axis."""
    mask = np.asarray(mask, bool)
    if not 0 <= axis < mask.ndim or len(offset) != mask.ndim:
        raise ValueError(f"axis {axis} / offset {tuple(offset)} do not fit a {mask.ndim}D mask")
    return np.roll(np.flip(mask, axis=axis), shift=tuple(int(o) for o in offset), axis=tuple(range(mask.ndim)))


def elastic_warp(mask: np.ndarray, *, magnitude: float, smoothness: float, seed: int) -> np.ndarray:
    """Warp a binary mask with a smooth random displacement field (nearest-neighbour resampling).

    The field is Gaussian-smoothed white noise (sigma ``smoothness`` voxels) per axis, scaled so its largest
    displacement is ``magnitude`` voxels; the same ``seed`` gives the same field.
    """
    mask = np.asarray(mask, bool)
    if magnitude <= 0:
        return mask.copy()
    rng = np.random.default_rng(seed)
    field_ = np.stack([
        ndimage.gaussian_filter(rng.standard_normal(mask.shape), sigma=max(smoothness, 0.5), mode="reflect")
        for _ in range(mask.ndim)
    ])
    peak = float(np.sqrt((field_**2).sum(0)).max())
    field_ *= magnitude / max(peak, 1e-12)
    coords = np.indices(mask.shape, dtype=np.float64) + field_
    out = ndimage.map_coordinates(mask.astype(np.uint8), coords, order=0, mode="constant", cval=0)
    return out.astype(bool)


def apply_disturbance(mask: np.ndarray, disturbance: LabelDisturbance) -> np.ndarray:
    """Apply ``disturbance`` to the binary ``mask (*S)``; deterministic. Returns a new bool array."""
    d = disturbance
    mask = np.asarray(mask, bool)
    if d.kind == "none":
        return mask.copy()
    if d.kind == "empty":
        return np.zeros_like(mask)
    if d.kind == "morph":
        return morph(mask, radius=d.radius)
    if d.kind == "shift":
        return shift(mask, offset=d.offset)
    if d.kind == "flip_roll":
        return flip_roll(mask, axis=d.axis, offset=d.offset)
    if d.kind == "elastic":
        return elastic_warp(mask, magnitude=d.magnitude, smoothness=d.smoothness, seed=d.seed)
    raise ValueError(f"unknown disturbance kind {d.kind!r}; expected none or one of {DISTURBANCE_KINDS}")


def object_radius(mask: np.ndarray) -> float:
    """Radius (voxels) of the ball/disc with as many voxels as the mask's foreground (at least 1)."""
    n, dims = int(np.count_nonzero(mask)), np.asarray(mask).ndim
    r = math.sqrt(n / math.pi) if dims == 2 else (3 * n / (4 * math.pi)) ** (1 / 3)
    return max(1.0, r)


def sample_disturbance(
    rng: np.random.Generator, mask: np.ndarray, *, kinds: Sequence[str] = DISTURBANCE_KINDS,
    max_severity: float = 1.0,
) -> LabelDisturbance:
    """Draw one disturbance for ``mask``: a kind uniformly from ``kinds``, a severity ``s ~ U(0, max_severity)``.

    Displacements scale with the object's radius ``r`` (:func:`object_radius`), so the Dice spread does not depend
    on the resolution: ``shift`` moves by ``1.5 s r`` in a random direction, ``morph`` dilates or erodes by
    ``⌈0.6 s r⌉``, ``elastic`` displaces by up to ``s r`` (sigma ``r / 2``), ``flip_roll`` rolls by up to ``s r``
    per axis after the mirroring.
    """
    unknown = sorted(set(kinds) - set(DISTURBANCE_KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {DISTURBANCE_KINDS}, got {list(kinds)}")
    kind = str(kinds[int(rng.integers(len(kinds)))])
    s = float(rng.uniform(0.0, max_severity))
    dims, r = np.asarray(mask).ndim, object_radius(mask)
    if kind == "shift":
        direction = rng.standard_normal(dims)
        direction /= max(float(np.linalg.norm(direction)), 1e-12)
        offset = tuple(int(round(v)) for v in direction * 1.5 * s * r)
        return LabelDisturbance(kind=kind, severity=s, offset=offset)
    if kind == "morph":
        sign = 1 if rng.random() < 0.5 else -1
        return LabelDisturbance(kind=kind, severity=s, radius=sign * max(1, math.ceil(0.6 * s * r)))
    if kind == "elastic":
        return LabelDisturbance(kind=kind, severity=s, magnitude=s * r, smoothness=max(1.0, r / 2),
                                seed=int(rng.integers(2**31)))
    if kind == "flip_roll":
        limit = int(round(s * r))
        offset = tuple(int(v) for v in rng.integers(-limit, limit + 1, size=dims))
        return LabelDisturbance(kind=kind, severity=s, axis=int(rng.integers(dims)), offset=offset)
    return LabelDisturbance(kind="empty", severity=s)


@dataclass(frozen=True)
class NoisyLabel:
    """A disturbed label with its parameters and its true quality (Dice against the clean mask)."""

    mask: np.ndarray
    disturbance: LabelDisturbance
    dice: float


def label_seed(seed: int, key: str) -> np.random.SeedSequence:
    """A seed sequence for the labels of ``key`` (e.g. a target id) that does not depend on other keys."""
    return np.random.SeedSequence([int(seed), zlib.crc32(key.encode("utf-8"))])


def disturb_label(
    mask: np.ndarray, *, count: int, seed: int | np.random.SeedSequence, kinds: Sequence[str] = DISTURBANCE_KINDS,
    max_severity: float = 1.0,
) -> list[NoisyLabel]:
    """``count`` independently disturbed copies of the binary ``mask (*S)`` with their true Dice.

    The same ``seed`` (an int or a :class:`numpy.random.SeedSequence`, e.g. from :func:`label_seed`) gives the
    same labels.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    clean = np.asarray(mask, bool)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        d = sample_disturbance(rng, clean, kinds=kinds, max_severity=max_severity)
        noisy = apply_disturbance(clean, d)
        out.append(NoisyLabel(mask=noisy, disturbance=d, dice=binary_dice(noisy, clean)))
    return out
