"""The embedded default data set: a procedural multi-modal brain-tumour phantom.

Each case is a brain-like head (skull, CSF with ventricles, grey matter shell, white matter core) with one
tumour made of BraTS sub-regions (oedema 2 around a core of enhancing rim 4 and necrosis 1), rendered in the
four BraTS contrasts with modality-specific tissue intensities, an independent smooth bias field per
modality and Rician noise. The whole tumour is best seen on FLAIR/T2 and the enhancing tumour only on T1c,
so segmentation quality depends on which modalities are present. Each case also has a class target (tumour
grade derived from its label map) and a one-line report derived from the labels.

Everything is deterministic by seed and synthetic; :func:`phantom_info` says so (``synthetic=True``).

Example:
    >>> case = make_phantom_case(case_id="demo", seed=0, size=32)
    >>> sorted(case.images), case.images["t1"].shape
    (['flair', 't1', 't1c', 't2'], (32, 32, 32))
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmodal.atomic import atomic_write_text
from medmodal.data._phantom_anatomy import (
    TISSUE_NAMES,
    TISSUE_TO_LABEL,
    Anatomy,
    Coords,
    render_images,
    render_tissues,
    sample_anatomy,
)
from medmodal.data.case import BRATS_LABELS, BRATS_MODALITIES, BRATS_REGIONS, Case, DataError, DatasetInfo, Volume

#: Bumped whenever the generator changes, so caches of written phantoms can tell they are stale.
PHANTOM_VERSION = 1
#: A case is high grade (target 1) if it has necrosis and enhancing tumour is more than this fraction of its core.
HIGH_GRADE_ENHANCING_FRACTION = 0.4

#: Names of the tissue codes returned by :func:`phantom_tissue_map` (code = index).
PHANTOM_TISSUES: tuple[str, ...] = TISSUE_NAMES

_MIN_SIZE = 8
_README_KEY = "parameters: "


@dataclass(frozen=True)
class _Grid:
    """A voxel grid centred on the world origin; ``half_fov`` (mm) is the length of one canonical unit."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    half_fov: float

    def axis(self, i: int) -> np.ndarray:
        """World coordinates (mm) of the voxel centres along axis ``i``, float64."""
        return (np.arange(self.shape[i]) - (self.shape[i] - 1) / 2.0) * self.spacing[i]


