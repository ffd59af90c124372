"""The data contract: images on a grid, cases with named modalities, and batches with an availability mask.

Conventions (see ``shared/DESIGN.md``):

* A :class:`Volume` holds an array whose axes are the voxel axes of its ``affine`` (nibabel's convention:
  ``world_ras = affine @ [i, j, k, 1]``), so a 3D volume is ``(X, Y, Z)`` and a 2D image is ``(X, Y)``.
  ``spacing`` has one entry per array axis, in millimetres.
* A :class:`Case` has *any subset* of the dataset's modalities. A missing modality is simply absent from
  ``images``; it is never a zero image.
* A :class:`Batch` stacks modalities as ``(B, M, *spatial)`` in the dataset's fixed modality order with
  ``available: (B, M) bool``. Missing channels hold zeros and no network may read them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

#: BraTS contrasts in the order medmodal uses by default.
BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
#: BraTS label values: 0 background, 1 necrosis / non-enhancing core, 2 oedema, 4 enhancing tumour.
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
#: BraTS evaluation regions, each a set of label values (whole tumour, tumour core, enhancing tumour).
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}


class DataError(ValueError):
    """A problem with the user's data. The message names the file or field and says what to do."""


@dataclass
class Volume:
    """An image or label map on a grid.

    Args:
        array: ``(X, Y)`` or ``(X, Y, Z)`` voxel array, axes in the order of ``affine``'s voxel axes.
        affine: ``(4, 4)`` voxel-to-world (RAS+, mm) matrix; a 2D image uses the 3D affine of a one-slice volume.
        path: the file it came from, for error messages (``None`` for generated data).
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    path: Path | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise DataError(f"{self.where}: affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim not in (2, 3):
            raise DataError(f"{self.where}: expected a 2D or 3D image, got shape {self.array.shape}")

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory volume>"

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        sp = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in sp[: self.array.ndim])


@dataclass
class Case:
    """One subject: any subset of the dataset's modalities, plus optional targets.

    Args:
        case_id: unique identifier, used in file names and reports.
        images: modality name → :class:`Volume`, only for modalities present on disk.
        label: integer segmentation map on the same grid as the images, or ``None`` (unlabelled case).
        target: class index for classification tasks (into :attr:`DatasetInfo.class_names` when the dataset
            names its classes), or ``None`` (no class label).
        report: a free-text report, or ``None``.
        source: the site, scanner or data set the case comes from (a domain, e.g. for cross-source
            evaluation), or ``None``.
    """

    case_id: str
    images: dict[str, Volume]
    label: Volume | None = None
    target: int | None = None
    report: str | None = None
    source: str | None = None

    def available(self, modalities: Sequence[str]) -> np.ndarray:
        """``(M,) bool``: which of ``modalities`` (the dataset's fixed order) this case has."""
        return np.array([m in self.images for m in modalities], dtype=bool)

    @property
    def reference(self) -> Volume:
        """The grid every image (and the label) of this case lives on: the first present modality."""
        if not self.images:
            raise DataError(f"case {self.case_id!r}: no modality is present; at least one image is required")
        return next(iter(self.images.values()))


@dataclass
class CaseRecord:
    """Where a case lives on disk, before it is read (what dataset formats return).

    Args:
        case_id: unique identifier.
        images: modality name → file (or DICOM series folder), only for modalities that exist.
        label: segmentation file, or ``None``.
        target: class index, or ``None``.
        report: report text, or ``None``.
        source: the site, scanner or data set the case comes from, or ``None``.
    """

    case_id: str
    images: dict[str, Path]
    label: Path | None = None
    target: int | None = None
    report: str | None = None
    source: str | None = None


@dataclass
class DatasetInfo:
    """What a dataset declares about itself.

    Args:
        name: a short name for reports.
        modalities: the fixed modality order used for the ``M`` axis of every batch.
        labels: the label values that may appear in segmentation maps (0 = background).
        regions: evaluation regions, each a tuple of label values (BraTS: WT, TC, ET).
        synthetic: True for the generated phantom; every report that uses it says so.
        label_map: value stored in the label files → label value, for layouts that store other values than
            ``labels`` (nnU-Net needs consecutive 0..K-1, so BraTS 4 is stored as 3; a lung mask stored 0/255 is
            ``{0: 0, 255: 1}``); ``None`` = stored as is.
        class_names: the names of the classification classes, ``target`` being an index into them (the chest
            X-ray phantom's are ``("normal", "opacity")``); ``None`` when the dataset does not name them.
    """

    name: str
    modalities: tuple[str, ...]
    labels: tuple[int, ...] = BRATS_LABELS
    regions: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(BRATS_REGIONS))
    synthetic: bool = False
    label_map: dict[int, int] | None = None
    class_names: tuple[str, ...] | None = None

    def check_modalities(self, names: Sequence[str], *, where: str) -> None:
        """Raise :class:`DataError` naming ``where`` if any of ``names`` is not one of this dataset's modalities."""
        unknown = [n for n in names if n not in self.modalities]
        if unknown:
            raise DataError(
                f"{where}: unknown modality name(s) {unknown}; this dataset has {list(self.modalities)}"
            )


