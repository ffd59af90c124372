"""Input handling shared by the fusion functions, and the exact rater-pattern compression used by STAPLE.

Every voxel's decisions by K raters form a *pattern* (one label per rater). STAPLE's E- and M-steps depend on
a voxel only through its pattern, so running EM on the distinct patterns weighted by their voxel counts gives
exactly the same estimates as running it on every voxel, and is much faster when there are few distinct
patterns (at most ``base ** K``; for 10 binary raters at most 1024, whatever the image size).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

#: A ``(K, *spatial)`` stack of rater label maps, as a torch tensor or a numpy array.
LabelStack = torch.Tensor | np.ndarray

#: ``progress(done, total)``: called by long fusion work after each step (voxel chunk or EM pass).
Progress = Callable[[int, int], None]

#: Voxels (or rater patterns) per chunk of the fusion functions' per-voxel work: bounds their temporary memory
#: to a few ``VOXEL_CHUNK × L`` float64 arrays (32 MiB each for 117 labels), whatever the volume.
VOXEL_CHUNK = 1 << 15


def as_label_tensor(labels: LabelStack, *, name: str = "labels") -> torch.Tensor:
    """Return ``labels`` as a bool or integer tensor of shape ``(K, *S)`` with ``K >= 1`` and at least one voxel.

    Raises:
        TypeError: not a tensor/array, or a float/complex dtype (label maps hold integers).
        ValueError: fewer than 2 dimensions, no rater or no voxel.
    """
    if isinstance(labels, np.ndarray):
        array = labels
        if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch's uint16/32/64 support is partial
            if array.dtype.itemsize == 8 and array.size and int(array.max()) > np.iinfo(np.int64).max:
                raise ValueError(f"{name}: label values above {np.iinfo(np.int64).max} are not supported")
            array = array.astype(np.int64)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(labels, torch.Tensor):
        tensor = labels
    else:
        raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(labels).__name__}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise TypeError(f"{name}: expected bool or integer label maps, got {tensor.dtype}; round or cast them first")
    if tensor.ndim < 2 or tensor.shape[0] < 1 or tensor[0].numel() == 0:
        raise ValueError(
            f"{name}: expected shape (K, *spatial) with at least one rater and one voxel, got {tuple(tensor.shape)}"
        )
    return tensor


def as_binary_masks(masks: LabelStack, *, name: str = "masks") -> torch.Tensor:
    """Return ``(K, *S)`` binary masks as a bool tensor; integer masks must hold only 0 and 1.

    Raises:
        ValueError: an integer stack with a value other than 0 and 1 (the message lists the values found).
    """
    tensor = as_label_tensor(masks, name=name)
    if tensor.dtype == torch.bool:
        return tensor
    if ((tensor != 0) & (tensor != 1)).any():
        found = torch.unique(tensor)
        shown = ", ".join(str(v) for v in found[:10].tolist()) + (", ..." if found.numel() > 10 else "")
        raise ValueError(f"{name}: expected binary masks (values 0 and 1), found values {shown}")
    return tensor == 1


def compress_patterns(
    index: torch.Tensor, *, base: int, compress: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Distinct rater patterns of ``index`` with their voxel counts (exact; see the module docstring).

    Args:
        index: ``(K, N)`` integer or bool, rater k's label index at voxel n, each in ``[0, base)``.
        base: number of possible labels per rater (2 for binary masks).
        compress: ``False`` keeps every voxel as its own pattern (the dense reference path). When
            ``base ** K`` does not fit in 62 bits the rows are compared as byte strings (slower, same result).

    Returns:
        ``patterns (K, U)`` int64, ``counts (U,)`` float64 (voxels per pattern) and ``inverse (N,)`` int64
        mapping each voxel to its pattern (``None`` when uncompressed: pattern n is voxel n).
    """
    k_raters, n_voxels = index.shape
    if not compress:
        return index.long(), torch.ones(n_voxels, dtype=torch.float64, device=index.device), None
    if base**k_raters > 1 << 62:  # the pattern does not fit one int64: sort the (N, K) rows as byte strings
        small = index.to(torch.int16 if base <= 1 << 15 else torch.int32).T.contiguous().cpu().numpy()
        rows = small.view(np.dtype((np.void, small.dtype.itemsize * k_raters))).ravel()
        _, first, inverse_np, counts_np = np.unique(rows, return_index=True, return_inverse=True, return_counts=True)
        patterns = torch.from_numpy(small[first].T.astype(np.int64)).to(index.device)
        inverse = torch.from_numpy(inverse_np.reshape(-1).astype(np.int64)).to(index.device)
        return patterns, torch.from_numpy(counts_np.astype(np.float64)).to(index.device), inverse
    code = torch.zeros(n_voxels, dtype=torch.int64, device=index.device)
    for k in reversed(range(k_raters)):  # rater 0 is the least significant digit
        code = code * base + index[k].long()
    if base**k_raters <= max(4 * n_voxels, 1 << 20):  # few possible codes: count them instead of sorting
        all_counts = torch.bincount(code, minlength=base**k_raters)
        present = all_counts > 0
        unique = torch.nonzero(present).flatten()
        inverse = (torch.cumsum(present, 0) - 1)[code]
        counts = all_counts[unique]
    else:
        unique, inverse, counts = torch.unique(code, sorted=True, return_inverse=True, return_counts=True)
    patterns = torch.empty((k_raters, unique.numel()), dtype=torch.int64, device=index.device)
    for k in range(k_raters):
        patterns[k] = unique % base
        unique = unique // base
    return patterns, counts.to(torch.float64), inverse


def expand(values: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
    """Per-pattern ``values (U, ...)`` → per-voxel ``(N, ...)`` through :func:`compress_patterns`' inverse index."""
    return values if inverse is None else values[inverse]


def check_em_settings(*, max_iter: int, tol: float) -> None:
    """``ValueError`` unless ``max_iter >= 1`` and ``tol >= 0`` (NaN included)."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
