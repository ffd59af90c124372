"""The embedded chest X-ray data set (semi-supervised multi-task learning): a procedural chest X-ray phantom
with lung masks, a two-class target and several sources.

Each case is a frontal chest radiograph drawn from a continuous model (canonical coordinates ``u`` across and
``v`` down the picture, both in ``[-1, 1]`` over a :data:`CHEST_FOV_MM` field of view):

* a soft-tissue thorax (projected ellipsoid), a spine and mediastinum band, a heart, optional posterior ribs
  (bright arcs that cross the lungs) and two lung fields, each a projected ellipsoid whose air makes it dark;
  the left lung is cut by the heart;
* the segmentation mask is the union of both lungs, exactly the pixels whose centre lies in a lung;
* class 1 (``"opacity"``) has one bright, blurred opacity (a Gaussian of random size, position and contrast,
  some faint) multiplied by the lung's own depth profile, so it lies inside the mask; class 0 (``"normal"``) has
  none. About half the cases are each class;
* a random pose (rotation of a few degrees, shift, scale) and random anatomy sizes;
* the detector: a blur, then the case's *source* (:data:`CHEST_SOURCES`) maps the attenuation to a grey value
  with its own offset, contrast and gamma, adds its smooth bias field and its noise, and samples the same field
  of view with its own number of pixels (so its own pixel spacing). Lungs cannot be found by a threshold: the
  soft tissue, ribs, bias field and noise overlap their grey values.

Case ``i`` of :func:`write_chest_phantom` depends only on ``(seed, i)`` (through
:class:`numpy.random.SeedSequence`) and its source ``sources[i % len(sources)]``; the anatomy, class and
opacity do not depend on the source. Everything is synthetic; :func:`chest_phantom_info` says so.

Example:
    >>> case = make_chest_case(case_id="demo", seed=0, size=33, source="B")
    >>> case.images["xray"].shape, case.source, case.label.array.max()
    ((50, 50), 'B', 1)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medmodal.atomic import atomic_write_text
from medmodal.data.case import Case, CaseRecord, DataError, DatasetInfo, Volume
from medmodal.data.phantom import _README_KEY, read_phantom_parameters  # one README convention

__all__ = [
    "CHEST_CLASSES",
    "CHEST_FOV_MM",
    "CHEST_PHANTOM_VERSION",
    "CHEST_SOURCES",
    "ChestLayers",
    "ChestSource",
    "chest_phantom_info",
    "chest_phantom_layers",
    "chest_source_names",
    "describe_chest_sources",
    "generate_chest_cases",
    "make_chest_case",
    "read_chest_phantom_parameters",
    "write_chest_phantom",
]

#: Bumped whenever the generator changes, so caches of written phantoms can tell they are stale.
CHEST_PHANTOM_VERSION = 3
#: Class names of the phantom's target (index = target).
CHEST_CLASSES: tuple[str, ...] = ("normal", "opacity")
#: Field of view (mm) of every source: a source's pixel spacing is ``CHEST_FOV_MM / pixels``.
CHEST_FOV_MM = 400.0
#: Largest value of the 16-bit images.
_WHITE = 65535
_MIN_PIXELS = 16


@dataclass(frozen=True)
class ChestSource:
    """How one source (site, scanner) renders the attenuation ``a`` (about 0..1) of a case.

    grey = ``offset + contrast * a ** gamma + bias * b(u, v) + noise * n``, clipped to ``[0, 1]`` and stored as
    ``round(grey * 65535)`` (16 bit); ``b`` is a smooth field with ``max |b| = 1`` and a random direction per
    case, ``n`` standard normal white noise per pixel.

    Args:
        offset: grey value of air (outside the body).
        contrast: grey-value range of the attenuation.
        gamma: exponent of the attenuation (< 1 brightens the lungs, > 1 darkens them).
        bias: amplitude of the additive bias field (grey values).
        noise: standard deviation of the noise (grey values).
        scale: pixels per side as a multiple of the phantom's ``size`` (the field of view is the same).
    """

    offset: float
    contrast: float
    gamma: float
    bias: float
    noise: float
    scale: float

    def pixels(self, size: int) -> int:
        """Pixels per side for a phantom ``size``."""
        return max(_MIN_PIXELS, int(round(size * self.scale)))

    def spacing_mm(self, size: int) -> float:
        """Pixel spacing (mm) for a phantom ``size``: the field of view over :meth:`pixels`."""
        return CHEST_FOV_MM / self.pixels(size)


#: The sources, in the order ``sources=N`` takes them. A is the reference; B has a lower contrast, a brightening
#: gamma, a stronger bias and 1.5x the pixels; C a darkening gamma, the strongest bias and noise and 0.75x the
#: pixels; D..F vary the same parameters further.
CHEST_SOURCES: dict[str, ChestSource] = {
    "A": ChestSource(offset=0.05, contrast=0.85, gamma=1.0, bias=0.04, noise=0.015, scale=1.0),
    "B": ChestSource(offset=0.15, contrast=0.60, gamma=0.7, bias=0.12, noise=0.030, scale=1.5),
    "C": ChestSource(offset=0.02, contrast=0.95, gamma=1.5, bias=0.20, noise=0.050, scale=0.75),
    "D": ChestSource(offset=0.10, contrast=0.70, gamma=1.2, bias=0.08, noise=0.040, scale=1.25),
    "E": ChestSource(offset=0.08, contrast=0.80, gamma=0.85, bias=0.16, noise=0.025, scale=0.5),
    "F": ChestSource(offset=0.00, contrast=1.00, gamma=1.1, bias=0.10, noise=0.060, scale=1.0),
}


def chest_source_names(sources: int | Sequence[str]) -> tuple[str, ...]:
    """The source names of ``sources``: a count (the first ``N`` of :data:`CHEST_SOURCES`) or names."""
    if isinstance(sources, (int, np.integer)):
        if not 1 <= int(sources) <= len(CHEST_SOURCES):
            raise DataError(f"chest phantom sources: {sources} is not a count from 1 to {len(CHEST_SOURCES)} "
                            f"(the sources {', '.join(CHEST_SOURCES)})")
        return tuple(CHEST_SOURCES)[: int(sources)]
    names = tuple(str(s).strip() for s in sources)
    unknown = [n for n in names if n not in CHEST_SOURCES]
    if unknown or not names or len(set(names)) != len(names):
        raise DataError(f"chest phantom sources {list(names)}: give distinct names from {list(CHEST_SOURCES)} "
                        "(or a count)")
    return names


@dataclass(frozen=True)
class _Anatomy:
    """One case's anatomy and pose in canonical units (see the module docstring)."""

    rotation: float  # radians
    shift: tuple[float, float]
    scale: float
    body: tuple[float, float, float, float]  # centre u, v, radii u, v
    lungs: tuple[tuple[float, float, float, float, float], ...]  # centre u, v, radii u, v, tilt (radians)
    heart: tuple[float, float, float, float, float]
    rib_start: float
    rib_step: float
    rib_curve: float
    opacity: tuple[float, float, float, float] | None  # centre u, v (object coordinates), sigma, amplitude
    bias_direction: tuple[float, float, float]


