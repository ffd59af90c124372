"""The fast all-subset path (windows and subsets batched, encode once) gives the per-subset path's numbers."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from medmodal.evaluation.inference import auto_window_batch, nonempty_subsets, predict_subsets, subset_masks
from medmodal.evaluation.metrics import region_metrics
from medmodal.evaluation.subsets import evaluate_subsets, subset_name
from medmodal.networks.registry import create_network
from medmodal.transforms import labels_to_regions

MODS = ("t1", "t1c", "t2", "flair")
REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
SHAPES = {3: ((17, 18, 19), (8, 8, 8)), 2: ((37, 29), (12, 12))}
# Tolerance of the fast path against the per-subset one: float32 rounding of differently batched kernels.
ATOL = 1e-5


@dataclass
class _Case:
    """The part of a cached case that :func:`evaluate_subsets` reads."""

    case_id: str
    array: np.ndarray
    target: np.ndarray
    available: tuple[bool, ...]
    geometry: Any

    def image(self) -> np.ndarray:
        return self.array

    def label(self) -> np.ndarray:
        return self.target


def _per_subset(net: torch.nn.Module, image: torch.Tensor, masks: torch.Tensor, **kw: Any) -> torch.Tensor:
    """The slow reference: one sweep per subset, one window per call, one forward per mask."""
    return torch.cat([predict_subsets(net, image, masks[k : k + 1], sw_batch_size=1, one_pass=False, **kw)
                      for k in range(len(masks))])


def _network(name: str, dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_network(name, spatial_dims=dims, modalities=MODS, out_channels=3).eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["shaspec_tiny", "unet_tiny"])
@pytest.mark.parametrize("blend", ["mean_prob", "gaussian_logits"])
def test_fast_path_gives_the_per_subset_logits(name: str, dims: int, blend: str) -> None:
    net = _network(name, dims)
    shape, roi = SHAPES[dims]
    image = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(1))
    masks = subset_masks(MODS, nonempty_subsets(MODS))
    kw = dict(roi_size=roi, overlap=1 / 3, blend=blend)
    fast = predict_subsets(net, image, masks, **kw)
    slow = _per_subset(net, image, masks, **kw)
    assert fast.shape == (15, 3, *shape)
    torch.testing.assert_close(fast.sigmoid(), slow.sigmoid(), atol=ATOL, rtol=0)
    torch.testing.assert_close(fast, slow, atol=10 * ATOL, rtol=ATOL)
    channels_last = predict_subsets(net, image, masks, channels_last=True, **kw)
    torch.testing.assert_close(channels_last.sigmoid(), slow.sigmoid(), atol=ATOL, rtol=0)
    fast.add_(1.0)  # a plain tensor: callers may modify it in place


@pytest.mark.parametrize("name", ["shaspec_tiny", "unet_tiny"])
def test_the_memory_guard_splits_windows_and_subsets_without_changing_the_logits(name: str) -> None:
    net = _network(name, 3)
    shape, roi = SHAPES[3]
    image = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(2))
    masks = subset_masks(MODS, nonempty_subsets(MODS))
    calls: list[int] = []
    hook = net.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    # 4 window-subset samples of 8³ per call: one window per sweep step, its 15 subsets in calls of 4, 4, 4, 3
    small = predict_subsets(net, image, masks, roi_size=roi, max_batch_voxels=4 * 8**3)
    hook.remove()
    assert auto_window_batch(shape, roi, 1 / 3, 15, max_voxels=4 * 8**3) == 1
    if name == "unet_tiny":  # (ShaSpec encodes once and decodes through its own methods, not forward)
        assert max(calls) == 4 and len(calls) == 36 * 4
    big = predict_subsets(net, image, masks, roi_size=roi)
    torch.testing.assert_close(small.sigmoid(), big.sigmoid(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["shaspec_tiny", "unet_tiny"])
def test_fast_evaluation_gives_the_per_subset_dice_table(name: str, dims: int) -> None:
    net = _network(name, dims)
    shape, roi = SHAPES[dims]
    rng = np.random.default_rng(3)
    spacing = (1.0, 1.5, 2.0)[:dims]
    cases = []
    for i, available in enumerate([(True,) * 4, (True, False, True, True)]):  # the second case lacks t1c
        array = rng.normal(size=(4, *shape)).astype(np.float32)
        array[~np.array(available)] = 0.0
        target = np.zeros(shape, dtype=np.int64)
        target[tuple(slice(2, s - 3) for s in shape)] = 2
        target[tuple(slice(4, s - 6) for s in shape)] = 1
        target[tuple(slice(5, s - 8) for s in shape)] = 4
        cases.append(_Case(f"c{i}", array, target, available, SimpleNamespace(spacing=spacing)))
    rows = evaluate_subsets(net, cases, modalities=MODS, regions=REGIONS, roi_size=roi, progress=False)

    subsets = nonempty_subsets(MODS)
    masks = subset_masks(MODS, subsets)
    expected = {}
    for case in cases:
        ok = [k for k in range(15) if all(case.available[j] for j in range(4) if masks[k, j])]
        slow = _per_subset(net, torch.from_numpy(case.array)[None], masks[ok], roi_size=roi, overlap=1 / 3)
        target = labels_to_regions(torch.from_numpy(case.target)[None, None], REGIONS)
        dice, hd = region_metrics(slow.sigmoid() > 0.5, target, spacing=spacing)
        for row, k in enumerate(ok):
            for r, region in enumerate(REGIONS):
                expected[case.case_id, subset_name(subsets[k]), region] = (float(dice[row, r]), float(hd[row, r]))
    got = {(r.case_id, r.subset, r.region): (r.dice, r.hd95) for r in rows}
    assert len(got) == 3 * (15 + 7)  # 7 subsets avoid t1c
    assert got.keys() == expected.keys()
    for key, (dice, hd) in expected.items():
        assert got[key][0] == pytest.approx(dice, abs=1e-12), key
        assert got[key][1] == pytest.approx(hd, abs=1e-9, nan_ok=True), key
    assert len({round(v[0], 6) for v in got.values()}) > 5  # the table is not trivially constant
