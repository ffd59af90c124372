"""Fuse label files on disk: read K candidate labels, validate them, fuse them, write the result on their grid.

Used by ``medmodal fuse``. Every user-facing problem (a missing or unreadable file, labels on different grids,
non-integer or non-binary values, an existing output) is a :class:`~medmodal.data.case.DataError` whose
message names the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medmodal.atomic import atomic_write_text
from medmodal.data.case import DataError, Volume
from medmodal.data.io import WRITE_EXTENSIONS, check_same_grid, compact_int_dtype, read_image, write_image
from medmodal.fusion import MultiLabelStapleResult, StapleResult, majority_vote, multilabel_staple, staple

__all__ = ["FuseResult", "fuse_label_files", "staple_sidecar_path"]

#: Default stopping tolerances of binary and multi-label STAPLE (ITK's).
_DEFAULT_TOL = {False: 1e-14, True: 1e-5}


@dataclass(frozen=True)
class FuseResult:
    """What :func:`fuse_label_files` did.

    Attributes:
        method: ``"majority"`` or ``"staple"``.
        multilabel: whether the labels were fused as multi-label maps (else as binary masks).
        paths: the K input label files, in rater order.
        out: the fused label file.
        probability_out: the probability map written, if any.
        sidecar: the STAPLE JSON sidecar written, if any.
        shape: the grid shape.
        foreground_voxels: voxels with a non-zero fused label.
        staple: the STAPLE estimates (``None`` for the majority vote).
    """

    method: str
    multilabel: bool
    paths: tuple[Path, ...]
    out: Path
    probability_out: Path | None
    sidecar: Path | None
    shape: tuple[int, ...]
    foreground_voxels: int
    staple: StapleResult | MultiLabelStapleResult | None


def staple_sidecar_path(out: Path) -> Path:
    """``<out name without its image ending>.staple.json`` next to ``out``: ``fused.nii.gz`` → ``fused.staple.json``."""
    name = out.name
    ending = next((e for e in WRITE_EXTENSIONS if name.lower().endswith(e)), out.suffix)
    return out.with_name(name[: len(name) - len(ending)] + ".staple.json")


def _check_output(path: Path, *, overwrite: bool, what: str) -> None:
    if not path.name.lower().endswith(WRITE_EXTENSIONS):
        raise DataError(f"{path}: the {what} must end in one of {', '.join(WRITE_EXTENSIONS)}")
    if path.exists() and not overwrite:
        raise DataError(f"{path}: exists already; pass --overwrite (overwrite=True) to replace it")


def _integer_labels(volume: Volume) -> np.ndarray:
    """The label array as integers; :class:`DataError` naming the file for non-integer values."""
    array = volume.array
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind == "f":  # read_image already refused NaN/inf
        fractional = array[array != np.round(array)]
        if fractional.size:
            raise DataError(f"{volume.where}: has non-integer values (e.g. {float(fractional[0]):g}); a label map "
                            "must hold integer class values (is it a probability map or an image?)")
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise DataError(f"{volume.where}: label values outside the int32 range are not supported")
        return array.astype(np.int32)
    if array.dtype.kind not in "iu":
        raise DataError(f"{volume.where}: has dtype {array.dtype}; a label map must hold integer class values")
    return array


def _values_text(array: np.ndarray) -> str:
    values = np.unique(array)
    shown = ", ".join(str(v) for v in values[:10].tolist())
    return f"{shown}, ... ({values.size} values)" if values.size > 10 else shown


def _read_labels(paths: Sequence[Path], *, multilabel: bool | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Read and check the K labels → ``(K, *S)`` compact integer stack, the affine, and whether multi-label."""
    volumes = {f"rater {k} label": read_image(p) for k, p in enumerate(paths, 1)}
    check_same_grid(volumes, case_id="labels to fuse")
    arrays = [_integer_labels(v) for v in volumes.values()]
    binary = [bool(np.all((a == 0) | (a == 1))) for a in arrays]
    if multilabel is False and not all(binary):
        k = binary.index(False)
        raise DataError(f"{paths[k]}: holds the values {_values_text(arrays[k])}, but binary fusion needs 0/1 masks; "
                        "pass --multilabel to fuse label maps, or binarise the file")
    lo = min(int(a.min()) for a in arrays)
    hi = max(int(a.max()) for a in arrays)
    dtype = compact_int_dtype(np.array([lo, hi]))
    stack = np.stack([a.astype(dtype, copy=False) for a in arrays])
    first = next(iter(volumes.values()))
    return stack, first.affine, (not all(binary)) if multilabel is None else multilabel