def _make_grid(spatial_dims: int, size: int | Sequence[int], spacing: Sequence[float] | None) -> _Grid:
    """Resolve ``size``/``spacing`` (see :func:`make_phantom_case`) into a grid and its canonical scale."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    spacing = (1.0,) * spatial_dims if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != spatial_dims or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"phantom spacing must be {spatial_dims} finite positive voxel sizes in mm, e.g. "
                        f"{','.join(['1'] * (spatial_dims - 1) + ['3'])}; got {list(spacing)}")
    if isinstance(size, (int, np.integer)):
        fov = int(size) * min(spacing)
        shape = tuple(max(1, int(np.ceil(fov / s - 1e-6))) for s in spacing)
    else:
        shape = tuple(int(n) for n in size)
        if len(shape) != spatial_dims:
            raise ValueError(f"size must have {spatial_dims} entries for spatial_dims={spatial_dims}, got {size}")
        fov = min(n * s for n, s in zip(shape, spacing, strict=True))
    if min(shape) < _MIN_SIZE:
        raise DataError(f"phantom grid {list(shape)}: every axis needs at least {_MIN_SIZE} voxels; raise the size "
                        "or bring the spacings closer together")
    return _Grid(shape=shape, spacing=spacing, half_fov=fov / 2.0)


def _canonical_coords(grid: _Grid, z_canonical: float) -> Coords:
    """Broadcastable float32 canonical coordinates of the grid (a 2D grid is the axial plane ``z``)."""
    ndim = len(grid.shape)
    axes = []
    for i in range(ndim):
        view = [1] * ndim
        view[i] = grid.shape[i]
        axes.append((grid.axis(i) / grid.half_fov).astype(np.float32).reshape(view))
    if ndim == 2:
        axes.append(np.asarray(z_canonical, dtype=np.float32))
    return axes[0], axes[1], axes[2]


def _affine(grid: _Grid, z_mm: float) -> np.ndarray:
    """``diag(spacing)`` voxel-to-world matrix whose grid is centred on the origin (a 2D slice sits at ``z_mm``)."""
    affine = np.eye(4)
    for i, s in enumerate(grid.spacing):
        affine[i, i] = s
        affine[i, 3] = grid.axis(i)[0]
    if len(grid.shape) == 2:
        affine[2, 3] = z_mm
    return affine


def _grade(label: np.ndarray) -> int:
    """1 (high grade) if the tumour has necrosis and a mostly enhancing core, else 0 (low grade)."""
    necrosis, enhancing = int(np.count_nonzero(label == 1)), int(np.count_nonzero(label == 4))
    return int(necrosis > 0 and enhancing > HIGH_GRADE_ENHANCING_FRACTION * (necrosis + enhancing))


def _location(centroid: np.ndarray) -> str:
    """Side and lobe of a canonical (RAS, head-centred) position, e.g. ``"left frontal"``."""
    x, y, z = centroid
    side = "midline" if abs(x) < 0.04 else ("right" if x > 0 else "left")
    if y > 0.2:
        lobe = "frontal"
    elif y < -0.35:
        lobe = "occipital"
    else:
        lobe = "temporal" if z < -0.1 else "parietal"
    return f"{side} {lobe}"


def _report(label: Volume, *, half_fov: float, target: int) -> str:
    """One-line report derived from the label map only (location, size, composition, impression)."""
    data = label.array
    whole = np.argwhere(data > 0)
    if whole.size == 0:
        return "Synthetic phantom. No mass identified. Impression: no tumour in this field of view."
    index = np.zeros(3)
    index[: data.ndim] = whole.mean(axis=0)
    centroid = (label.affine[:3, :3] @ index + label.affine[:3, 3]) / half_fov
    voxel = float(np.prod(label.spacing))
    if data.ndim == 3:
        size = f"{whole.shape[0] * voxel / 1000.0:.1f} mL"
    else:
        size = f"{whole.shape[0] * voxel:.0f} mm² in this slice"
    necrosis, enhancing = np.count_nonzero(data == 1), np.count_nonzero(data == 4)
    if enhancing == 0:
        core = "non-enhancing" if necrosis else "without a distinct core"
    elif necrosis == 0:
        core = "with solid enhancement"
    elif target == 1:
        core = "with enhancing rim and central necrosis"
    else:
        core = "with patchy enhancement of a non-enhancing core"
    oedema = "; surrounding oedema" if np.any(data == 2) else ""
    impression = "high-grade pattern" if target == 1 else "low-grade pattern"
    location = _location(centroid)
    return (
        f"Synthetic phantom. {location[0].upper()}{location[1:]} mass, {size}, {core}{oedema}. "
        f"Impression: {impression}."
    )


def _render(
    *, seed: int, spatial_dims: int, size: int | Sequence[int], spacing: Sequence[float] | None
) -> tuple[_Grid, Anatomy, Coords, np.ndarray, np.random.Generator]:
    """Sample the anatomy of case ``seed`` and render its tissue map; the generator continues for the noise."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    grid = _make_grid(spatial_dims, size, spacing)
    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(rng, BRATS_MODALITIES)
    coords = _canonical_coords(grid, float(anatomy.tumour.centre[2]))
    return grid, anatomy, coords, render_tissues(anatomy, coords), rng


