"""Binary STAPLE: the invariants of shared/methods/deepstaple.md §3 (1-4), SimpleITK agreement, exact compression."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medmodal.evaluation.metrics import binary_dice
from medmodal.fusion import staple


def itk_reference(masks: np.ndarray, *, max_iter: int, tol: float = 1e-14) -> tuple[np.ndarray, np.ndarray, int]:
    """ITK's STAPLE written out densely, products and all, in numpy float64 (the deepstaple.md §2.5 recipe)."""
    d = masks.reshape(masks.shape[0], -1) == 1
    w = d.mean(0)
    g = w.mean()
    last, iterations = None, 0
    while iterations < max_iter:
        iterations += 1
        p = (w * d).sum(1) / w.sum()
        q = ((1 - w) * ~d).sum(1) / (1 - w).sum()
        a = np.prod(np.where(d, p[:, None], 1 - p[:, None]), 0)
        b = np.prod(np.where(d, 1 - q[:, None], q[:, None]), 0)
        w = g * a / (g * a + (1 - g) * b)
        if last is not None and np.all((p - last[0]) ** 2 <= tol) and np.all((q - last[1]) ** 2 <= tol):
            break
        last = (p, q)
    return w.reshape(masks.shape[1:]), np.concatenate([p, q]), iterations


def sitk_staple(masks: np.ndarray, *, max_iter: int = 200) -> tuple[np.ndarray, sitk.STAPLEImageFilter]:
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    f.SetMaximumIterations(max_iter)
    out = f.Execute(*[sitk.GetImageFromArray(m) for m in masks])
    return sitk.GetArrayFromImage(out), f


def test_matches_simpleitk_on_structured_raters(raters3) -> None:
    truth, masks = raters3
    ours = staple(masks)
    theirs, f = sitk_staple(masks)
    assert ours.converged and ours.iterations == f.GetElapsedIterations() + 1  # ITK reports a 0-based index
    np.testing.assert_allclose(ours.probability.numpy(), theirs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours.sensitivity.numpy(), f.GetSensitivity(), atol=1e-6)
    np.testing.assert_allclose(ours.specificity.numpy(), f.GetSpecificity(), atol=1e-6)
    assert ours.probability.dtype == torch.float64 and ours.fused.dtype == torch.bool
    assert torch.equal(ours.fused, ours.probability > 0.5)
    assert binary_dice(ours.fused.numpy(), truth) > 0.85


def test_matches_simpleitk_on_independent_random_raters() -> None:
    rng = np.random.default_rng(5)
    masks = (rng.random((3, 9, 10, 11)) < [[[[0.2]]], [[[0.3]]], [[[0.4]]]]).astype(np.uint8)
    ours = staple(masks, max_iter=60)
    theirs, f = sitk_staple(masks, max_iter=60)
    assert ours.iterations == f.GetElapsedIterations() == 60 and not ours.converged  # no structure to converge to
    np.testing.assert_allclose(ours.probability.numpy(), theirs, atol=1e-6, rtol=0)


def test_matches_simpleitk_when_a_sensitivity_reaches_one() -> None:
    """Regression: rounding put p at 1 + 2e-16, log(1 - p) was NaN and EM restarted instead of converging."""
    truth = np.zeros((17, 18, 19), np.uint8)
    truth[4:12, 5:14, 3:15] = 1
    masks = np.stack([np.roll(truth, shift, axis=axis) for axis, shift in enumerate((0, 1, -1))])
    ours = staple(masks, max_iter=1000)
    theirs, f = sitk_staple(masks, max_iter=1000)
    assert ours.converged and ours.iterations == f.GetElapsedIterations() + 1 > 200
    assert float(ours.sensitivity[0]) == 1.0 and np.all(np.isfinite(ours.log_likelihood))
    assert np.all(np.diff(ours.log_likelihood) >= 0)
    np.testing.assert_allclose(ours.probability.numpy(), theirs, atol=1e-6, rtol=0)


def test_thresholded_maps_agree_with_simpleitk_on_a_noisy_case(blob, noisy_raters) -> None:
    truth = blob((19, 18, 17), seed=3)
    masks = noisy_raters(truth, [(0.7, 0.75), (0.6, 0.8), (0.8, 0.6), (0.55, 0.9), (0.9, 0.55)], seed=4)
    ours = staple(masks)
    theirs, _ = sitk_staple(masks)
    assert binary_dice(ours.fused.numpy(), theirs > 0.5) >= 0.99


