"""Synthesis evaluation: masked PSNR/SSIM/MAE, imputation baselines, scenarios, the report and the figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from scipy.ndimage import gaussian_filter
from scipy.stats import wilcoxon

from medmodal.atomic import read_csv
from medmodal.evaluation.synthesis import (
    METRIC_DEFINITION,
    MIN_WILCOXON_PAIRS,
    SYNTHETIC_NOTE,
    SynthesisRow,
    all_scenarios,
    impute_mean,
    impute_zero,
    metric_vs_steps_figure,
    scenario_name,
    synthesis_figure,
    synthesis_metrics,
    write_synthesis_report,
)

SHAPES = {2: (17, 18), 3: (17, 18, 19)}


def _image(shape, seed=0, lo=0.0, hi=1.0) -> torch.Tensor:
    """A smooth random image in [lo, hi] (float64)."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.random(shape), 1.5)
    x = (x - x.min()) / (x.max() - x.min())
    return torch.from_numpy(lo + (hi - lo) * x)


def _mask(shape) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[3:14, 4:15] = True
    if len(shape) == 3:
        m[..., :2] = False
        m[..., -3:] = False
    return m


def _ref_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Independent SSIM map of a 2D slice (scipy Gaussian filter, 11 taps, σ 1.5), on the valid interior."""
    f = lambda a: gaussian_filter(a, 1.5, truncate=3.5, mode="constant")  # noqa: E731
    c1, c2 = 0.01**2, 0.03**2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    s = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s[5:-5, 5:-5]


# ------------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("dims", [2, 3])
def test_constant_offset_gives_20_db_and_mae_0_1(dims):
    truth = _image(SHAPES[dims], lo=0.0, hi=0.8)
    mask = _mask(SHAPES[dims])
    pred = torch.where(mask, truth + 0.1, torch.rand(SHAPES[dims], dtype=torch.float64))
    m = synthesis_metrics(pred, truth, mask, spatial_dims=dims)
    assert m["psnr"] == pytest.approx(20.0, abs=1e-9)  # 10 log10(1 / 0.1²)
    assert m["mae"] == pytest.approx(0.1, abs=1e-12)
    assert 0.9 < m["ssim"] < 1.0  # a pure offset mainly lowers the luminance term


@pytest.mark.parametrize("dims", [2, 3])
def test_known_mae_and_psnr_with_half_the_mask_off(dims):
    truth = _image(SHAPES[dims], lo=0.0, hi=0.7)
    mask = _mask(SHAPES[dims])
    pred = truth.clone()
    idx = mask.nonzero()
    half = idx[: idx.shape[0] // 2]
    pred[tuple(half.T)] += 0.2
    frac = half.shape[0] / idx.shape[0]
    m = synthesis_metrics(pred.numpy(), truth.numpy(), mask.numpy(), spatial_dims=dims)  # numpy works too
    assert m["mae"] == pytest.approx(0.2 * frac, rel=1e-9)
    assert m["psnr"] == pytest.approx(10 * math.log10(1 / (0.04 * frac)), rel=1e-9)


@pytest.mark.parametrize("dims", [2, 3])
def test_voxels_outside_the_mask_change_no_metric(dims):
    shape = SHAPES[dims]
    truth, mask = _image(shape, 1), _mask(shape)
    pred = (truth + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    pred = pred.clamp(0, 1)
    before = synthesis_metrics(pred, truth, mask, spatial_dims=dims)
    junk = torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    after = synthesis_metrics(torch.where(mask, pred, junk), torch.where(mask, truth, 1 - junk), mask,
                              spatial_dims=dims)
    assert after == before
    # ...while one voxel inside the mask does change all three
    inside = tuple(mask.nonzero()[len(mask.nonzero()) // 2])
    pred2 = pred.clone()
    pred2[inside] = 1.0 - pred2[inside]
    changed = synthesis_metrics(pred2, truth, mask, spatial_dims=dims)
    assert all(changed[k] != before[k] for k in ("psnr", "ssim", "mae"))


@pytest.mark.parametrize("dims", [2, 3])
def test_ssim_is_one_for_identical_and_falls_with_noise(dims):
    shape = SHAPES[dims]
    truth, mask = _image(shape, 3), _mask(shape)
    same = synthesis_metrics(truth, truth.clone(), mask, spatial_dims=dims)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same["psnr"] == math.inf and same["mae"] == 0.0  # a perfect copy: PSNR inf, not capped
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    s1 = synthesis_metrics((truth + 0.05 * noise).clamp(0, 1), truth, mask, spatial_dims=dims)["ssim"]
    s2 = synthesis_metrics((truth + 0.2 * noise).clamp(0, 1), truth, mask, spatial_dims=dims)["ssim"]
    assert 1.0 > s1 > s2


def test_ssim_matches_an_independent_reference_with_a_full_mask_2d():
    truth = _image((23, 25), 4).numpy()
    pred = np.clip(truth + 0.1 * np.random.default_rng(5).standard_normal(truth.shape), 0, 1)
    got = synthesis_metrics(pred, truth, np.ones(truth.shape, bool), spatial_dims=2)["ssim"]
    assert got == pytest.approx(_ref_ssim_map(pred, truth).mean(), abs=1e-4)
    assert got < 0.95


def test_ssim_3d_is_the_mean_over_axial_slices_along_the_last_axis():
    shape = (21, 19, 13)
    truth = _image(shape, 6).numpy()
    pred = np.clip(truth + 0.08 * np.random.default_rng(7).standard_normal(shape), 0, 1)
    got = synthesis_metrics(pred, truth, np.ones(shape, bool), spatial_dims=3)["ssim"]
    per_slice = [_ref_ssim_map(pred[..., k], truth[..., k]).mean() for k in range(shape[-1])]
    assert got == pytest.approx(np.mean(per_slice), abs=1e-4)
    # slices along another axis would give a different value
    other = [_ref_ssim_map(pred[k], truth[k]).mean() for k in range(shape[0])]
    assert abs(np.mean(other) - np.mean(per_slice)) > 1e-3


def test_masked_ssim_averages_mask_pixels_per_slice_then_brain_slices():
    shape = (20, 22, 5)
    truth = _image(shape, 8).numpy()
    pred = np.clip(truth + 0.1 * np.random.default_rng(9).standard_normal(shape), 0, 1)
    mask = np.zeros(shape, bool)
    mask[5:15, 6:16, 1] = True  # 100 pixels in slice 1
    mask[8:10, 8:10, 3] = True  # 4 pixels in slice 3; slices 0, 2, 4 hold no brain
    got = synthesis_metrics(pred, truth, mask, spatial_dims=3)["ssim"]
    per_slice = []
    for k in (1, 3):
        smap = _ref_ssim_map(pred[..., k] * mask[..., k], truth[..., k] * mask[..., k])
        per_slice.append(smap[mask[5:-5, 5:-5, k]].mean())
    assert got == pytest.approx(np.mean(per_slice), abs=1e-4)  # unweighted over slices, not over pixels


@pytest.mark.parametrize(
    ("pred", "truth", "mask", "dims", "message"),
    [
        ((17, 18), (17, 19), (17, 18), 2, "same 2D shape"),
        ((17, 18, 19), (17, 18, 19), (17, 18, 19), 2, "same 2D shape"),
        ((17, 18), (17, 18), (17, 18), 4, "spatial_dims must be 2 or 3"),
        ((9, 18), (9, 18), (9, 18), 2, "smaller than the 11-pixel SSIM window"),
    ],
)
def test_bad_shapes_are_named(pred, truth, mask, dims, message):
    with pytest.raises(ValueError, match=message):
        synthesis_metrics(torch.rand(pred), torch.rand(truth), torch.ones(mask, dtype=torch.bool), spatial_dims=dims)


def test_bad_values_and_masks_are_named():
    truth, mask = _image((17, 18)), _mask((17, 18))
    with pytest.raises(ValueError, match="mask is empty"):
        synthesis_metrics(truth, truth, torch.zeros_like(mask), spatial_dims=2)
    border = torch.zeros_like(mask)
    border[0:3, :] = True
    with pytest.raises(ValueError, match="no voxel at least 5 pixels inside"):
        synthesis_metrics(truth, truth, border, spatial_dims=2)
    with pytest.raises(ValueError, match="mask must be bool"):
        synthesis_metrics(truth, truth, mask.float(), spatial_dims=2)
    with pytest.raises(ValueError, match=r"pred has values outside \[0, 1\].*clamp"):
        synthesis_metrics(truth * 2 - 1, truth, mask, spatial_dims=2)  # still in [-1, 1]
    with pytest.raises(ValueError, match=r"truth has values outside \[0, 1\]"):
        synthesis_metrics(truth, truth + 0.5, mask, spatial_dims=2)
    nan = truth.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="pred has NaN"):
        synthesis_metrics(nan, truth, mask, spatial_dims=2)


def test_metric_definition_states_the_conventions():
    for needle in ("[0, 1]", "brain mask", "data range 1", "11 px", "σ 1.5", "0.01", "0.03", "last axis", "inf"):
        assert needle in METRIC_DEFINITION
    assert "\n" not in METRIC_DEFINITION


# ---------------------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("dims", [2, 3])
def test_impute_zero_fills_background_in_either_space(dims):
    x01 = torch.rand(2, 3, *SHAPES[dims][:dims], generator=torch.Generator().manual_seed(0))
    avail = torch.tensor([[True, False, True], [False, False, True]])
    out = impute_zero(x01, avail)
    assert torch.equal(out[avail], x01[avail])
    assert torch.all(out[~avail] == 0.0)
    # the same image in [-1, 1] space, background -1
    out_pm = impute_zero(x01 * 2 - 1, avail, background=-1.0)
    assert torch.allclose((out_pm + 1) / 2, out, atol=1e-7)
    assert torch.all(out_pm[~avail] == -1.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_impute_mean_is_the_voxelwise_mean_of_available_channels(dims):
    shape = SHAPES[dims][:dims]
    x = torch.rand(2, 4, *shape, generator=torch.Generator().manual_seed(1))
    avail = torch.tensor([[True, False, True, False], [False, True, True, True]])
    garbage = x.clone()
    garbage[~avail] = float("nan")  # missing channels' content must not leak in
    out = impute_mean(garbage, avail)
    assert torch.equal(out[avail], x[avail])
    torch.testing.assert_close(out[0, 1], (x[0, 0] + x[0, 2]) / 2)
    torch.testing.assert_close(out[0, 3], (x[0, 0] + x[0, 2]) / 2)
    torch.testing.assert_close(out[1, 0], (x[1, 1] + x[1, 2] + x[1, 3]) / 3)
    # space-independent: the mean commutes with (x + 1) / 2
    torch.testing.assert_close((impute_mean(x * 2 - 1, avail) + 1) / 2, impute_mean(x, avail))


def test_impute_rejects_bad_availability():
    x = torch.rand(2, 3, 11, 12)
    with pytest.raises(ValueError, match="no available channel"):
        impute_mean(x, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match=r"available must be a \(B, M\) = \(2, 3\) bool"):
        impute_zero(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="available must be"):
        impute_mean(x, torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- scenarios


def test_all_scenarios_count_and_order():
    three = all_scenarios(3)
    assert three == [(True, True, False), (True, False, True), (False, True, True),
                     (True, False, False), (False, True, False), (False, False, True)]
    four = all_scenarios(4)
    assert len(four) == 14 and len(set(four)) == 14
    assert all(any(s) and not all(s) for s in four)
    assert [sum(s) for s in four] == [3] * 4 + [2] * 6 + [1] * 4
    assert four[0] == (True, True, True, False) and four[4] == (True, True, False, False)
    assert four[-1] == (False, False, False, True)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        all_scenarios(1)


def test_scenario_name():
    mods = ["t1", "t1c", "t2", "flair"]
    assert scenario_name((True, False, True, False), mods) == "t1+t2 → t1c+flair"
    assert scenario_name([False, False, False, True], mods) == "flair → t1+t1c+t2"
    assert scenario_name(torch.tensor([True, False]).tolist(), ["a", "b"]) == "a → b"
    with pytest.raises(ValueError, match="at least one available and one missing"):
        scenario_name((True, True), ["a", "b"])
    with pytest.raises(ValueError, match="3 availability flags for 2 modalities"):
        scenario_name((True, False, True), ["a", "b"])


# ------------------------------------------------------------------------------------------------- report


def _rows(n_cases: int, seed: int = 0) -> tuple[list[SynthesisRow], dict]:
    rng = np.random.default_rng(seed)
    rows, values = [], {}
    for scen, mods in (("t1+t2 → pd", ("pd",)), ("t1 → t2+pd", ("t2", "pd"))):
        for mod in mods:
            for c in range(n_cases):
                ref = 25 + rng.normal()
                other = ref - 0.5 + rng.normal()  # mostly worse, with a few sign flips
                for model, psnr in (("ref", ref), ("base", other)):
                    values[(model, scen, mod, f"c{c}")] = psnr
                    rows.append(SynthesisRow(model=model, scenario=scen, case_id=f"c{c}", modality=mod, psnr=psnr,
                                             ssim=0.5 + psnr / 100, mae=1 / psnr))
    return rows, values


def _line(report: str, start: str, after: str) -> str:
    """The first table line starting with ``start`` after the heading line ``after``."""
    tail = report[report.index(after):]
    return next(line for line in tail.splitlines() if line.startswith(start))


def test_report_values_and_p_values_match_scipy(tmp_path):
    rows, values = _rows(9)
    path = write_synthesis_report(rows, tmp_path, reference_model="ref", title="Synthesis test", synthetic=True,
                                  details=["split hash: abc"])
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Synthesis test") and SYNTHETIC_NOTE in text and "- split hash: abc" in text
    assert text.count(METRIC_DEFINITION) == 6  # under each of the 3 summary and 3 per-scenario tables

    cases = [f"c{c}" for c in range(9)]
    ref = np.array([values[("ref", "t1 → t2+pd", "t2", c)] for c in cases])
    base = np.array([values[("base", "t1 → t2+pd", "t2", c)] for c in cases])
    p = wilcoxon(ref - base).pvalue
    line = _line(text, "| t1 → t2+pd: **t2** |", "## Per scenario")
    assert line == (f"| t1 → t2+pd: **t2** | 9 | {ref.mean():.2f} ± {ref.std(ddof=1):.2f} | "
                    f"{base.mean():.2f} ± {base.std(ddof=1):.2f} (p {p:.3f}) |")
    # summary "all": each case averaged over the three (scenario, modality) pairs first
    keys = [("t1+t2 → pd", "pd"), ("t1 → t2+pd", "t2"), ("t1 → t2+pd", "pd")]
    ref_all = np.array([np.mean([values[("ref", s, m, c)] for s, m in keys]) for c in cases])
    base_all = np.array([np.mean([values[("base", s, m, c)] for s, m in keys]) for c in cases])
    p_all = wilcoxon(ref_all - base_all).pvalue
    assert f"{base_all.mean():.2f} ± {base_all.std(ddof=1):.2f} (p {p_all:.3f})" in _line(text, "| **all** |",
                                                                                             "### PSNR")
    # "pd" summary row averages pd over its two scenarios
    ref_pd = np.array([np.mean([values[("ref", s, "pd", c)] for s in ("t1+t2 → pd", "t1 → t2+pd")]) for c in cases])
    assert _line(text, "| pd |", "### PSNR").startswith(f"| pd | 9 | {ref_pd.mean():.2f} ± {ref_pd.std(ddof=1):.2f} |")

    csv_rows = read_csv(tmp_path / "synthesis.csv")
    assert len(csv_rows) == len(rows) == 2 * 3 * 9
    assert list(csv_rows[0]) == ["model", "scenario", "case_id", "modality", "psnr", "ssim", "mae"]
    assert float(csv_rows[0]["psnr"]) == pytest.approx(rows[0].psnr, rel=1e-5)


def test_report_says_n_too_small_below_six_pairs(tmp_path):
    rows, _ = _rows(MIN_WILCOXON_PAIRS - 1)
    path = write_synthesis_report(rows, tmp_path, reference_model="ref", title="t", synthetic=False)
    text = path.read_text(encoding="utf-8")
    assert "(n too small)" in _line(text, "| t1+t2 → pd: **pd** | 5 |", "### PSNR")
    assert "(p " not in text and SYNTHETIC_NOTE not in text
    rows6, values = _rows(MIN_WILCOXON_PAIRS)
    text6 = write_synthesis_report(rows6, tmp_path / "six", reference_model="ref", title="t",
                                   synthetic=False).read_text(encoding="utf-8")
    assert "(p " in _line(text6, "| t1+t2 → pd: **pd** | 6 |", "## Per scenario")
    # zero differences are dropped before counting: 6 pairs with one tie is again too small
    tie = [r if not (r.model == "base" and r.case_id == "c0") else
           SynthesisRow(**{**r.__dict__, "psnr": values[("ref", r.scenario, r.modality, "c0")]}) for r in rows6]
    text_tie = write_synthesis_report(tie, tmp_path / "tie", reference_model="ref", title="t",
                                      synthetic=False).read_text(encoding="utf-8")
    assert "(n too small)" in _line(text_tie, "| t1+t2 → pd: **pd** | 6 |", "## Per scenario")


def test_report_marks_infinite_psnr(tmp_path):
    rows, _ = _rows(7)
    rows[0] = SynthesisRow(**{**rows[0].__dict__, "psnr": math.inf})
    path = write_synthesis_report(rows, tmp_path, reference_model="ref", title="t", synthetic=False)
    text = path.read_text(encoding="utf-8")
    line = _line(text, "| t1+t2 → pd: **pd** |", "## Per scenario")
    assert "| inf |" in line and "(p n/a: inf)" in line
    assert read_csv(tmp_path / "synthesis.csv")[0]["psnr"] == "inf"


def test_report_rejects_unpaired_rows(tmp_path):
    rows, _ = _rows(6)
    with pytest.raises(ValueError, match="reference_model 'nope' has no row"):
        write_synthesis_report(rows, tmp_path, reference_model="nope", title="t", synthetic=False)
    with pytest.raises(ValueError, match="model 'base' was not scored on the same"):
        write_synthesis_report(rows[:-1], tmp_path, reference_model="ref", title="t", synthetic=False)
    with pytest.raises(ValueError, match="duplicate row"):
        write_synthesis_report([*rows, rows[0]], tmp_path, reference_model="ref", title="t", synthetic=False)
    with pytest.raises(ValueError, match="nothing to report"):
        write_synthesis_report([], tmp_path, reference_model="ref", title="t", synthetic=False)


# ------------------------------------------------------------------------------------------------ figures


def _slices(seed: int, m: int = 3, shape=(31, 29)) -> np.ndarray:
    return np.stack([_image(shape, seed + k).numpy() for k in range(m)])


def test_synthesis_figure_draws_what_it_is_given(tmp_path):
    mods, avail = ["t1", "t2", "pd"], np.array([True, True, False])
    inputs, truth = _slices(0), _slices(10)
    synth = np.clip(truth + 0.1 * np.random.default_rng(0).standard_normal(truth.shape), 0, 1)
    kw = dict(available=avail, modalities=mods, title="t1+t2 → pd")
    a = imread(synthesis_figure(tmp_path / "a.png", inputs=inputs, synthesized=synth, truth=truth, **kw))
    assert a.ndim == 3 and a.shape[0] > 300 and a.shape[1] > 600  # 3 rows x 4 columns
    # a different synthesis changes the picture substantially
    b = imread(synthesis_figure(tmp_path / "b.png", inputs=inputs, synthesized=truth, truth=truth, **kw))
    assert a.shape == b.shape and np.abs(a - b).mean() > 0.01
    # a missing modality's input is not drawn: changing it leaves every pixel as it was
    junk = inputs.copy()
    junk[2] = 1 - junk[2]
    c = imread(synthesis_figure(tmp_path / "c.png", inputs=junk, synthesized=synth, truth=truth, **kw))
    assert np.array_equal(a, c)
    # ...but an available one's is
    junk[0] = 1 - junk[0]
    d = imread(synthesis_figure(tmp_path / "d.png", inputs=junk, synthesized=synth, truth=truth, **kw))
    assert np.abs(a - d).mean() > 0.001
    with pytest.raises(ValueError, match=r"must be \(M, H, W\) with M = 3"):
        synthesis_figure(tmp_path / "e.png", inputs=inputs[:2], synthesized=synth, truth=truth, **kw)
    assert not (tmp_path / "e.png").exists()


def test_metric_vs_steps_figure(tmp_path):
    steps = [10, 20, 50, 100, 1000]
    a = imread(metric_vs_steps_figure(tmp_path / "a.png", steps, {"ddim": [20, 24, 26, 27, 27.5]},
                                      ylabel="PSNR (dB)", title="PSNR against steps"))
    b = imread(metric_vs_steps_figure(tmp_path / "b.png", steps, {"ddim": [27.5, 27, 26, 24, 20]},
                                      ylabel="PSNR (dB)", title="PSNR against steps"))
    assert a.shape == b.shape and a.shape[0] > 200 and a.shape[1] > 400
    assert np.abs(a - b).mean() > 0.001
    with pytest.raises(ValueError, match="series 'ddim' has 2 values for 5 steps"):
        metric_vs_steps_figure(tmp_path / "c.png", steps, {"ddim": [1, 2]}, ylabel="y", title="t")
    with pytest.raises(ValueError, match="steps must be positive"):
        metric_vs_steps_figure(tmp_path / "c.png", [0, 10], {"x": [1, 2]}, ylabel="y", title="t")