def make_phantom_case(
    *,
    case_id: str,
    seed: int,
    spatial_dims: int = 3,
    size: int | tuple[int, ...] = 64,
    spacing: tuple[float, ...] | None = None,
    noise: float = 0.05,
    bias: float = 0.3,
) -> Case:
    """Generate one synthetic brain-tumour case in the four BraTS contrasts.

    The phantom is a continuous object that the grid samples, scaled so the head fits the shortest axis of
    the field of view: for a given field of view (mm), ``size`` and ``spacing`` change the resolution, not
    the anatomy, and the 2D case is a slice of the 3D one.

    Args:
        case_id: identifier of the returned case.
        seed: non-negative seed; the same seed gives bit-identical arrays, different seeds different cases.
        spatial_dims: 3 for an ``(X, Y, Z)`` volume, 2 for the ``(X, Y)`` axial slice through the tumour centre.
        size: an int gives a square/cubic field of view of ``size`` voxels at the finest spacing (so
            ``size=64, spacing=(1, 1, 3)`` gives a 64 x 64 x 22 grid); a tuple is the exact grid shape.
        spacing: voxel size in mm per axis (default isotropic 1 mm).
        noise: standard deviation of the Rician noise, in image units (white matter is about 0.8 on T1).
        bias: amplitude of each modality's multiplicative bias field ``exp(bias * f)``, ``f`` in ``[-1, 1]``.

    Returns:
        A :class:`Case` with float32 images ``t1, t1c, t2, flair`` and a uint8 label map (0, 1 necrosis,
        2 oedema, 4 enhancing tumour), all with affine ``diag(spacing)`` centred on the world origin (RAS, mm);
        ``target`` is the tumour grade (1 high, 0 low) and ``report`` a one-line synthetic report.
    """
    if noise < 0 or bias < 0:
        raise ValueError(f"noise and bias must be non-negative, got noise={noise}, bias={bias}")
    grid, anatomy, coords, tissue, rng = _render(seed=seed, spatial_dims=spatial_dims, size=size, spacing=spacing)
    images = render_images(tissue, anatomy, coords, rng=rng, noise=noise, bias=bias)

    z_canonical = float(anatomy.tumour.centre[2])
    affine = _affine(grid, z_canonical * grid.half_fov)
    label = Volume(TISSUE_TO_LABEL[tissue], affine=affine)
    target = _grade(label.array)
    return Case(
        case_id=case_id,
        images={m: Volume(images[m], affine=affine.copy()) for m in BRATS_MODALITIES},
        label=label,
        target=target,
        report=_report(label, half_fov=grid.half_fov, target=target),
    )


def phantom_tissue_map(
    *,
    seed: int,
    spatial_dims: int = 3,
    size: int | tuple[int, ...] = 64,
    spacing: tuple[float, ...] | None = None,
) -> np.ndarray:
    """The tissue map behind :func:`make_phantom_case` with the same arguments (a noiseless ground truth).

    Returns:
        uint8 array on the case's grid, indices into :data:`PHANTOM_TISSUES` (healthy tissues and tumour
        sub-regions), e.g. to measure contrasts per tissue or to build atlases.
    """
    return _render(seed=seed, spatial_dims=spatial_dims, size=size, spacing=spacing)[3]


def phantom_info(*, name: str = "medmodal-phantom") -> DatasetInfo:
    """The :class:`DatasetInfo` of phantom data sets: BraTS modalities, labels and regions, ``synthetic=True``."""
    return DatasetInfo(
        name=name,
        modalities=BRATS_MODALITIES,
        labels=BRATS_LABELS,
        regions=dict(BRATS_REGIONS),
        synthetic=True,
    )


def _case_seeds(seed: int, index: int) -> tuple[int, np.random.Generator]:
    """The image seed of case ``index`` and an independent generator for its missing modalities."""
    sequence = np.random.SeedSequence([seed, index])
    image_seq, missing_seq = sequence.spawn(2)
    return int(image_seq.generate_state(1)[0]), np.random.default_rng(missing_seq)