def _sidecar(paths: Sequence[Path], result: StapleResult | MultiLabelStapleResult, *, max_iter: int,
             tol: float) -> dict:
    common = {"method": "staple", "iterations": result.iterations, "converged": result.converged,
              "max_iter": max_iter, "tol": tol}
    if isinstance(result, StapleResult):
        raters = [{"file": str(p), "sensitivity": float(s), "specificity": float(q)}
                  for p, s, q in zip(paths, result.sensitivity.tolist(), result.specificity.tolist(), strict=True)]
        return {**common, "multilabel": False, "prior": result.prior, "raters": raters}
    labels = result.labels.tolist()
    raters = [{"file": str(p), "confusion": c.tolist(),
               "agreement": {str(v): float(c[i, i]) for i, v in enumerate(labels)}}
              for p, c in zip(paths, result.confusion, strict=True)]
    return {**common, "multilabel": True, "labels": labels, "prior": result.prior.tolist(),
            "undecided_label": result.undecided_label, "undecided_voxels": int(result.undecided.sum()),
            "confusion_layout": "rows: true label, columns: the rater's label (labels order)", "raters": raters}


def fuse_label_files(
    paths: Sequence[Path],
    *,
    method: Literal["majority", "staple"],
    out: Path,
    overwrite: bool = False,
    probability_out: Path | None = None,
    multilabel: bool | None = None,
    max_iter: int = 200,
    tol: float | None = None,
) -> FuseResult:
    """Fuse K label files (raters, registered atlases) into one label file on the same grid.

    Args:
        paths: K >= 2 label files (NIfTI, NRRD, MetaImage, DICOM) on one voxel grid, 2D or 3D.
        method: ``"majority"`` (:func:`~medmodal.fusion.majority_vote`; binary ties → background, multi-label
            ties → the smallest label) or ``"staple"`` (:func:`~medmodal.fusion.staple` /
            :func:`~medmodal.fusion.multilabel_staple`, the latter writing undecided voxels as the largest
            label + 1).
        out: the fused label file, written atomically in a compact integer dtype with the first input's affine.
        overwrite: replace existing ``out`` / ``probability_out``.
        probability_out: STAPLE only: a float32 map of the foreground probability (binary) or of the posterior
            probability of the most probable label (multi-label).
        multilabel: fuse label maps (``True``) or 0/1 masks (``False``); ``None``: binary iff every value is 0/1.
        max_iter: STAPLE's iteration limit.
        tol: STAPLE's stopping tolerance; ``None``: 1e-14 (binary) or 1e-5 (multi-label), as ITK.

    Returns:
        A :class:`FuseResult`. STAPLE also writes ``<out name>.staple.json`` with each rater's file and
        sensitivity/specificity (binary) or confusion matrix (multi-label), the prior, iterations and
        convergence.

    Raises:
        DataError: fewer than 2 files, a missing/unreadable file, NaN or non-integer values, labels on different
            grids, non-binary values with ``multilabel=False``, a bad option, or an existing output without
            ``overwrite``.
    """
    paths = tuple(Path(p) for p in paths)
    out = Path(out)
    if method not in ("majority", "staple"):
        raise DataError(f"method: expected 'majority' or 'staple', got {method!r}")
    if len(paths) < 2:
        raise DataError(f"fusing needs at least 2 label files, got {len(paths)}: {', '.join(map(str, paths))}")
    if max_iter < 1:
        raise DataError(f"--max-iter must be at least 1, got {max_iter}")
    _check_output(out, overwrite=overwrite, what="output")
    if probability_out is not None:
        probability_out = Path(probability_out)
        if method != "staple":
            raise DataError(f"{probability_out}: a probability map needs --method staple (majority gives none)")
        if probability_out.resolve() == out.resolve():
            raise DataError(f"{out}: the probability map and the fused label need two different files")
        _check_output(probability_out, overwrite=overwrite, what="probability map")

    stack, affine, is_multilabel = _read_labels(paths, multilabel=multilabel)
    labels = torch.from_numpy(stack) if is_multilabel else torch.from_numpy(stack == 1)
    result: StapleResult | MultiLabelStapleResult | None = None
    sidecar = None
    if method == "majority":
        fused = majority_vote(labels).numpy()
    else:
        tol = _DEFAULT_TOL[is_multilabel] if tol is None else tol
        if is_multilabel:
            result = multilabel_staple(labels, max_iter=max_iter, tol=tol)
            probability = result.probability.max(0).values
        else:
            result = staple(labels, max_iter=max_iter, tol=tol)
            probability = result.probability
        fused = result.fused.numpy()
        if probability_out is not None:
            write_image(Volume(probability.numpy().astype(np.float32), affine), probability_out)
        sidecar = staple_sidecar_path(out)
        atomic_write_text(sidecar, json.dumps(_sidecar(paths, result, max_iter=max_iter, tol=tol), indent=2) + "\n")
    fused = fused.astype(np.uint8) if fused.dtype == bool else fused
    write_image(Volume(fused, affine), out, dtype=compact_int_dtype(fused))
    return FuseResult(
        method=method,
        multilabel=is_multilabel,
        paths=paths,
        out=out,
        probability_out=probability_out,
        sidecar=sidecar,
        shape=tuple(stack.shape[1:]),
        foreground_voxels=int(np.count_nonzero(fused)),
        staple=result,
    )