@dataclass
class Batch:
    """A stacked mini-batch (what every training system and network entry point receives).

    Attributes:
        image: ``(B, M, *spatial)`` float; channels of missing modalities hold zeros and must not be read.
        available: ``(B, M)`` bool, True where the modality is present. Every row has at least one True.
        modalities: the names of the ``M`` channels, in order.
        label: ``(B, 1, *spatial)`` long label map, or ``None``.
        target: ``(B,)`` long class targets, or ``None``.
        case_id: the ``B`` case identifiers.
        weight: ``(B,)`` float sample weights, or ``None`` (all 1). A weight of 0 marks a padding sample that
            multi-process validation adds so that every rank runs the same number of steps; it counts nothing.
    """

    image: torch.Tensor
    available: torch.Tensor
    modalities: tuple[str, ...]
    label: torch.Tensor | None = None
    target: torch.Tensor | None = None
    case_id: list[str] = field(default_factory=list)
    weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, m = self.image.shape[:2]
        if self.available.shape != (b, m):
            raise ValueError(f"available must be (B, M) = {(b, m)}, got {tuple(self.available.shape)}")
        if len(self.modalities) != m:
            raise ValueError(f"{m} image channels but {len(self.modalities)} modality names")
        if self.available.dtype != torch.bool:
            raise TypeError(f"available must be a bool tensor, got {self.available.dtype}")
        if not bool(self.available.any(dim=1).all()):
            raise DataError("every sample needs at least one available modality; a row of `available` is empty")

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            image=self.image.to(device, non_blocking=True),
            available=self.available.to(device, non_blocking=True),
            modalities=self.modalities,
            label=mv(self.label),
            target=mv(self.target),
            case_id=list(self.case_id),
            weight=mv(self.weight),
        )

    def __len__(self) -> int:
        return int(self.image.shape[0])


def collate(samples: Sequence[Mapping[str, object]], modalities: Sequence[str]) -> Batch:
    """Stack samples ``{"image": (M, *S), "available": (M,), "label"?: (1, *S), "target"?, "case_id",
    "weight"?}``."""
    image = torch.stack([torch.as_tensor(s["image"]) for s in samples])
    available = torch.stack([torch.as_tensor(s["available"], dtype=torch.bool) for s in samples])
    label = None
    if all(s.get("label") is not None for s in samples):
        label = torch.stack([torch.as_tensor(s["label"]).long() for s in samples])
    target = None
    if all(s.get("target") is not None for s in samples):
        target = torch.as_tensor([int(s["target"]) for s in samples], dtype=torch.long)  # type: ignore[arg-type]
    weight = None
    if any("weight" in s for s in samples):
        weight = torch.as_tensor([float(s.get("weight", 1.0)) for s in samples], dtype=torch.float32)  # type: ignore[arg-type]
    return Batch(
        image=image.float(),
        available=available,
        modalities=tuple(modalities),
        label=label,
        target=target,
        case_id=[str(s.get("case_id", "")) for s in samples],
        weight=weight,
    )
