"""Procedural anatomy and contrasts of the synthetic phantom (private to :mod:`medmodal.data.phantom`).

The phantom is a *continuous* object: every structure is defined analytically in canonical coordinates
``u`` (unitless; the field of view spans ``[-1, 1]`` along its shortest axis) with sums of random
low-frequency sinusoids for deformations, boundaries and bias fields. A grid only *samples* it, so the same
case rendered on an isotropic grid, an anisotropic grid or a single 2D slice shows the same anatomy in
millimetres. All random parameters are drawn up front by :func:`sample_anatomy` in a fixed order; the
renderers are pure functions of those parameters and the coordinates (plus an explicit generator for noise).

Coordinates are passed as a triple of float32 arrays that broadcast to the grid shape, e.g. ``(X, 1, 1)``,
``(1, Y, 1)``, ``(1, 1, Z)`` in 3D or ``(X, 1)``, ``(1, Y)``, ``()`` for an axial 2D slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]

#: Tissues of the rendered tissue map (code = index); the last three are the tumour sub-regions.
TISSUE_NAMES = ("background", "skull", "csf", "grey_matter", "white_matter", "necrosis", "oedema", "enhancing")
BACKGROUND, SKULL, CSF, GREY, WHITE, NECROSIS, OEDEMA, ENHANCING = range(len(TISSUE_NAMES))
#: BraTS label value of each tissue code (1 necrosis / non-enhancing core, 2 oedema, 4 enhancing tumour).
TISSUE_TO_LABEL = np.array([0, 0, 0, 0, 0, 1, 2, 4], dtype=np.uint8)

#: Relative intensity of each tissue code (columns) per modality, before texture, blur, bias and noise.
#: The enhancing rim is bright only on T1c; oedema is brightest on FLAIR/T2; necrosis is dark on T1/T1c,
#: bright on T2 and intermediate on FLAIR; CSF is dark on T1/FLAIR and bright on T2; grey/white matter
#: contrast is inverted between T1 and T2.
CONTRAST: dict[str, tuple[float, ...]] = {
    #        backgr skull  CSF   grey  white  necro  oedema enhancing
    "t1": (0.00, 0.90, 0.20, 0.55, 0.80, 0.25, 0.62, 0.58),
    "t1c": (0.00, 0.90, 0.22, 0.57, 0.80, 0.27, 0.68, 1.40),
    "t2": (0.00, 0.35, 1.00, 0.62, 0.42, 0.95, 0.88, 0.62),
    "flair": (0.00, 0.30, 0.08, 0.62, 0.45, 0.55, 1.00, 0.60),
}

#: Tumour core patterns and their probabilities: rim + central necrosis (the high-grade look), solid
#: enhancement without necrosis, patchy enhancement of a non-enhancing core, no enhancement at all.
PATTERNS: tuple[str, ...] = ("rim_necrosis", "solid", "patchy", "non_enhancing")
_PATTERN_P = (0.5, 0.17, 0.17, 0.16)

# Normalised head radius (rho) of the anatomical shells.
_SKULL_OUT, _SKULL_IN, _BRAIN, _GREY_IN = 1.0, 0.9, 0.84, 0.70
# Maximal relative perturbation of the tumour radii, and the oedema margin always kept around the core.
_OEDEMA_WOBBLE, _CORE_WOBBLE, _OEDEMA_MARGIN = 0.6, 0.3, 1.25


@dataclass(frozen=True)
class SmoothField:
    """A random smooth scalar field ``f(u) = sum_k a_k sin(w_k . u + phi_k) / sum_k |a_k|`` in ``[-1, 1]``.

    Attributes:
        freqs: ``(K, 3)`` angular frequencies in radians per canonical unit.
        phases: ``(K,)`` phases in radians.
        weights: ``(K,)`` amplitudes, normalised so that ``sum |a_k| = 1``.
    """

    freqs: np.ndarray
    phases: np.ndarray
    weights: np.ndarray

    @classmethod
    def sample(cls, rng: np.random.Generator, *, terms: int, low: float, high: float) -> SmoothField:
        """Draw ``terms`` plane waves with random directions and frequencies in ``[low, high]`` rad/unit."""
        directions = rng.standard_normal((terms, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        freqs = directions * rng.uniform(low, high, size=(terms, 1))
        phases = rng.uniform(0.0, 2.0 * np.pi, size=terms)
        weights = rng.uniform(0.5, 1.0, size=terms)
        return cls(freqs=freqs, phases=phases, weights=weights / weights.sum())

    def __call__(self, coords: Coords) -> np.ndarray:
        """Evaluate the field on broadcastable float32 coordinates; returns the broadcast shape, float32."""
        out = np.float32(0.0)
        for (w0, w1, w2), phase, weight in zip(
            self.freqs.tolist(), self.phases.tolist(), self.weights.tolist(), strict=True
        ):
            out = out + weight * np.sin(w0 * coords[0] + w1 * coords[1] + (w2 * coords[2] + phase))
        return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class Tumour:
    """One tumour: nested, noise-perturbed ellipsoids in canonical units.

    Attributes:
        centre: ``(3,)`` canonical centre.
        shape: ``(3, 3)`` matrix mapping an offset from the centre to the tumour's normalised frame
            (rotation and per-axis elongation), so ``r = |shape @ (u - centre)|``.
        r_oedema, r_core, r_necrosis: radii of the whole tumour, the core and the necrosis in that frame.
        pattern: one of :data:`PATTERNS`.
        oedema_edge, core_edge, necrosis_edge: boundary perturbation fields.
        patches: where a ``"patchy"`` core enhances.
    """

    centre: np.ndarray
    shape: np.ndarray
    r_oedema: float
    r_core: float
    r_necrosis: float
    pattern: str
    oedema_edge: SmoothField
    core_edge: SmoothField
    necrosis_edge: SmoothField
    patches: SmoothField


@dataclass(frozen=True)
class Anatomy:
    """All random parameters of one phantom case (see :func:`sample_anatomy`)."""

    head_centre: np.ndarray
    head_radii: np.ndarray
    deformation: tuple[SmoothField, SmoothField, SmoothField]
    deformation_scale: float
    gyri: SmoothField
    ventricle_offset: np.ndarray
    ventricle_radii: np.ndarray
    texture: SmoothField
    tumour: Tumour
    bias: dict[str, SmoothField]


def _sample_tumour(rng: np.random.Generator, head_centre: np.ndarray, head_radii: np.ndarray) -> Tumour:
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    centre = head_centre + head_radii * direction * rng.uniform(0.15, 0.5)
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    shape = np.diag(1.0 / rng.uniform(0.8, 1.25, size=3)) @ rotation.T
    r_oedema = rng.uniform(0.22, 0.36)
    r_core = r_oedema * rng.uniform(0.5, 0.7)
    r_necrosis = r_core * rng.uniform(0.4, 0.7)
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=_PATTERN_P))]
    return Tumour(
        centre=centre,
        shape=shape,
        r_oedema=float(r_oedema),
        r_core=float(r_core),
        r_necrosis=float(r_necrosis),
        pattern=pattern,
        oedema_edge=SmoothField.sample(rng, terms=6, low=3.0, high=8.0),
        core_edge=SmoothField.sample(rng, terms=6, low=4.0, high=9.0),
        necrosis_edge=SmoothField.sample(rng, terms=6, low=4.0, high=9.0),
        patches=SmoothField.sample(rng, terms=6, low=6.0, high=12.0),
    )


def sample_anatomy(rng: np.random.Generator, modalities: tuple[str, ...]) -> Anatomy:
    """Draw every random parameter of a case, always in the same order (so one seed gives one phantom)."""
    head_centre = rng.uniform(-0.03, 0.03, size=3)
    head_radii = np.array([0.70, 0.84, 0.72]) * rng.uniform(0.93, 1.05, size=3)
    deformation = tuple(SmoothField.sample(rng, terms=4, low=1.0, high=2.5) for _ in range(3))
    deformation_scale = float(rng.uniform(0.03, 0.06))
    gyri = SmoothField.sample(rng, terms=8, low=8.0, high=14.0)
    ventricle_offset = np.array([0.11, 0.04, 0.08]) * rng.uniform(0.8, 1.2, size=3)
    ventricle_radii = np.array([0.07, 0.24, 0.11]) * rng.uniform(0.75, 1.25, size=3)
    texture = SmoothField.sample(rng, terms=8, low=10.0, high=20.0)
    tumour = _sample_tumour(rng, head_centre, head_radii)
    bias = {m: SmoothField.sample(rng, terms=4, low=0.5, high=1.5) for m in modalities}
    return Anatomy(
        head_centre=head_centre,
        head_radii=head_radii,
        deformation=deformation,  # type: ignore[arg-type]
        deformation_scale=deformation_scale,
        gyri=gyri,
        ventricle_offset=ventricle_offset,
        ventricle_radii=ventricle_radii,
        texture=texture,
        tumour=tumour,
        bias=bias,
    )


def _ellipsoid_radius(coords: Coords, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal radius ``sqrt(sum(((u - c) / r)^2))`` (1 on the surface), float32."""
    sq = [np.square((c - np.float32(m)) / np.float32(r)) for c, m, r in zip(coords, centre, radii, strict=True)]
    return np.sqrt(sq[0] + sq[1] + sq[2])


