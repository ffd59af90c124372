"""Fuse label files on disk: read K candidate labels, validate them, fuse them, write the result on their grid.

Used by ``medmodal fuse``. Every user-facing problem (a missing or unreadable file, labels on different grids,
non-integer or non-binary values, an image with more distinct values than a label map would have, an existing
output) is a :class:`~medmodal.data.case.DataError` whose message names the file.

**Ties and the undecided label.** A multi-label majority vote can tie (two labels with the same number of
raters), and multi-label STAPLE can leave a voxel *undecided* (two labels share the largest posterior). By default
a tied vote takes the smallest tied label, and an undecided STAPLE voxel takes a label that is not a class:
the largest input label + 1 (ITK's convention). ``undecided_label=N`` writes ``N`` at those voxels instead (e.g.
0, background). The sidecar JSON next to the fused file records the rule, the label and the number of voxels.
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
from medmodal.fusion import MultiLabelStapleResult, StapleResult, multilabel_staple, staple, vote_mode
from medmodal.fusion._common import Progress

__all__ = ["DEFAULT_MAX_LABELS", "FuseResult", "fuse_label_files", "fusion_sidecar_path", "staple_sidecar_path"]

#: Default stopping tolerances of binary and multi-label STAPLE (ITK's).
_DEFAULT_TOL = {False: 1e-14, True: 1e-5}

#: Most distinct values a label file may hold (background included) unless the caller raises the limit. Every
#: common whole-brain atlas fits (AAL 117 / AAL3 171, FreeSurfer aparc+aseg ~113, Destrieux ~191, Brainnetome 247,
#: Schaefer-200), while an 8-bit intensity image, which uses most of 0..255, does not.
DEFAULT_MAX_LABELS = 250

_UNDECIDED_TEXT = (
    "Voxels where two or more labels share the largest STAPLE posterior (or no label is possible) are undecided. "
    "They hold undecided_label: by default the largest input label + 1 (ITK's convention), which is not a class; "
    "relabel them, or fuse again with --undecided-label N to write label N (e.g. 0) there instead."
)
_TIES_TEXT = {
    None: "Voxels where two or more labels got the same, largest number of votes take the smallest tied label "
          "(binary masks: an even split is background).",
    "label": "Voxels where two or more labels got the same, largest number of votes hold undecided_label "
             "(--undecided-label).",
}


@dataclass(frozen=True)
class FuseResult:
    """What :func:`fuse_label_files` did.

    Attributes:
        method: ``"majority"`` or ``"staple"``.
        multilabel: whether the labels were fused as multi-label maps (else as binary masks).
        paths: the K input label files, in rater order.
        out: the fused label file.
        probability_out: the probability map written, if any.
        sidecar: the JSON sidecar written next to ``out`` (:func:`fusion_sidecar_path`).
        shape: the grid shape.
        foreground_voxels: voxels with a non-zero fused label.
        staple: the STAPLE estimates (``None`` for the majority vote).
        tied_voxels: majority vote: voxels whose vote was tied.
        undecided_label: the label written at tied (majority) or undecided (multi-label STAPLE) voxels; ``None``
            for the smallest tied label (majority) and for binary STAPLE.
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
    tied_voxels: int = 0
    undecided_label: int | None = None


def fusion_sidecar_path(out: Path, method: str) -> Path:
    """``<out name without its image ending>.<method>.json`` next to ``out``.

    ``fused.nii.gz`` → ``fused.staple.json`` (STAPLE) or ``fused.majority.json`` (majority vote).
    """
    name = out.name
    ending = next((e for e in WRITE_EXTENSIONS if name.lower().endswith(e)), out.suffix)
    return out.with_name(f"{name[: len(name) - len(ending)]}.{method}.json")


def staple_sidecar_path(out: Path) -> Path:
    """The STAPLE sidecar of ``out``: :func:`fusion_sidecar_path` with ``"staple"``."""
    return fusion_sidecar_path(out, "staple")


def _check_output(path: Path, *, overwrite: bool, what: str, image: bool = True) -> None:
    if image and not path.name.lower().endswith(WRITE_EXTENSIONS):
        raise DataError(f"{path}: the {what} must end in one of {', '.join(WRITE_EXTENSIONS)}")
    if path.exists() and not overwrite:
        raise DataError(f"{path}: exists already; pass --overwrite to replace it")


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


def _check_label_count(paths: Sequence[Path], arrays: Sequence[np.ndarray], *, max_labels: int) -> None:
    """:class:`DataError` naming the file when a file (or all files together) holds more than ``max_labels`` values."""
    found = [np.unique(a) for a in arrays]
    for path, values in zip(paths, found, strict=True):
        if values.size > max_labels:
            raise DataError(
                f"{path}: holds {values.size} distinct values ({values[0]}..{values[-1]}), more than --max-labels "
                f"{max_labels}; it looks like an intensity image, not a label map. Pass label maps, or raise "
                "--max-labels if it really has that many labels"
            )
    union = np.unique(np.concatenate(found))
    if union.size > max_labels:
        raise DataError(
            f"the label files hold {union.size} distinct values together ({', '.join(str(p) for p in paths)}), "
            f"more than --max-labels {max_labels}; check they use one labelling, or raise --max-labels"
        )


