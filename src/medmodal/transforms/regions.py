"""Label maps to overlapping evaluation regions (BraTS: WT ⊃ TC ⊃ ET) and back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def labels_to_regions(label: torch.Tensor, regions: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """``label (B, 1, *S)`` integer map → ``(B, R, *S)`` float one-hot of each region (a set of label values)."""
    if label.ndim < 3 or label.shape[1] != 1:
        raise ValueError(f"label must be (B, 1, *S), got {tuple(label.shape)}")
    chans = [torch.isin(label[:, 0], torch.as_tensor(list(v), device=label.device)) for v in regions.values()]
    return torch.stack(chans, dim=1).float()


def regions_to_labels(
    regions_mask: torch.Tensor, regions: Mapping[str, Sequence[int]]
) -> torch.Tensor:
    """``(B, R, *S)`` bool region masks → ``(B, 1, *S)`` label map.

    Regions are painted from the largest label set to the smallest, each with the label value the smaller
    regions do not claim (BraTS: WT → 2, TC → 1, ET → 4), so nested regions map back to the original labels.
    """
    order = sorted(range(len(regions)), key=lambda i: -len(list(regions.values())[i]))
    sets = [set(v) for v in regions.values()]
    out = torch.zeros((regions_mask.shape[0], 1, *regions_mask.shape[2:]), dtype=torch.long,
                      device=regions_mask.device)
    for i in order:
        inner = set().union(*(s for j, s in enumerate(sets) if j != i and s < sets[i]))
        own = sorted(sets[i] - inner) or sorted(sets[i])
        out[:, 0][regions_mask[:, i].bool()] = own[0]
    return out


def drop_small_region(pred: torch.Tensor, *, channel: int, min_voxels: int) -> torch.Tensor:
    """Clear region ``channel`` of every sample whose predicted region has fewer than ``min_voxels`` voxels.

    The "ShaSpec*" post-processing (Wang et al., CVPR 2023; released ``postprocess.py``): an enhancing tumour
    smaller than a threshold (500 voxels there) is relabelled as necrosis, i.e. removed from ET and kept in TC
    and WT, which still contain it.

    Shapes: ``pred (B, R, *S) bool`` → same (a copy).
    """
    out = pred.clone()
    sizes = pred[:, channel].flatten(1).sum(1)
    out[sizes < min_voxels, channel] = False
    return out