def generate_phantom_cases(
    *,
    cases: int,
    seed: int = 0,
    spatial_dims: int = 3,
    size: int | tuple[int, ...] = 64,
    spacing: tuple[float, ...] | None = None,
    missing_rate: float = 0.0,
) -> Iterator[Case]:
    """Yield ``cases`` phantom cases ``phantom_000, phantom_001, ...`` (see :func:`make_phantom_case`).

    Case ``i`` is seeded from ``(seed, i)`` with :class:`numpy.random.SeedSequence`, so a case does not
    depend on how many others are generated. With ``missing_rate > 0`` each modality of each case is removed
    with that probability (from an independent stream), but never all of them: an "imperfect" data set.
    """
    if cases < 0 or seed < 0:
        raise DataError(f"phantom cases and seed must be non-negative, got cases={cases}, seed={seed}")
    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate}")
    _make_grid(spatial_dims, size, spacing)  # fail now, not at the first case
    return _iter_cases(
        cases=cases, seed=seed, spatial_dims=spatial_dims, size=size, spacing=spacing, missing_rate=missing_rate
    )


def _iter_cases(
    *,
    cases: int,
    seed: int,
    spatial_dims: int,
    size: int | tuple[int, ...],
    spacing: tuple[float, ...] | None,
    missing_rate: float,
) -> Iterator[Case]:
    width = max(3, len(str(cases - 1)))
    for index in range(cases):
        case_seed, missing_rng = _case_seeds(seed, index)
        case = make_phantom_case(
            case_id=f"phantom_{index:0{width}d}",
            seed=case_seed,
            spatial_dims=spatial_dims,
            size=size,
            spacing=spacing,
        )
        drop = missing_rng.random(len(BRATS_MODALITIES)) < missing_rate
        if drop.all():
            drop[missing_rng.integers(len(BRATS_MODALITIES))] = False
        for modality, dropped in zip(BRATS_MODALITIES, drop, strict=True):
            if dropped:
                del case.images[modality]
        yield case


def _readme(parameters: dict[str, object]) -> str:
    return (
        "medmodal synthetic phantom -- SYNTHETIC DATA, not from any patient.\n\n"
        "Procedurally generated multi-modal brain-tumour phantom (t1, t1c, t2, flair; BraTS labels\n"
        "0/1/2/4), written by medmodal.data.phantom.write_phantom. Class targets are tumour grades and\n"
        "reports are derived from the synthetic label maps.\n\n"
        f"{_README_KEY}{json.dumps(parameters, sort_keys=True)}\n"
    )


def read_phantom_parameters(out: Path) -> dict[str, object] | None:
    """The generation parameters recorded in ``out/README.txt`` by :func:`write_phantom`, or ``None``.

    A cache compares them with the parameters it wants before reusing a written phantom.
    """
    readme = Path(out) / "README.txt"
    if not readme.is_file():
        return None
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith(_README_KEY):
            try:
                return json.loads(line[len(_README_KEY) :])
            except json.JSONDecodeError:
                return None
    return None


def write_phantom(
    out: Path,
    *,
    cases: int = 40,
    seed: int = 0,
    spatial_dims: int = 3,
    size: int | tuple[int, ...] = 64,
    spacing: tuple[float, ...] | None = None,
    missing_rate: float = 0.0,
    layout: str = "brats",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a phantom data set to ``out`` in a dataset ``layout`` (``"brats"`` or ``"nnunet"``).

    Cases are generated lazily and written by :func:`medmodal.data.formats.write_dataset`; ``out/README.txt``
    states that the data are synthetic and records the generation parameters (see
    :func:`read_phantom_parameters`). ``progress=True`` shows a progress bar. Returns ``out``.
    """
    from medmodal.data.formats import write_dataset  # deferred: pulls in the image I/O stack

    out = Path(out)
    parameters: dict[str, object] = {
        "version": PHANTOM_VERSION,
        "cases": cases,
        "seed": seed,
        "spatial_dims": spatial_dims,
        "size": size if isinstance(size, int) else list(size),
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "missing_rate": missing_rate,
        "layout": layout,
    }
    items: Iterable[Case] = generate_phantom_cases(
        cases=cases, seed=seed, spatial_dims=spatial_dims, size=size, spacing=spacing, missing_rate=missing_rate
    )
    if progress:
        from rich.progress import track

        items = track(items, total=cases, description=f"Writing synthetic phantom to {out}")
    write_dataset(items, out, phantom_info(), format=layout, overwrite=overwrite)
    atomic_write_text(out / "README.txt", _readme(parameters))
    return out