def _tumour_radius(coords: Coords, tumour: Tumour) -> np.ndarray:
    """Radius in the tumour's rotated, elongated frame (``|shape @ (u - centre)|``), float32."""
    offsets = [c - np.float32(m) for c, m in zip(coords, tumour.centre, strict=True)]
    rows = tumour.shape.astype(np.float32)
    frame = [row[0] * offsets[0] + row[1] * offsets[1] + row[2] * offsets[2] for row in rows]
    return np.sqrt(frame[0] ** 2 + frame[1] ** 2 + frame[2] ** 2)


def render_tissues(anatomy: Anatomy, coords: Coords) -> np.ndarray:
    """Tissue-code map (uint8, the broadcast shape of ``coords``) of the healthy head plus the tumour."""
    scale = np.float32(anatomy.deformation_scale)
    warped = tuple(c + scale * field(coords) for c, field in zip(coords, anatomy.deformation, strict=True))
    rho = _ellipsoid_radius(warped, anatomy.head_centre, anatomy.head_radii)

    tissue = np.zeros(rho.shape, dtype=np.uint8)
    tissue[rho <= _SKULL_OUT] = SKULL
    tissue[rho <= _SKULL_IN] = CSF
    brain = rho <= _BRAIN
    tissue[brain] = GREY
    tissue[rho <= _GREY_IN + 0.08 * anatomy.gyri(coords)] = WHITE
    ventricles = np.zeros_like(brain)
    for side in (-1.0, 1.0):
        centre = anatomy.head_centre + anatomy.head_radii * anatomy.ventricle_offset * (side, 1.0, 1.0)
        ventricles |= _ellipsoid_radius(warped, centre, anatomy.ventricle_radii) <= 1.0
    tissue[ventricles & brain] = CSF

    tumour = anatomy.tumour
    r = _tumour_radius(coords, tumour)
    core_radius = tumour.r_core * (1 + _CORE_WOBBLE * tumour.core_edge(coords))
    oedema = (r <= tumour.r_oedema * (1 + _OEDEMA_WOBBLE * tumour.oedema_edge(coords))) | (
        r <= _OEDEMA_MARGIN * core_radius
    )
    oedema &= brain & ~ventricles
    core = (r <= core_radius) & brain
    tissue[oedema] = OEDEMA
    if tumour.pattern == "rim_necrosis":
        necrosis = r <= tumour.r_necrosis * (1 + _CORE_WOBBLE * tumour.necrosis_edge(coords))
        tissue[core] = ENHANCING
        tissue[core & necrosis] = NECROSIS
    elif tumour.pattern == "solid":
        tissue[core] = ENHANCING
    elif tumour.pattern == "patchy":
        tissue[core] = NECROSIS
        tissue[core & (tumour.patches(coords) > 0.3) & (r > 0.5 * tumour.r_core)] = ENHANCING
    else:
        tissue[core] = NECROSIS
    return tissue


def render_images(
    tissue: np.ndarray,
    anatomy: Anatomy,
    coords: Coords,
    *,
    rng: np.random.Generator,
    noise: float,
    bias: float,
) -> dict[str, np.ndarray]:
    """One float32 image per modality of ``anatomy.bias``, each on the grid of ``tissue``.

    Contrast lookup, a slight tissue texture, a half-voxel Gaussian point-spread function, an independent
    multiplicative bias field ``exp(bias * f)`` per modality (``f`` in ``[-1, 1]``), then Rician noise of
    standard deviation ``noise`` (relative to white matter on T1 = 0.8).
    """
    texture = 1.0 + 0.04 * anatomy.texture(coords)
    images = {}
    for modality, field in anatomy.bias.items():
        table = np.asarray(CONTRAST[modality], dtype=np.float32)
        clean = ndimage.gaussian_filter(table[tissue] * texture, sigma=0.5, mode="nearest")
        clean *= np.exp(np.float32(bias) * field(coords))
        real = clean + np.float32(noise) * rng.standard_normal(tissue.shape, dtype=np.float32)
        imag = np.float32(noise) * rng.standard_normal(tissue.shape, dtype=np.float32)
        images[modality] = np.sqrt(real * real + imag * imag)
    return images