def _read_labels(
    paths: Sequence[Path], *, multilabel: bool | None, max_labels: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Read and check the K labels → ``(K, *S)`` compact integer stack, the affine, and whether multi-label."""
    volumes = {f"rater {k} label": read_image(p) for k, p in enumerate(paths, 1)}
    check_same_grid(volumes, case_id="labels to fuse")
    arrays = [_integer_labels(v) for v in volumes.values()]
    _check_label_count(paths, arrays, max_labels=max_labels)
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


def _staple_sidecar(paths: Sequence[Path], result: StapleResult | MultiLabelStapleResult, *, max_iter: int,
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
            "undecided_label_is_a_class": result.undecided_label in labels, "undecided": _UNDECIDED_TEXT,
            "confusion_layout": "rows: true label, columns: the rater's label (labels order)", "raters": raters}


def _majority(
    labels: torch.Tensor, *, undecided_label: int | None, progress: Progress | None
) -> tuple[np.ndarray, int]:
    """Majority vote of ``(K, *S)`` labels (bool masks or integer maps) → fused array and the tied voxel count."""
    if labels.dtype == torch.bool:
        votes = labels.sum(0, dtype=torch.int64) * 2
        tied = votes == labels.shape[0]
        fused = (votes > labels.shape[0]).to(torch.int64)
    else:
        fused, tied = vote_mode(labels, progress=progress)
        fused = fused.to(torch.int64)
    if undecided_label is not None:
        fused = torch.where(tied, undecided_label, fused)
    return fused.numpy(), int(tied.sum())


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
    max_labels: int = DEFAULT_MAX_LABELS,
    undecided_label: int | None = None,
    progress: Progress | None = None,
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
        max_labels: refuse a file (or a set of files) with more distinct values than this: an intensity image
            passed by mistake (see :data:`DEFAULT_MAX_LABELS`).
        undecided_label: the label written where a vote is tied (majority) or STAPLE is undecided (multi-label);
            ``None``: the smallest tied label (majority) or the largest label + 1 (STAPLE). Not used by binary
            STAPLE, which has no undecided voxels.
        progress: ``progress(done, total)`` after each voxel chunk (majority) or EM pass (multi-label STAPLE).

    Returns:
        A :class:`FuseResult`. A JSON sidecar ``<out name>.<method>.json`` is written next to ``out``: for STAPLE,
        each rater's file and sensitivity/specificity (binary) or confusion matrix (multi-label), the prior,
        iterations, convergence and the undecided label; for the majority vote, the files, the tie rule, the
        label written at ties and their number.

    Raises:
        DataError: fewer than 2 files, a missing/unreadable file, NaN or non-integer values, more than
            ``max_labels`` distinct values, labels on different grids, non-binary values with
            ``multilabel=False``, a bad option, or an existing output without ``overwrite``.
    """
    paths = tuple(Path(p) for p in paths)
    out = Path(out)
    if method not in ("majority", "staple"):
        raise DataError(f"method: expected 'majority' or 'staple', got {method!r}")
    if len(paths) < 2:
        raise DataError(f"fusing needs at least 2 label files, got {len(paths)}: {', '.join(map(str, paths))}")
    if max_iter < 1:
        raise DataError(f"--max-iter must be at least 1, got {max_iter}")
    if max_labels < 2:
        raise DataError(f"--max-labels must be at least 2, got {max_labels}")
    if undecided_label is not None and not np.iinfo(np.int32).min <= undecided_label <= np.iinfo(np.int32).max:
        raise DataError(f"--undecided-label must fit in int32, got {undecided_label}")
    _check_output(out, overwrite=overwrite, what="output")
    sidecar = fusion_sidecar_path(out, method)
    _check_output(sidecar, overwrite=overwrite, what="sidecar", image=False)
    if probability_out is not None:
        probability_out = Path(probability_out)
        if method != "staple":
            raise DataError(f"{probability_out}: a probability map needs --method staple (majority gives none)")
        if probability_out.resolve() == out.resolve():
            raise DataError(f"{out}: the probability map and the fused label need two different files")
        _check_output(probability_out, overwrite=overwrite, what="probability map")

    stack, affine, is_multilabel = _read_labels(paths, multilabel=multilabel, max_labels=max_labels)
    if undecided_label is not None and method == "staple" and not is_multilabel:
        raise DataError("--undecided-label is used by --method majority and by multi-label STAPLE; binary STAPLE "
                        "thresholds its probability at 0.5 and leaves no voxel undecided")
    labels = torch.from_numpy(stack) if is_multilabel else torch.from_numpy(stack == 1)
    result: StapleResult | MultiLabelStapleResult | None = None
    tied_voxels = 0
    if method == "majority":
        fused, tied_voxels = _majority(labels, undecided_label=undecided_label, progress=progress)
        rule = "smallest tied label" if undecided_label is None else "undecided_label"
        record = {"method": "majority", "multilabel": is_multilabel, "files": [str(p) for p in paths],
                  "ties": rule, "undecided_label": undecided_label, "tied_voxels": tied_voxels,
                  "tie_rule": _TIES_TEXT[None if undecided_label is None else "label"]}
    else:
        tol = _DEFAULT_TOL[is_multilabel] if tol is None else tol
        if is_multilabel:
            result = multilabel_staple(labels, max_iter=max_iter, tol=tol, undecided=undecided_label,
                                       progress=progress)
            probability = result.confidence
            undecided_label = result.undecided_label
        else:
            result = staple(labels, max_iter=max_iter, tol=tol)
            probability = result.probability
        fused = result.fused.numpy()
        if probability_out is not None:
            write_image(Volume(probability.numpy().astype(np.float32), affine), probability_out)
        record = _staple_sidecar(paths, result, max_iter=max_iter, tol=tol)
    fused = fused.astype(np.uint8) if fused.dtype == bool else fused
    write_image(Volume(fused, affine), out, dtype=compact_int_dtype(fused))
    atomic_write_text(sidecar, json.dumps(record, indent=2) + "\n")
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
        tied_voxels=tied_voxels,
        undecided_label=undecided_label,
    )