def _sample_anatomy(rng: np.random.Generator, *, opacity: bool) -> _Anatomy:
    """Draw a case's anatomy; the opacity's centre is drawn inside a lung (rejection sampling)."""

    def j(spread: float) -> float:
        return 1.0 + float(rng.uniform(-spread, spread))

    width = j(0.08)
    lungs = (
        (-0.33 * width + rng.uniform(-0.03, 0.03), -0.02 + rng.uniform(-0.04, 0.04), 0.22 * j(0.12),
         0.50 * j(0.12), math.radians(rng.uniform(4, 12))),
        (0.34 * width + rng.uniform(-0.03, 0.03), 0.0 + rng.uniform(-0.04, 0.04), 0.21 * j(0.12),
         0.48 * j(0.12), -math.radians(rng.uniform(4, 12))),
    )
    heart = (0.13 + rng.uniform(-0.04, 0.04), 0.26 + rng.uniform(-0.04, 0.04), 0.30 * j(0.15), 0.22 * j(0.15),
             math.radians(rng.uniform(-25, -10)))
    anatomy = dict(
        rotation=math.radians(rng.uniform(-5, 5)), shift=(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)),
        scale=rng.uniform(0.88, 1.06), body=(0.0, 0.06, 0.80 * width, 0.98 * j(0.04)), lungs=lungs,
        heart=heart, rib_start=-0.55 + rng.uniform(-0.03, 0.03), rib_step=0.105 * j(0.1),
        rib_curve=0.35 * j(0.2),
    )
    # the opacity is drawn for every case (and dropped for class 0), so both classes of a seed share everything else
    centre = (0.0, 0.0)
    for _ in range(1000):  # a point well inside a lung; accepted within a few draws
        lung = lungs[int(rng.integers(2))]
        reach = max(lung[2], lung[3])
        centre = (lung[0] + rng.uniform(-reach, reach), lung[1] + rng.uniform(-reach, reach))
        if _lung_depth(np.array(centre[0]), np.array(centre[1]), lungs, heart) > 0.45:
            break
    sigma = float(rng.uniform(0.08, 0.16))
    amplitude = float(np.exp(rng.uniform(np.log(0.5), np.log(1.5))))  # log-uniform: some are faint
    spot = (float(centre[0]), float(centre[1]), sigma, amplitude) if opacity else None
    bias = rng.normal(size=3)
    return _Anatomy(**anatomy, opacity=spot, bias_direction=tuple(float(b) for b in bias / np.linalg.norm(bias)))


