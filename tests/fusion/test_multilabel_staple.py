"""Multi-label STAPLE: agreement with SimpleITK's MultiLabelSTAPLEImageFilter, ties, undecided voxels."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from medmodal.fusion import multilabel_staple
from medmodal.fusion.multilabel import _seed


def sitk_multilabel(labels: np.ndarray, **settings: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """SimpleITK's fused labels and confusion matrices, transposed to ours: ``[t, o] = P(says o | truth t)``."""
    f = sitk.MultiLabelSTAPLEImageFilter()
    for name, value in settings.items():
        getattr(f, f"Set{name}")(value)
    out = sitk.GetArrayFromImage(f.Execute(*[sitk.GetImageFromArray(m) for m in labels]))
    n = int(labels.max()) + 1
    return out, [np.array(f.GetConfusionMatrix(k)).reshape(n + 1, n)[:n].T for k in range(len(labels))]


def three_label_raters(*, seed: int, shape: tuple[int, ...] = (17, 18, 19)) -> tuple[np.ndarray, np.ndarray]:
    """Truth with labels 0/1/2 and 3 raters, each wrong only in its own region (so no vote is ever tied)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).sum(0)
    truth = (grid // 6 % 3).astype(np.uint8)
    region = rng.integers(0, 4, shape)
    raters = []
    for k in range(3):
        lab = truth.copy()
        wrong = (region == k) & (rng.random(shape) < 0.6)
        lab[wrong] = (lab[wrong] + 1 + k % 2) % 3
        raters.append(lab)
    return truth, np.stack(raters)


def test_matches_simpleitk_without_voting_ties() -> None:
    truth, labels = three_label_raters(seed=1)
    ours = multilabel_staple(labels, max_iter=1000, posterior=True)
    fused, confusion = sitk_multilabel(labels)
    assert ours.converged and ours.fused.dtype == torch.int64
    np.testing.assert_array_equal(ours.fused.numpy(), fused)
    for k in range(3):
        np.testing.assert_allclose(ours.confusion[k].numpy(), confusion[k], atol=1e-9)
    torch.testing.assert_close(ours.probability.sum(0), torch.ones(truth.shape, dtype=torch.float64))
    torch.testing.assert_close(ours.confidence, ours.probability.max(0).values)
    torch.testing.assert_close(ours.confusion.sum(2), torch.ones(3, 3, dtype=torch.float64))


def test_voting_ties_are_skipped_in_the_seed_unlike_simpleitk() -> None:
    """ITK ≤ 5.4 counts a tied vote one past the matrix column, i.e. as "rater said l+1, truth 0" (ITK#6579)."""
    labels = np.array([[[1, 1, 0, 2]], [[1, 2, 0, 0]]], dtype=np.uint8)  # voxels 2 and 4 are 1-1 ties
    _, confusion = sitk_multilabel(labels, MaximumNumberOfIterations=0)
    index = torch.from_numpy(labels.reshape(2, -1)).long()
    ours = _seed(index, torch.ones(4, dtype=torch.float64), 3).transpose(1, 2)  # → [truth, observed]
    # rater 0 said 0 (vote 0) and 1 (vote 1) once each; both ties must leave no trace
    np.testing.assert_array_equal(ours[0].numpy(), [[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert confusion[0][0, 2] == 1.0  # SimpleITK: a phantom "rater 0 said 2 where the truth is 0"


def test_with_voting_ties_agrees_with_simpleitk_up_to_the_tolerance() -> None:
    rng = np.random.default_rng(2)
    truth = (np.indices((15, 16, 17)).sum(0) // 5 % 3).astype(np.uint8)
    labels = np.stack([np.where(rng.random(truth.shape) < 0.2, rng.integers(0, 3, truth.shape), truth)
                       for _ in range(4)]).astype(np.uint8)
    ours = multilabel_staple(labels)
    fused, confusion = sitk_multilabel(labels)
    assert (ours.fused.numpy() == fused).mean() >= 0.999
    for k in range(4):  # different seeds, same fixed point: both stop once no entry moves by 1e-5
        np.testing.assert_allclose(ours.confusion[k].numpy(), confusion[k], atol=1e-4)


def test_identical_raters_return_that_label_map() -> None:
    truth, _ = three_label_raters(seed=3, shape=(9, 10, 11))
    result = multilabel_staple(np.stack([truth] * 4))
    np.testing.assert_array_equal(result.fused.numpy(), truth)
    torch.testing.assert_close(result.confusion, torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    assert not bool(result.undecided.any())


def test_arbitrary_label_values_and_2d() -> None:
    _, labels = three_label_raters(seed=4, shape=(21, 22))
    values = np.array([-3, 4, 9], dtype=np.int16)
    base, mapped = multilabel_staple(labels, posterior=True), multilabel_staple(values[labels], posterior=True)
    np.testing.assert_array_equal(mapped.fused.numpy(), values[base.fused.numpy()])
    assert mapped.labels.tolist() == [-3, 4, 9] and mapped.probability.shape == (3, 21, 22)
    torch.testing.assert_close(mapped.probability, base.probability)


def test_pattern_compression_is_exact() -> None:
    _, labels = three_label_raters(seed=5, shape=(11, 12, 13))
    fast, dense = multilabel_staple(labels, posterior=True), multilabel_staple(labels, compress=False, posterior=True)
    assert fast.iterations == dense.iterations
    torch.testing.assert_close(fast.probability, dense.probability, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast.confusion, dense.confusion, atol=1e-12, rtol=0)
    assert torch.equal(fast.fused, dense.fused)


def test_undecided_voxels_get_the_undecided_label_and_no_nan() -> None:
    labels = np.array([[[0, 1, 1]], [[1, 0, 1]]], dtype=np.uint8)  # voxels 1-2 split 1-1, voxel 3 agreed
    result = multilabel_staple(labels, posterior=True)
    assert result.fused.tolist() == [[2, 2, 1]] and result.undecided_label == 2
    assert result.undecided.tolist() == [[True, True, False]]
    assert not bool(torch.isnan(result.probability).any())
    assert multilabel_staple(labels, undecided=255).fused.tolist() == [[255, 255, 1]]
