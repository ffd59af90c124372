"""M2DN's intensity space: each case's modalities mapped to [-1, 1] by percentiles over its foreground.

Spec ``shared/methods/m2dn.md`` §2.5 (medmodal's choice; the paper's normalisation is unknown): per case and
modality, the 0.5 and 99.5 percentiles of the foreground (brain) voxels map to 0 and 1, values are clipped to
[0, 1], then ``x·2 − 1``; background is −1. The cache z-scores each modality, which is an affine map of the
input, so the percentile mapping of the cached arrays equals that of the input images.

The foreground is where an available modality is non-zero (skull-stripped data such as BraTS). When that is
(nearly) the whole image, as in the phantom whose air holds Rician noise, it is the voxels whose mean over the
available modalities lies above Otsu's threshold of that mean. :class:`CaseIntensity` holds both rules' values
per case, so any window of a case (a training patch, a slice) is mapped with its whole case's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: share of non-zero voxels above which "non-zero" no longer marks a foreground (noise-filled background).
NONZERO_IS_EVERYTHING = 0.99


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (1D): the cut maximising the between-class variance of a histogram."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


@dataclass(frozen=True)
class CaseIntensity:
    """One case's foreground rule and per-modality percentile range.

    Attributes:
        ranges: ``(M, 2)`` low and high percentile of each modality over the foreground (0, 1 for missing ones).
        threshold: ``None`` (foreground = an available modality is non-zero) or Otsu's threshold of the mean of
            the available modalities (foreground = above it).
    """

    ranges: np.ndarray
    threshold: float | None

    @classmethod
    def of_case(cls, image: np.ndarray, available: Sequence[bool], *,
                percentiles: tuple[float, float] = (0.5, 99.5)) -> CaseIntensity:
        """The statistics of a whole case ``image (M, *S)`` with presence ``available (M,)``."""
        avail = np.asarray(available, dtype=bool)
        if not avail.any():
            raise ValueError("a case needs at least one available modality")
        present = image[avail]
        nonzero = (present != 0).any(axis=0)
        threshold = None
        mask = nonzero
        if nonzero.mean() > NONZERO_IS_EVERYTHING:
            mean = present.mean(axis=0)
            threshold = otsu_threshold(mean)
            mask = mean > threshold
        ranges = np.tile(np.array([0.0, 1.0]), (len(avail), 1))
        if mask.any():
            for m in np.flatnonzero(avail):
                lo, hi = np.percentile(image[m][mask], percentiles)
                ranges[m] = (lo, hi if hi > lo else lo + 1e-6)
        return cls(ranges=ranges, threshold=threshold)

    def foreground(self, image: np.ndarray | torch.Tensor, available: Sequence[bool]) -> np.ndarray:
        """``(*S)`` bool foreground of a window ``image (M, *S)`` of this case."""
        x = np.asarray(image)
        avail = np.asarray(available, dtype=bool)
        present = x[avail]
        if self.threshold is None:
            return (present != 0).any(axis=0)
        return present.mean(axis=0) > self.threshold

    def to_model(self, image: np.ndarray, available: Sequence[bool]) -> np.ndarray:
        """``(M, *S)`` float32 in [−1, 1]: percentile-mapped inside the foreground, −1 outside and on missing
        channels."""
        x = np.asarray(image, dtype=np.float32)
        avail = np.asarray(available, dtype=bool)
        fg = self.foreground(x, avail)
        out = np.full(x.shape, -1.0, dtype=np.float32)
        for m in np.flatnonzero(avail):
            lo, hi = self.ranges[m]
            unit = np.clip((x[m] - lo) / (hi - lo), 0.0, 1.0)
            out[m] = np.where(fg, unit * 2.0 - 1.0, -1.0)
        return out


def to_unit(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Model space [−1, 1] → the [0, 1] scale on which metrics are computed and images written."""
    if isinstance(x, torch.Tensor):
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    return np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)


class UnitIntensityItems:
    """The data module's ``item_transform``: maps each item's image to model space with its case's statistics
    (computed once per case and process from the whole cached case)."""

    def __init__(self, *, percentiles: tuple[float, float] = (0.5, 99.5)) -> None:
        self.percentiles = tuple(percentiles)
        self._stats: dict[str, CaseIntensity] = {}

    def stats(self, index, case_id: str) -> CaseIntensity:  # noqa: ANN001 - a CacheIndex
        if case_id not in self._stats:
            case = next(c for c in index.cases if c.case_id == case_id)
            self._stats[case_id] = CaseIntensity.of_case(np.asarray(case.image()), case.available,
                                                         percentiles=self.percentiles)
        return self._stats[case_id]

    def __call__(self, index, item: dict) -> dict:  # noqa: ANN001 - a CacheIndex
        stats = self.stats(index, item["case_id"])
        available = np.asarray(item["available"], dtype=bool)
        item = dict(item)
        item["image"] = torch.from_numpy(stats.to_model(np.asarray(item["image"]), available))
        return item

    def __getstate__(self) -> dict:
        return {"percentiles": self.percentiles, "_stats": {}}