def _ellipse_r2(p: np.ndarray, q: np.ndarray, e: tuple[float, ...]) -> np.ndarray:
    """Squared elliptic radius of points ``(p, q)`` for ellipse ``(cu, cv, ru, rv[, tilt])`` (1 on its edge)."""
    cu, cv, ru, rv = e[:4]
    tilt = e[4] if len(e) > 4 else 0.0
    dp, dq = p - cu, q - cv
    c, s = math.cos(tilt), math.sin(tilt)
    a, b = c * dp + s * dq, -s * dp + c * dq
    return (a / ru) ** 2 + (b / rv) ** 2


def _depth(r2: np.ndarray) -> np.ndarray:
    """Thickness of a projected ellipsoid, ``sqrt(1 - r^2)`` inside, 0 outside."""
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def _lung_depth(p: np.ndarray, q: np.ndarray, lungs: Sequence[tuple[float, ...]],
                heart: tuple[float, ...]) -> np.ndarray:
    """Air depth of both lungs (0 outside them), the heart cutting into the lungs with a soft edge."""
    air = np.maximum(*(_depth(_ellipse_r2(p, q, lung)) for lung in lungs))
    outside_heart = np.clip((_ellipse_r2(p, q, heart) - 1.0) / 0.35, 0.0, 1.0)
    return air * np.sqrt(outside_heart)


@dataclass
class ChestLayers:
    """The noiseless ground truth of a case on its source's grid, each ``(X, Y)`` float32 unless stated.

    Attributes:
        lungs: bool, the lung mask (the case's label).
        lung_depth: air depth of the lungs, > 0 exactly inside the mask.
        opacity: the opacity's added attenuation (zero for class 0), zero outside the mask.
        attenuation: everything before the detector blur and the source's mapping.
    """

    lungs: np.ndarray
    lung_depth: np.ndarray
    opacity: np.ndarray
    attenuation: np.ndarray