def test_pattern_compression_is_exact(raters3) -> None:
    _, masks = raters3
    fast, dense = staple(masks), staple(masks, compress=False)
    reference, pq, iterations = itk_reference(masks, max_iter=200)
    assert fast.iterations == dense.iterations == iterations
    torch.testing.assert_close(fast.probability, dense.probability, atol=1e-12, rtol=0)
    np.testing.assert_allclose(fast.probability.numpy(), reference, atol=1e-10, rtol=0)
    np.testing.assert_allclose(torch.cat([fast.sensitivity, fast.specificity]).numpy(), pq, atol=1e-12)


def test_more_raters_than_a_pattern_code_holds_runs_densely() -> None:
    masks = np.random.default_rng(0).random((64, 3, 5)) < 0.5  # 2**64 patterns: no compression
    torch.testing.assert_close(staple(masks, max_iter=5).probability, staple(masks, max_iter=5, compress=False)
                               .probability, atol=1e-12, rtol=0)


def test_identical_raters_return_that_rater(blob) -> None:
    y = blob((17, 18, 19), seed=1)
    result = staple(np.stack([y, y, y]))
    assert torch.equal(result.fused, torch.from_numpy(y))
    assert bool((result.sensitivity >= 1 - 1e-9).all()) and bool((result.specificity >= 1 - 1e-9).all())
    assert result.converged


def test_em_never_decreases_the_log_likelihood(blob, noisy_raters) -> None:
    truth = blob((13, 14, 15), seed=2)
    masks = noisy_raters(truth, [(0.8, 0.7), (0.6, 0.9), (0.9, 0.6), (0.7, 0.8)], seed=7)
    ll = np.array(staple(masks).log_likelihood)
    assert len(ll) > 5 and np.all(np.isfinite(ll))
    assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:]))
    assert ll[-1] > ll[0]


@pytest.mark.parametrize("case", ["one_empty", "one_full", "all_empty", "all_full"])
def test_degenerate_raters_give_no_nan(raters3, case: str) -> None:
    _, masks = raters3
    masks = masks.copy()
    if case == "one_empty":
        masks[1] = 0
    elif case == "one_full":
        masks[2] = 1
    else:
        masks[:] = 0 if case == "all_empty" else 1
    result = staple(masks)
    for t in (result.probability, result.sensitivity, result.specificity):
        assert not bool(torch.isnan(t).any()), case
    if case.startswith("all"):
        assert bool((result.fused == (case == "all_full")).all())
    if case == "one_empty":
        assert float(result.sensitivity[1]) == 0.0 and float(result.specificity[1]) == 1.0


def test_permuting_raters_permutes_performance_only(raters3) -> None:
    _, masks = raters3
    order = [2, 0, 1]
    base, permuted = staple(masks), staple(masks[order])
    torch.testing.assert_close(permuted.probability, base.probability, atol=1e-12, rtol=0)
    torch.testing.assert_close(permuted.sensitivity, base.sensitivity[order], atol=1e-12, rtol=0)
    torch.testing.assert_close(permuted.specificity, base.specificity[order], atol=1e-12, rtol=0)


def test_2d_torch_input_foreground_value_and_confidence_weight(blob, noisy_raters) -> None:
    truth = blob((23, 21), seed=5)
    masks = noisy_raters(truth, [(0.9, 0.9), (0.8, 0.95), (0.95, 0.8)], seed=2)
    coded = torch.from_numpy(np.where(masks == 1, 7, 3).astype(np.int16))
    base = staple(masks)
    other = staple(coded, foreground=7)
    assert other.probability.shape == (23, 21)
    torch.testing.assert_close(other.probability, base.probability)
    boosted = staple(masks, confidence_weight=1.5)
    assert boosted.prior == pytest.approx(1.5 * base.prior)
    assert int(boosted.fused.sum()) >= int(base.fused.sum())


