"""Per-case preprocessing (reorient, resample, crop to non-zero, z-score) and its exact inverse.

Every function here is pure: it takes arrays / a :class:`~medmodal.data.case.Case` and returns arrays plus
a :class:`CaseGeometry` that records each step, so :func:`restore_to_input_grid` can map a prediction made on
the preprocessed grid back onto the input's own voxel grid (write it with the input's affine).

Steps of :func:`preprocess_case`, in order (2D and 3D share the code path; ``S`` is the spatial shape):

1. **reorient** to the closest canonical (RAS) axis order with nibabel's orientation tools: a permutation and
   flips of the voxel axes, no interpolation;
2. **resample** to ``target_spacing`` (linear for images, per-label linear + argmax for label maps; ``None``
   keeps the spacing);
3. **crop** to the bounding box of the non-zero region of the union of present modalities (nnU-Net);
4. **normalise** each modality over its own non-zero voxels: optionally clip its bright tail at the histogram
   rule of :class:`HistogramClip` (ShaSpec's released code), then z-score; background set to 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from medmodal.data.case import Case, DataError, Volume

_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


@dataclass(eq=False)
class CaseGeometry:
    """Everything needed to go from the preprocessed grid back to the input grid.

    Attributes:
        original_shape: spatial shape of the input arrays (input voxel axes).
        original_affine: ``(4, 4)`` voxel-to-world affine of the input.
        orientation: ``(D, 2)`` nibabel orientation transform from the input axes to canonical axes
            (row ``i`` = ``(canonical axis of input axis i, +1 or -1 flip)``).
        canonical_shape: spatial shape after reorientation.
        canonical_spacing: voxel size (mm) after reorientation.
        resampled_shape: spatial shape after resampling (equal to ``canonical_shape`` when not resampled).
        target_spacing: the spacing resampled to, or ``None`` if the spacing was kept.
        crop: ``(D, 2)`` ``[start, stop)`` of the crop on the resampled grid.
    """

    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    orientation: np.ndarray
    canonical_shape: tuple[int, ...]
    canonical_spacing: tuple[float, ...]
    resampled_shape: tuple[int, ...]
    target_spacing: tuple[float, ...] | None
    crop: tuple[tuple[int, int], ...]

    @property
    def spatial_dims(self) -> int:
        return len(self.original_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the preprocessed (cropped) array."""
        return tuple(stop - start for start, stop in self.crop)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size (mm) of the preprocessed array."""
        return self.target_spacing if self.target_spacing is not None else self.canonical_spacing

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CaseGeometry) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return {
            "original_shape": list(self.original_shape),
            "original_affine": np.asarray(self.original_affine, dtype=float).tolist(),
            "orientation": np.asarray(self.orientation, dtype=float).tolist(),
            "canonical_shape": list(self.canonical_shape),
            "canonical_spacing": list(self.canonical_spacing),
            "resampled_shape": list(self.resampled_shape),
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
            "crop": [list(c) for c in self.crop],
        }

    @classmethod
    def from_dict(cls, d: dict) -> CaseGeometry:
        ts = d["target_spacing"]
        return cls(
            original_shape=tuple(int(s) for s in d["original_shape"]),
            original_affine=np.asarray(d["original_affine"], dtype=np.float64),
            orientation=np.asarray(d["orientation"], dtype=np.float64),
            canonical_shape=tuple(int(s) for s in d["canonical_shape"]),
            canonical_spacing=tuple(float(s) for s in d["canonical_spacing"]),
            resampled_shape=tuple(int(s) for s in d["resampled_shape"]),
            target_spacing=None if ts is None else tuple(float(s) for s in ts),
            crop=tuple((int(a), int(b)) for a, b in d["crop"]),
        )


def canonical_orientation(affine: np.ndarray, spatial_dims: int, *, where: str) -> np.ndarray:
    """``(D, 2)`` orientation transform taking ``spatial_dims`` voxel axes to the closest RAS order.

    A 2D image uses the first two columns of its 3D affine; its canonical axes keep the RAS order of the two
    world axes it spans (e.g. a coronal slice becomes ``(R, S)``).
    """
    cols = [*range(spatial_dims), 3]
    ornt = io_orientation(np.asarray(affine, dtype=np.float64)[:, cols])
    if np.isnan(ornt).any():
        raise DataError(f"{where}: degenerate affine (two voxel axes point the same way): {affine.tolist()}")
    ranked = ornt.copy()
    ranked[:, 0] = np.argsort(np.argsort(ornt[:, 0]))  # world axis -> its rank among the spanned axes
    identity = np.array([[i, 1.0] for i in range(spatial_dims)])
    return ornt_transform(ranked, identity)


def resample(array: np.ndarray, shape: Sequence[int], *, order: int) -> np.ndarray:
    """Resample the trailing ``len(shape)`` axes of ``array`` to ``shape`` (half-voxel aligned grids).

    Args:
        array: ``(*S)`` or ``(C, *S)`` array.
        shape: the output spatial shape.
        order: 0 nearest (labels, keeps the dtype), 1 linear, 3 cubic (float32 output).
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    if tuple(array.shape[-d:]) == shape:
        return array
    lead = array.shape[:-d]
    if order == 3:
        from scipy.ndimage import zoom

        flat = array.reshape(-1, *array.shape[-d:]).astype(np.float32, copy=False)
        zooms = [o / i for o, i in zip(shape, array.shape[-d:], strict=True)]
        out = np.stack([zoom(a, zooms, order=3, mode="nearest", grid_mode=True) for a in flat])
        return out.reshape(*lead, *shape)
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest), 1 (linear) or 3 (cubic), got {order}")
    if order == 0:  # voxel-centre nearest neighbour (torch's "nearest-exact"), any dtype
        index = [
            np.minimum(((np.arange(o) + 0.5) * (i / o)).astype(np.int64), i - 1)
            for o, i in zip(shape, array.shape[-d:], strict=True)
        ]
        return array[(..., *np.ix_(*index))]
    x = torch.from_numpy(np.ascontiguousarray(array).reshape(1, -1, *array.shape[-d:]))
    y = F.interpolate(x.float(), size=shape, mode=_LINEAR_MODES[d], align_corners=False)
    return y.numpy().reshape(*lead, *shape)