def _object_coords(anatomy: _Anatomy, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Picture coordinates ``(u, v)`` of the pixel centres (``(n, 1)`` and ``(1, n)``) and the object coordinates
    ``(p, q)`` (``(n, n)``) after undoing the pose."""
    axis = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    u, v = axis[:, None], axis[None, :]
    du, dv = u - anatomy.shift[0], v - anatomy.shift[1]
    c, s = math.cos(anatomy.rotation), math.sin(anatomy.rotation)
    p = (c * du + s * dv) / anatomy.scale
    q = (-s * du + c * dv) / anatomy.scale
    return u, v, p, q


def _layers(anatomy: _Anatomy, n: int, *, ribs: bool) -> ChestLayers:
    _, _, p, q = _object_coords(anatomy, n)
    body = _depth(_ellipse_r2(p, q, anatomy.body))
    lung = _lung_depth(p, q, anatomy.lungs, anatomy.heart)
    heart = _depth(_ellipse_r2(p, q, anatomy.heart))
    spine = np.exp(-((p / 0.07) ** 2)) * (body > 0)
    attenuation = 0.55 * body + 0.22 * spine + 0.30 * heart - 0.42 * lung
    if ribs:
        bone = np.zeros_like(p)
        lateral = np.abs(p)
        for k in range(10):
            centre = anatomy.rib_start + k * anatomy.rib_step + anatomy.rib_curve * lateral**2
            bone = np.maximum(bone, np.exp(-(((q - centre) / 0.022) ** 2)))
        attenuation += 0.10 * bone * np.clip((lateral - 0.06) / 0.05, 0, 1) * (body > 0.15)
    opacity = np.zeros_like(p)
    if anatomy.opacity is not None:
        cu, cv, sigma, amplitude = anatomy.opacity
        blob = np.exp(-((p - cu) ** 2 + (q - cv) ** 2) / (2.0 * sigma**2))
        opacity = amplitude * blob * np.clip(lung / 0.3, 0.0, 1.0)  # inside the lung, fading at its edge
        attenuation += opacity
    return ChestLayers(lungs=lung > 0, lung_depth=lung.astype(np.float32), opacity=opacity.astype(np.float32),
                       attenuation=attenuation.astype(np.float32))


def _case_rng(seed: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng(seed)


def _anatomy(seed: int, target: int | None) -> tuple[_Anatomy, int, np.random.Generator]:
    rng = _case_rng(seed)
    drawn = int(rng.random() < 0.5)
    target = drawn if target is None else int(target)
    if target not in (0, 1):
        raise ValueError(f"target must be 0 (normal), 1 (opacity) or None (drawn), got {target}")
    return _sample_anatomy(rng, opacity=target == 1), target, rng


def chest_phantom_layers(*, seed: int, size: int = 64, source: str = "A", target: int | None = None,
                         ribs: bool = True) -> ChestLayers:
    """The noiseless layers behind :func:`make_chest_case` with the same arguments (ground truth for tests)."""
    anatomy, _, _ = _anatomy(seed, target)
    return _layers(anatomy, _source(source).pixels(size), ribs=ribs)


def _source(name: str) -> ChestSource:
    if name not in CHEST_SOURCES:
        raise DataError(f"chest phantom source {name!r}: use one of {list(CHEST_SOURCES)}")
    return CHEST_SOURCES[name]


def make_chest_case(
    *,
    case_id: str,
    seed: int,
    size: int = 64,
    source: str = "A",
    target: int | None = None,
    ribs: bool = True,
) -> Case:
    """Generate one synthetic chest radiograph with its lung mask and class.

    Args:
        case_id: identifier of the returned case.
        seed: non-negative seed; the same seed (and source) gives bit-identical arrays. The anatomy, the class and
            the opacity depend on the seed only, not on the source.
        size: pixels per side of source A; another source has ``round(size * scale)`` (:data:`CHEST_SOURCES`).
        source: one of :data:`CHEST_SOURCES`.
        target: 0 (normal) or 1 (opacity); ``None`` draws it from the seed (probability 1/2).
        ribs: draw the posterior ribs.

    Returns:
        A :class:`Case` with image ``"xray"`` (``(X, Y)`` float32 holding the integer 16-bit grey values
        0..65535) and a uint8 lung mask (0/1), both with affine ``diag(s, s, 1, 1)`` where ``s`` is the source's
        pixel spacing in mm, ``target`` (index into :data:`CHEST_CLASSES`) and ``source``.
    """
    if size < _MIN_PIXELS:
        raise DataError(f"chest phantom size {size}: needs at least {_MIN_PIXELS} pixels per side")
    profile = _source(source)
    anatomy, target, rng = _anatomy(seed, target)
    n = profile.pixels(size)
    layers = _layers(anatomy, n, ribs=ribs)
    u, v, _, _ = _object_coords(anatomy, n)
    # detector blur: a fixed fraction of the field of view, so the same for every source
    attenuation = ndimage.gaussian_filter(layers.attenuation.astype(np.float64), sigma=0.004 * n, mode="nearest")
    a, b, c = anatomy.bias_direction
    field = a * u + b * v + c * (u**2 + v**2 - 2.0 / 3.0)
    field = field / max(float(np.abs(field).max()), 1e-6)
    # the noise comes last so that a source's other parameters do not change which noise a case gets
    noise = np.random.default_rng(rng.integers(2**63)).standard_normal((n, n))
    grey = (profile.offset + profile.contrast * np.clip(attenuation, 0.0, None) ** profile.gamma
            + profile.bias * field + profile.noise * noise)
    pixels = np.round(np.clip(grey, 0.0, 1.0) * _WHITE).astype(np.float32)
    spacing = profile.spacing_mm(size)
    affine = np.diag([spacing, spacing, 1.0, 1.0])
    return Case(case_id=case_id, images={"xray": Volume(pixels, affine=affine)},
                label=Volume(layers.lungs.astype(np.uint8), affine=affine.copy()), target=target, source=source)


def chest_phantom_info(*, name: str = "medmodal-chest-phantom") -> DatasetInfo:
    """The :class:`DatasetInfo` of chest phantom data sets: modality ``xray``, labels ``(0, 1)``, region
    ``lung``, classes :data:`CHEST_CLASSES`, ``synthetic=True``."""
    return DatasetInfo(name=name, modalities=("xray",), labels=(0, 1), regions={"lung": (1,)}, synthetic=True,
                       class_names=CHEST_CLASSES)


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def generate_chest_cases(
    *, cases: int, seed: int = 0, size: int = 64, sources: int | Sequence[str] = 3, ribs: bool = True
) -> Iterator[Case]:
    """Yield ``cases`` chest cases ``chest_000, chest_001, ...``; case ``i`` is seeded from ``(seed, i)`` and
    comes from source ``sources[i % len(sources)]``."""
    if cases < 0 or seed < 0:
        raise DataError(f"chest phantom cases and seed must be non-negative, got cases={cases}, seed={seed}")
    if size < _MIN_PIXELS:
        raise DataError(f"chest phantom size {size}: needs at least {_MIN_PIXELS} pixels per side")
    names = chest_source_names(sources)
    width = max(3, len(str(cases - 1)))
    return (make_chest_case(case_id=f"chest_{i:0{width}d}", seed=_case_seed(seed, i), size=size,
                            source=names[i % len(names)], ribs=ribs) for i in range(cases))


def _readme(parameters: dict[str, object], names: Sequence[str], size: int) -> str:
    lines = [
        "medmodal chest X-ray phantom -- SYNTHETIC PHANTOM, not from any patient.",
        "",
        "Procedurally generated frontal chest radiographs (16-bit grey PNG, images/), each with a lung mask",
        "(0/1 PNG, masks/: the union of both lungs) and a class: normal (0) or opacity (1, one bright blurred",
        "opacity inside a lung, of random size, position and contrast). Written by",
        "medmodal.data.phantom_xray.write_chest_phantom; manifest.csv lists case_id,xray,label,target,source and",
        "medmodal.json declares the labels, the region 'lung', the classes and synthetic: true.",
        "",
        "Sources (grey = offset + contrast * attenuation**gamma + bias * field + noise * N(0, 1), clipped to [0, 1],",
        f"times 65535; the same {CHEST_FOV_MM:g} mm field of view sampled with its own number of pixels). PNG files",
        "hold no pixel size: medmodal reads them with 1 mm pixels; the physical spacing is:",
        "",
        "  source  offset  contrast  gamma  bias   noise  pixels  spacing (mm)",
    ]
    for name in names:
        s = CHEST_SOURCES[name]
        lines.append(f"  {name:<6}  {s.offset:<6.2f}  {s.contrast:<8.2f}  {s.gamma:<5.2f}  {s.bias:<5.2f}  "
                     f"{s.noise:<5.3f}  {s.pixels(size):<6d}  {s.spacing_mm(size):.2f}")
    lines += ["", f"{_README_KEY}{json.dumps(parameters, sort_keys=True)}", ""]
    return "\n".join(lines)


def read_chest_phantom_parameters(out: Path | str) -> dict[str, object] | None:
    """The generation parameters recorded in ``out/README.txt`` by :func:`write_chest_phantom`, or ``None`` (the
    brain phantom's README convention, read by :func:`medmodal.data.phantom.read_phantom_parameters`)."""
    return read_phantom_parameters(Path(out))


def write_chest_phantom(
    out: Path | str,
    *,
    cases: int = 60,
    seed: int = 0,
    size: int = 64,
    sources: int | Sequence[str] = 3,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a chest phantom data set to ``out``: ``manifest.csv`` (``case_id,xray,label,target,source``, targets
    as class names), ``medmodal.json`` (:func:`chest_phantom_info`), ``images/<case>.png`` (16-bit grey),
    ``masks/<case>.png`` (0/1) and ``README.txt`` (says SYNTHETIC PHANTOM, lists the sources' parameters and
    records the generation parameters, see :func:`read_chest_phantom_parameters`).

    The data set appears in ``out`` only once every file is written (a staged folder, as
    :func:`medmodal.data.phantom.write_phantom`). ``out`` must be missing or empty unless ``overwrite``. The same
    arguments give byte-identical files. Returns ``out``.
    """
    from medmodal.data.formats.manifest import write_manifest  # deferred: pulls in the image I/O stack
    from medmodal.data.io import staged_output_dir, write_image

    out = Path(out)
    names = chest_source_names(sources)
    items: Iterable[Case] = generate_chest_cases(cases=cases, seed=seed, size=size, sources=names)
    if progress:
        from rich.progress import track

        items = track(items, total=cases, description=f"Writing the synthetic chest phantom to {out}")
    info = chest_phantom_info()
    parameters: dict[str, object] = {"version": CHEST_PHANTOM_VERSION, "cases": cases, "seed": seed, "size": size,
                                     "sources": list(names)}
    with staged_output_dir(out, overwrite=overwrite) as stage:
        records = []
        for case in items:
            image = write_image(case.images["xray"], stage / "images" / f"{case.case_id}.png", dtype=np.uint16)
            assert case.label is not None
            mask = write_image(case.label, stage / "masks" / f"{case.case_id}.png", dtype=np.uint8)
            records.append(CaseRecord(case.case_id, {"xray": image}, label=mask, target=case.target,
                                      source=case.source))
        write_manifest(records, stage / "manifest.csv", info, side_file=True)
        atomic_write_text(stage / "README.txt", _readme(parameters, names, size))
    return out


def describe_chest_sources(size: int, sources: int | Sequence[str] = 3) -> list[dict[str, object]]:
    """One dict per source (name, parameters, pixels, spacing in mm) for a phantom ``size``, for reports."""
    return [{"source": n, **asdict(CHEST_SOURCES[n]), "pixels": CHEST_SOURCES[n].pixels(size),
             "spacing_mm": round(CHEST_SOURCES[n].spacing_mm(size), 4)} for n in chest_source_names(sources)]