def test_bad_arguments_raise() -> None:
    masks = np.zeros((2, 4, 5), np.uint8)
    masks[:, :2] = 1
    with pytest.raises(TypeError, match="float"):
        staple(masks.astype(np.float32))
    with pytest.raises(ValueError, match="max_iter"):
        staple(masks, max_iter=0)
    with pytest.raises(ValueError, match="prior g"):
        staple(masks, confidence_weight=3.0)
    with pytest.raises(ValueError, match="shape"):
        staple(np.zeros((3,), np.uint8))


# -- the SimpleITK backend (DeepSTAPLE's method.staple_backend) -------------------------------------------------
#: agreement of the two backends' W: the spec's cross-check bound (§3 invariant 4). Both run ITK's EM with the
#: same prior g (computed once) and the same stopping rule, so they differ by float rounding only (ITK multiplies
#: the K rater factors, we add logarithms): about 1e-13 here. Thresholded masks can still differ in a voxel whose
#: W is within that rounding of 0.5.
BACKEND_ATOL = 1e-6


@pytest.mark.parametrize("dims", [2, 3])
def test_simpleitk_and_torch64_backends_agree(blob, noisy_raters, dims: int) -> None:
    truth = blob((17, 18, 19)[:dims], seed=dims)
    masks = noisy_raters(truth, [(0.95, 0.97), (0.85, 0.9), (0.9, 0.8), (0.7, 0.95)], seed=dims)
    ours, theirs = staple(masks), staple(masks, backend="simpleitk")
    assert theirs.probability.shape == truth.shape and theirs.probability.dtype == torch.float64
    torch.testing.assert_close(theirs.probability, ours.probability, atol=BACKEND_ATOL, rtol=0)
    torch.testing.assert_close(theirs.sensitivity, ours.sensitivity, atol=BACKEND_ATOL, rtol=0)
    torch.testing.assert_close(theirs.specificity, ours.specificity, atol=BACKEND_ATOL, rtol=0)
    assert (theirs.iterations, theirs.converged, theirs.prior) == (ours.iterations, ours.converged, ours.prior)
    differ = theirs.fused != ours.fused
    assert bool(((ours.probability[differ] - 0.5).abs() <= BACKEND_ATOL).all())


def test_backend_switch_really_calls_simpleitk(raters3) -> None:
    _, masks = raters3
    itk, f = sitk_staple(masks)
    theirs, ours = staple(masks, backend="simpleitk"), staple(masks)
    assert np.array_equal(theirs.probability.numpy(), itk)  # bit for bit SimpleITK's output ...
    assert not np.array_equal(ours.probability.numpy(), itk)  # ... which ours matches only to rounding
    assert theirs.iterations == f.GetElapsedIterations() + 1 and theirs.log_likelihood == ()
    assert len(ours.log_likelihood) == ours.iterations
    empty = np.zeros((3, 5, 6, 7), np.uint8)  # 0/0: ITK's W is NaN (fused: empty), ours is defined
    assert bool(torch.isnan(staple(empty, backend="simpleitk").probability).all())
    assert not bool(staple(empty, backend="simpleitk").fused.any())
    assert bool((staple(empty).probability == 0).all())


def test_simpleitk_backend_settings() -> None:
    masks = np.zeros((2, 4, 5), np.uint8)
    masks[:, :2] = 1
    masks[1, 2] = 1
    boosted = staple(masks, backend="simpleitk", confidence_weight=1.2)
    assert boosted.prior == pytest.approx(1.2 * staple(masks).prior)
    torch.testing.assert_close(boosted.probability, staple(masks, confidence_weight=1.2).probability,
                               atol=BACKEND_ATOL, rtol=0)
    coded = np.where(masks == 1, 5, 2).astype(np.int16)
    torch.testing.assert_close(staple(coded, foreground=5, backend="simpleitk").probability,
                               staple(masks, backend="simpleitk").probability)
    with pytest.raises(ValueError, match="backend must be one of torch64, simpleitk"):
        staple(masks, backend="itk")
    with pytest.raises(ValueError, match="tol"):
        staple(masks, backend="simpleitk", tol=1e-10)
    with pytest.raises(ValueError, match="2D or 3D"):
        staple(np.zeros((2, 3, 4, 5, 6), np.uint8), backend="simpleitk")
    with pytest.raises(ValueError, match="prior g"):
        staple(masks, backend="simpleitk", confidence_weight=5.0)