def resample_label(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample an integer label map (``(*S)`` or ``(C, *S)``) to ``shape``, keeping its dtype and values.

    Each label value is interpolated linearly as a binary mask and every voxel takes the value with the
    highest weight (nnU-Net's label resampling): smoother and more faithful than nearest neighbour, and the
    identity when ``shape`` is unchanged.
    """
    d = len(shape)
    if tuple(label.shape[-d:]) == tuple(shape):
        return label
    values = np.unique(label)
    out = np.full((*label.shape[:-d], *shape), values[0], dtype=label.dtype)
    best = resample((label == values[0]).astype(np.float32), shape, order=1)
    for value in values[1:]:
        weight = resample((label == value).astype(np.float32), shape, order=1)
        wins = weight > best
        out[wins] = value
        best = np.maximum(best, weight)
    return out


def nonzero_bbox(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` per axis of the True region of ``mask``; the whole array if ``mask`` is empty."""
    if not mask.any():
        return tuple((0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


@dataclass(frozen=True)
class HistogramClip:
    """Clip a modality's bright tail at the top of its histogram before the z-score (ShaSpec spec §2.6).

    The histogram is taken over the **non-zero** voxels ``v`` of one modality: ``bins`` equal-width bins
    spanning ``[min(v), max(v)]`` (numpy's ``np.histogram(v, bins)``, the last bin closed). The clip value is
    the **upper edge** of the highest bin holding at least ``min_count`` voxels; every voxel above it is set to
    it. A volume whose top bin holds ``min_count`` voxels or more is therefore unchanged, and one where no bin
    does (tiny images) is left unclipped.

    ShaSpec's released code (``truncate`` in ``BraTSDataSet.py``) histograms the whole volume, background
    included, into ``int(max)`` bins (unit-wide bins for integer MRI intensities that start at 0) and clips at
    the *index* of the highest bin with >= 50 voxels, i.e. about that bin's lower edge. Here the bin count is
    fixed, so the rule does not depend on the intensity scale (float images, CT, phantoms), and the upper edge
    is used, so a volume without outliers keeps its maximum.

    Attributes:
        min_count: voxels a bin must hold to count (ShaSpec: 50).
        bins: number of equal-width bins over the non-zero range.
    """

    min_count: int = 50
    bins: int = 1000

    def __post_init__(self) -> None:
        if self.min_count < 1 or self.bins < 1:
            raise ValueError(f"HistogramClip needs min_count >= 1 and bins >= 1, got {self}")

    def to_dict(self) -> dict[str, int]:
        return {"min_count": self.min_count, "bins": self.bins}

    @classmethod
    def from_dict(cls, d: dict | None) -> HistogramClip | None:
        """The inverse of :meth:`to_dict`; ``None`` (no clip) stays ``None``."""
        return None if d is None else cls(min_count=int(d["min_count"]), bins=int(d["bins"]))

    def value(self, image: np.ndarray) -> float | None:
        """The clip value of ``image`` (any shape; its non-zero voxels count), or ``None`` if no bin qualifies."""
        fg = image[image != 0]
        if fg.size < self.min_count:
            return None
        counts, edges = np.histogram(fg.astype(np.float64, copy=False), bins=self.bins)
        full = np.flatnonzero(counts >= self.min_count)
        return None if full.size == 0 else float(edges[full[-1] + 1])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``image`` with its non-zero voxels above :meth:`value` set to it (a float32 copy; zeros stay 0)."""
        out = np.array(image, dtype=np.float32)
        top = self.value(out)
        if top is not None:
            np.minimum(out, np.float32(top), out=out, where=out != 0)
        return out


def zscore_foreground(image: np.ndarray) -> np.ndarray:
    """Z-score ``image`` over its non-zero voxels; zero voxels stay 0. Returns float32 of the same shape."""
    out = np.zeros(image.shape, dtype=np.float32)
    fg = image != 0
    if fg.any():
        vals = image[fg].astype(np.float64)
        out[fg] = (vals - vals.mean()) / max(float(vals.std()), 1e-8)
    return out


def _check_grid(case: Case, vol: Volume, ref: Volume, what: str) -> None:
    if vol.shape != ref.shape:
        raise DataError(
            f"case {case.case_id!r}: {what} ({vol.where}) has shape {vol.shape} but the reference image "
            f"({ref.where}) has {ref.shape}; all images and the label of a case must share one grid"
        )
    if not np.allclose(vol.affine, ref.affine, rtol=1e-3, atol=1e-2):  # io.check_same_grid's tolerances
        raise DataError(
            f"case {case.case_id!r}: {what} ({vol.where}) is not aligned with the reference image "
            f"({ref.where}): its affine differs; resample it onto the reference grid first"
        )


def _label_array(case: Case) -> np.ndarray | None:
    if case.label is None:
        return None
    lab = np.asarray(case.label.array)
    if lab.dtype.kind == "f" and not (np.all(np.isfinite(lab)) and np.array_equal(lab, np.round(lab))):
        raise DataError(f"case {case.case_id!r}: label {case.label.where} has non-integer values")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise DataError(
            f"case {case.case_id!r}: label {case.label.where} has values outside 0..255 "
            f"(min {lab.min()}, max {lab.max()})"
        )
    return lab.astype(np.uint8)


def preprocess_case(
    case: Case,
    modalities: Sequence[str],
    *,
    target_spacing: Sequence[float] | None,
    histogram_clip: HistogramClip | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, CaseGeometry]:
    """Reorient, resample, crop to the non-zero region and normalise (clip, z-score) one case.

    Args:
        case: the case; its images (and label) must share one grid.
        modalities: the modality order of the ``M`` axis; images of other modalities are left out (training
            on a subset of a dataset's modalities).
        target_spacing: voxel size in mm per *canonical* (RAS) axis, or ``None`` to keep the spacing.
        histogram_clip: clip each modality's bright tail before the z-score (:class:`HistogramClip`), or
            ``None`` for the plain z-score.

    Returns:
        ``image (M, *S) float32`` (zeros for missing modalities), ``label (*S) uint8`` or ``None``,
        ``available (M,) bool`` and the :class:`CaseGeometry` that :func:`restore_to_input_grid` inverts.
    """
    kept = {m: v for m, v in case.images.items() if m in modalities}
    if not kept:
        raise DataError(
            f"case {case.case_id!r}: has none of the selected modalities {list(modalities)} "
            f"(it has {list(case.images)}); select other modalities or leave the case out"
        )
    case = dataclasses.replace(case, images=kept)
    ref = case.reference
    for name, vol in case.images.items():
        _check_grid(case, vol, ref, f"modality {name!r}")
    if case.label is not None:
        _check_grid(case, case.label, ref, "the label")
    dims = ref.spatial_dims
    where = f"case {case.case_id!r} ({ref.where})"
    ornt = canonical_orientation(ref.affine, dims, where=where)
    perm = ornt[:, 0].astype(int)
    canonical_spacing = [0.0] * dims
    for axis, sp in zip(perm, ref.spacing, strict=True):
        canonical_spacing[axis] = sp
    present = [m for m in modalities if m in case.images]
    stack = np.stack([apply_orientation(np.asarray(case.images[m].array, np.float32), ornt) for m in present])
    label = _label_array(case)
    if label is not None:
        label = apply_orientation(label, ornt)
    canonical_shape = tuple(stack.shape[1:])

    if target_spacing is None:
        resampled_shape, target = canonical_shape, None
    else:
        target = tuple(float(s) for s in target_spacing)
        if len(target) != dims or min(target) <= 0:
            raise DataError(f"{where}: target_spacing {target} must have {dims} positive entries")
        resampled_shape = tuple(
            max(1, round(n * sp / t))
            for n, sp, t in zip(canonical_shape, canonical_spacing, target, strict=True)
        )
        stack = resample(stack, resampled_shape, order=1)
        if label is not None:
            label = resample_label(label, resampled_shape)

    crop = nonzero_bbox((stack != 0).any(axis=0))
    window = tuple(slice(a, b) for a, b in crop)
    image = np.zeros((len(modalities), *(b - a for a, b in crop)), dtype=np.float32)
    for row, m in enumerate(present):
        channel = stack[row][window]
        if histogram_clip is not None:
            channel = histogram_clip(channel)
        image[list(modalities).index(m)] = zscore_foreground(channel)
    if label is not None:
        label = np.ascontiguousarray(label[window])
    geometry = CaseGeometry(
        original_shape=ref.shape,
        original_affine=ref.affine.copy(),
        orientation=ornt,
        canonical_shape=canonical_shape,
        canonical_spacing=tuple(canonical_spacing),
        resampled_shape=resampled_shape,
        target_spacing=target,
        crop=crop,
    )
    return image, label, case.available(modalities), geometry


def restore_to_input_grid(array: np.ndarray, geometry: CaseGeometry, *, order: int) -> np.ndarray:
    """Map an array on the preprocessed grid back onto the input grid (inverse of :func:`preprocess_case`).

    Args:
        array: ``(*S)`` or ``(C, *S)`` on the preprocessed (cropped) grid, e.g. a label map or probabilities.
        geometry: the geometry :func:`preprocess_case` returned for this case.
        order: interpolation when the case was resampled: 0 for label maps (:func:`resample_label`),
            1 (linear) for probabilities or images, 3 (cubic).

    Returns:
        ``(*original_shape)`` or ``(C, *original_shape)``: un-cropped (zero outside the crop), resampled back
        to the canonical shape and reoriented to the input's voxel axes, so the input affine applies to it.
    """
    d = geometry.spatial_dims
    if array.ndim not in (d, d + 1) or tuple(array.shape[-d:]) != geometry.shape:
        raise ValueError(f"expected (*S) or (C, *S) with S = {geometry.shape}, got {tuple(array.shape)}")
    lead = array.shape[:-d]
    full = np.zeros((*lead, *geometry.resampled_shape), dtype=array.dtype)
    full[(..., *(slice(a, b) for a, b in geometry.crop))] = array
    if order == 0:
        full = resample_label(full, geometry.canonical_shape)
    else:
        full = resample(full, geometry.canonical_shape, order=order)
    identity = np.array([[i, 1.0] for i in range(d)])
    back = ornt_transform(identity, geometry.orientation)
    if lead:
        back = np.concatenate([[[i, 1.0] for i in range(len(lead))], back + [len(lead), 0]])
    out = np.ascontiguousarray(apply_orientation(full, back))
    if tuple(out.shape[-d:]) != geometry.original_shape:
        raise AssertionError(f"restored shape {out.shape} != original {geometry.original_shape}")
    return out
