"""Evaluation of missing-modality image synthesis: metrics, baseline imputations, scenarios, report and figures.

A **scenario** is a pattern of available modalities that is neither empty nor complete (``2**M − 2`` of them:
6 for three modalities, 14 for four). For every scenario, case and synthesised (missing) modality, a model's
output is scored against the acquired image with :func:`synthesis_metrics`; the rows are summarised by
:func:`write_synthesis_report` with a paired Wilcoxon signed-rank test of a reference model against each other
model. The conventions are stated in :data:`METRIC_DEFINITION`, printed under every table, because PSNR and SSIM
differ between libraries (masking, window, data range, 2D or 3D).

Intensity spaces: metrics and figures take images **scaled to [0, 1]** (background 0). The imputation baselines
work in either [0, 1] or [−1, 1] (see :func:`impute_zero` and :func:`impute_mean`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs

from medmodal.atomic import atomic_write_text
from medmodal.evaluation.compare import format_p, wilcoxon_p
from medmodal.evaluation.report import pyplot, save_figure, write_rows
from medmodal.evaluation.subsets import subset_name

#: SSIM settings (Wang et al. 2004): Gaussian window of 11 pixels, σ = 1.5, K1 = 0.01, K2 = 0.03, data range 1.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_HALF = SSIM_WINDOW // 2

#: below this many non-zero paired differences a two-sided Wilcoxon signed-rank p cannot fall below 0.05
#: (the exact p of n = 5 differences of one sign is 2 / 2**5 = 0.0625), so no p is reported.
MIN_WILCOXON_PAIRS = 6

METRIC_DEFINITION = (
    "Metrics per case and synthesised modality on intensities scaled to [0, 1], inside the brain mask: "
    "MAE = mean |pred − truth| and PSNR = 10·log10(1 / MSE) (data range 1; inf when MSE = 0) over the mask's voxels; "
    "SSIM (MONAI; Gaussian window 11 px, σ 1.5, K1 0.01, K2 0.03, data range 1) of both images set to 0 outside "
    "the mask, in 2D per axial slice (3D: slices along the last axis), its map averaged over the slice's mask "
    "voxels whose window lies inside the slice, then over the slices that have such voxels."
)

SYNTHETIC_NOTE = (
    "**Data: synthetic phantom.** These images are procedural phantoms, not patients: the numbers show that the "
    "pipeline works and how models compare on the phantom, nothing about how well real MRI contrasts are synthesised."
)

_METRICS = (("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 4), ("mae", "MAE", 4))


# --------------------------------------------------------------------------------------------------- metrics


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _check_unit_range(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} has values outside [0, 1] (min {lo:.4g}, max {hi:.4g}): scale it to [0, 1] first, "
            "e.g. (x + 1) / 2 from [-1, 1], and clamp a prediction with .clamp(0, 1)"
        )


def synthesis_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    *,
    spatial_dims: int,
) -> dict[str, float]:
    """PSNR, SSIM and MAE of one synthesised image of one case, inside a foreground mask (:data:`METRIC_DEFINITION`).

    * **MAE** = mean ``|pred − truth|`` over the mask's voxels (:class:`monai.metrics.MAEMetric`).
    * **PSNR** = ``10 log10(1 / MSE)`` with the MSE over the mask's voxels and data range 1
      (:class:`monai.metrics.PSNRMetric`). It is ``inf`` (not capped) when the MSE is 0: a perfect copy is
      reported as such, and the report marks the cells it affects.
    * **SSIM**: the SSIM map of :func:`monai.metrics.regression.compute_ssim_and_cs` (Gaussian window of 11
      pixels, σ = 1.5, K1 = 0.01, K2 = 0.03, data range 1) computed in 2D on every slice of both images with
      the voxels outside the mask set to 0 (the background of skull-stripped images), so that, as for PSNR and
      MAE, nothing outside the mask changes the value. MONAI convolves without padding, so the map covers the
      pixels at least 5 pixels from the slice's edge, whose window lies inside the slice. A slice's SSIM is the
      mean of its map over its mask pixels in that interior; the case's SSIM is the unweighted mean over the
      slices that have at least one such pixel ("brain-containing slices"). A 2D image is one slice; a 3D volume
      is cut into axial slices along its **last** axis (``(H, W, D)``: slice ``[..., k]``).

    Args:
        pred: the synthesised image ``(*S)``, float in [0, 1] (already scaled; clamp first).
        truth: the acquired image ``(*S)``, float in [0, 1].
        mask: ``(*S)`` bool, the brain (foreground) mask.
        spatial_dims: 2 (``S = (H, W)``) or 3 (``S = (H, W, D)``); H and W at least 11.

    Returns:
        ``{"psnr": dB, "ssim": ..., "mae": ...}`` as Python floats.

    Raises:
        ValueError: naming the problem, for a wrong ``spatial_dims``, shapes that differ or do not have
            ``spatial_dims`` axes, slices smaller than the SSIM window, a mask that is not bool, an empty mask (or
            one with no pixel at least 5 pixels inside a slice), or values outside [0, 1] / not finite.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    p, t, m = _as_tensor(pred), _as_tensor(truth), _as_tensor(mask)
    if not (p.shape == t.shape == m.shape) or p.ndim != spatial_dims:
        raise ValueError(
            f"pred, truth and mask must have the same {spatial_dims}D shape, got pred {tuple(p.shape)}, "
            f"truth {tuple(t.shape)}, mask {tuple(m.shape)}"
        )
    if m.dtype != torch.bool:
        raise ValueError(f"mask must be bool (pass e.g. mask > 0), got {m.dtype}")
    if min(p.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"slices of {tuple(p.shape[:2])} pixels are smaller than the {SSIM_WINDOW}-pixel SSIM window")
    if not bool(m.any()):
        raise ValueError("mask is empty: no foreground voxel to compute the metrics over")
    p, t = p.to(torch.float64), t.to(torch.float64)
    _check_unit_range(p, "pred")
    _check_unit_range(t, "truth")

    p_in, t_in = p[m][None], t[m][None]  # (1, N): the metrics' batch of one
    mae = float(MAEMetric()(y_pred=p_in, y=t_in).item())
    psnr = float(PSNRMetric(max_val=1.0)(y_pred=p_in, y=t_in).item())
    return {"psnr": psnr, "ssim": _masked_ssim(p, t, m, spatial_dims), "mae": mae}


def _masked_ssim(p: torch.Tensor, t: torch.Tensor, m: torch.Tensor, spatial_dims: int) -> float:
    """Mean over brain-containing slices of the SSIM map's mean over each slice's interior mask pixels."""
    p, t = p * m, t * m  # 0 outside the mask
    if spatial_dims == 2:
        p, t, m = p[None], t[None], m[None]  # one slice
    else:
        p, t, m = (x.movedim(-1, 0) for x in (p, t, m))  # (D, H, W): axial slices along the last axis
    ssim_map, _ = compute_ssim_and_cs(
        y_pred=p[:, None], y=t[:, None], spatial_dims=2, kernel_size=(SSIM_WINDOW, SSIM_WINDOW),
        kernel_sigma=(SSIM_SIGMA, SSIM_SIGMA), data_range=1.0, kernel_type="gaussian", k1=SSIM_K1, k2=SSIM_K2,
    )  # (D, 1, H − 10, W − 10): the valid convolution, centred on pixels [5 : −5]
    inner = m[:, _HALF:-_HALF, _HALF:-_HALF].to(torch.float64)
    count = inner.sum(dim=(1, 2))
    if not bool((count > 0).any()):
        raise ValueError(f"mask has no voxel at least {_HALF} pixels inside a slice, where SSIM is defined")
    per_slice = (ssim_map[:, 0].to(torch.float64) * inner).sum(dim=(1, 2))[count > 0] / count[count > 0]
    return float(per_slice.mean())


# ------------------------------------------------------------------------------------------------ baselines


def _check_available(x_obs: torch.Tensor, available: torch.Tensor) -> None:
    if available.dtype != torch.bool or available.ndim != 2 or tuple(available.shape) != tuple(x_obs.shape[:2]):
        raise ValueError(
            f"available must be a (B, M) = {tuple(x_obs.shape[:2])} bool tensor, got {available.dtype} "
            f"{tuple(available.shape)}"
        )


def _channel_mask(available: torch.Tensor, ndim: int) -> torch.Tensor:
    return available.reshape(*available.shape, *([1] * (ndim - 2)))


def impute_zero(x_obs: torch.Tensor, available: torch.Tensor, *, background: float = 0.0) -> torch.Tensor:
    """Fill every missing channel with the background intensity ("zero fill", as in MM-GAN's zero imputation).

    The fair zero fill is the image of **nothing**, the intensity of the background: 0 in the [0, 1] metric space
    (the default), which is −1 in the [−1, 1] model space (pass ``background=-1.0`` there). Both give the same
    image, so the metrics do not depend on the space the baseline ran in. Filling the value 0 in [−1, 1] space
    instead would be a constant mid-grey (0.5 in [0, 1]), a different baseline.

    Args:
        x_obs: ``(B, M, *S)`` images; the values of missing channels are ignored.
        available: ``(B, M)`` bool, True = the channel was acquired.
        background: the fill value (0.0 for [0, 1] images, −1.0 for [−1, 1] images).

    Returns:
        ``(B, M, *S)``: the available channels unchanged, the missing ones ``background``.
    """
    _check_available(x_obs, available)
    return torch.where(_channel_mask(available, x_obs.ndim), x_obs, torch.full_like(x_obs, background))


def impute_mean(x_obs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Fill every missing channel with the voxel-wise mean of the case's available channels (MM-GAN's mean fill).

    The mean commutes with the affine map between [−1, 1] and [0, 1], so it works unchanged in either space.

    Args:
        x_obs: ``(B, M, *S)`` images; the values of missing channels are ignored (NaN there is harmless).
        available: ``(B, M)`` bool, True = the channel was acquired; every case needs at least one.

    Returns:
        ``(B, M, *S)``: the available channels unchanged, each missing one the mean of the available ones.
    """
    _check_available(x_obs, available)
    empty = (~available.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"impute_mean: case(s) {empty} of the batch have no available channel to average")
    keep = _channel_mask(available, x_obs.ndim)
    present = torch.where(keep, x_obs, torch.zeros_like(x_obs))
    mean = present.sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).to(x_obs.dtype)
    return torch.where(keep, x_obs, mean.expand_as(x_obs))


# ------------------------------------------------------------------------------------------------ scenarios


def scenario_name(available: Sequence[bool], modalities: Sequence[str]) -> str:
    """``(True, True, False, False)``, ``("t1", "t2", "t1c", "flair")`` → ``"t1+t2 → t1c+flair"`` (given → missing)."""
    avail = [bool(a) for a in available]
    if len(avail) != len(modalities):
        raise ValueError(f"{len(avail)} availability flags for {len(modalities)} modalities {list(modalities)}")
    if all(avail) or not any(avail):
        raise ValueError(f"a scenario needs at least one available and one missing modality, got {avail}")
    given = [m for m, a in zip(modalities, avail, strict=True) if a]
    missing = [m for m, a in zip(modalities, avail, strict=True) if not a]
    return f"{subset_name(given)} → {subset_name(missing)}"


def all_scenarios(n_modalities: int) -> list[tuple[bool, ...]]:
    """The ``2**M − 2`` availability patterns with at least one modality given and one missing.

    Order: by number of available modalities, descending; within a number, the available index sets in
    :func:`itertools.combinations` order (lexicographic in modality order). For M = 3:
    ``TTF, TFT, FTT, TFF, FTF, FFT``.
    """
    if n_modalities < 2:
        raise ValueError(f"scenarios need at least 2 modalities, got {n_modalities}")
    return [tuple(i in given for i in range(n_modalities))
            for k in range(n_modalities - 1, 0, -1) for given in combinations(range(n_modalities), k)]


# --------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class SynthesisRow:
    """One synthesised modality of one case under one scenario, scored by :func:`synthesis_metrics`."""

    model: str
    scenario: str
    case_id: str
    modality: str
    psnr: float
    ssim: float
    mae: float


@dataclass(frozen=True)
class _Cell:
    mean: float
    std: float
    n: int
    p: str  # "" for the reference model


def _per_case(rows: Sequence[SynthesisRow], reference_model: str) -> dict[str, dict[tuple[str, str], dict]]:
    """model → (scenario, modality) → case_id → row, checked to pair every model with the reference."""
    table: dict[str, dict[tuple[str, str], dict[str, SynthesisRow]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        cases = table[r.model][(r.scenario, r.modality)]
        if r.case_id in cases:
            raise ValueError(f"duplicate row: model {r.model!r}, scenario {r.scenario!r}, case {r.case_id!r}, "
                             f"modality {r.modality!r}")
        cases[r.case_id] = r
    if reference_model not in table:
        raise ValueError(f"reference_model {reference_model!r} has no row; models: {sorted(table)}")
    ref = {k: set(v) for k, v in table[reference_model].items()}
    for model, keys in table.items():
        if {k: set(v) for k, v in keys.items()} != ref:
            raise ValueError(f"model {model!r} was not scored on the same (scenario, modality, case) triples as "
                             f"{reference_model!r}: the paired test needs identical cases")
    return table


def _paired_p(ref: np.ndarray, other: np.ndarray) -> str:
    """Two-sided paired Wilcoxon signed-rank p of ``ref`` vs ``other`` (same case order), as report text."""
    if not (np.isfinite(ref).all() and np.isfinite(other).all()):
        return "p n/a: inf"
    nonzero = int(np.count_nonzero(ref - other))
    if nonzero < MIN_WILCOXON_PAIRS:
        return "n too small"
    return f"p {format_p(wilcoxon_p(ref - other))}"


def _std(v: np.ndarray) -> float:
    return float(v.std(ddof=1)) if v.size > 1 and np.isfinite(v).all() else 0.0


def _cells(per_model: Mapping[str, Mapping[str, float]], reference_model: str) -> dict[str, _Cell]:
    """Per model, mean ± std over cases of per-case values, and the paired p against the reference."""
    case_ids = sorted(per_model[reference_model])
    ref = np.array([per_model[reference_model][c] for c in case_ids])
    out = {}
    for model, values in per_model.items():
        v = np.array([values[c] for c in case_ids])
        p = "" if model == reference_model else _paired_p(ref, v)
        out[model] = _Cell(float(v.mean()), _std(v), v.size, p)
    return out


def _fmt_cell(cell: _Cell, digits: int) -> str:
    text = f"{cell.mean:.{digits}f} ± {cell.std:.{digits}f}" if math.isfinite(cell.mean) else "inf"
    return f"{text} ({cell.p})" if cell.p else text


def _metric_table(
    groups: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]], models: Sequence[str], *, first: str,
    reference_model: str, digits: int,
) -> str:
    head = [first, "n", *[f"{m} (reference)" if m == reference_model else m for m in models]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, per_model in groups:
        cells = _cells(per_model, reference_model)
        n = cells[reference_model].n
        lines.append(f"| {label} | {n} | " + " | ".join(_fmt_cell(cells[m], digits) for m in models) + " |")
    return "\n".join(lines)


def _table_notes(reference_model: str) -> list[str]:
    return [
        "",
        f"*{METRIC_DEFINITION}*",
        "",
        f"*Mean ± std over the n cases; p: two-sided paired Wilcoxon signed-rank test of {reference_model} against "
        f"the column's model over the n cases (scipy.stats.wilcoxon, zero differences dropped); \"n too small\" "
        f"below {MIN_WILCOXON_PAIRS} non-zero differences, where p < 0.05 is unreachable.*",
        "",
    ]


def write_synthesis_report(
    rows: Sequence[SynthesisRow], out_dir: Path, *, reference_model: str, title: str, details: Sequence[str] = (),
    synthetic: bool,
) -> Path:
    """Write ``synthesis.csv`` (every row) and ``report.md`` (tables) into ``out_dir``; return the report's path.

    The report has, one table per metric:

    * **Summary**: rows = each synthesised modality (each case's values averaged over the scenarios in which it
      was synthesised) and "all" (averaged over every scenario and synthesised modality), then mean ± std over
      cases per model and the paired test on those per-case means;
    * **Per scenario**: rows = (scenario, synthesised modality), mean ± std over cases per model and, for every
      model other than ``reference_model``, the two-sided paired Wilcoxon signed-rank p-value of the reference
      against it over the cases (:func:`scipy.stats.wilcoxon` via :mod:`medmodal.evaluation.compare`; "n too
      small" below :data:`MIN_WILCOXON_PAIRS` non-zero differences; "p n/a: inf" where a PSNR is infinite).

    :data:`METRIC_DEFINITION` is printed under every table. Scenarios and modalities keep the rows' first-seen
    order; the reference model is the first column.

    Args:
        rows: per (model, scenario, case, modality) scores; every model must have the reference's triples.
        out_dir: folder to write into (created).
        reference_model: the model tested against every other one.
        title: the report's heading; details: bullet lines under it (run, split hash, sampler, ...).
        synthetic: the data are phantoms (adds :data:`SYNTHETIC_NOTE`).
    """
    if not rows:
        raise ValueError(f"{out_dir}: nothing to report (no synthesis row)")
    table = _per_case(rows, reference_model)
    models = [reference_model, *dict.fromkeys(r.model for r in rows if r.model != reference_model)]
    keys = list(dict.fromkeys((r.scenario, r.modality) for r in rows))
    modalities = list(dict.fromkeys(r.modality for r in rows))
    n_cases = len({r.case_id for r in rows})

    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out_dir / "synthesis.csv")
    text = [f"# {title}", ""] + ([SYNTHETIC_NOTE, ""] if synthetic else [])
    text += [f"- {d}" for d in details]
    text += [f"- models: {', '.join(models)} (reference: {reference_model}); cases: {n_cases}; "
             f"scenarios: {len({k[0] for k in keys})}; per-case values in `synthesis.csv`", ""]

    def averaged(metric: str, subset: Sequence[tuple[str, str]]) -> dict[str, dict[str, float]]:
        return {m: {c: float(np.mean([getattr(table[m][k][c], metric) for k in subset]))
                    for c in table[m][subset[0]]} for m in models}

    text += ["## Summary (mean over scenarios)", ""]
    for metric, label, digits in _METRICS:
        groups = [(mod, averaged(metric, [k for k in keys if k[1] == mod])) for mod in modalities]
        groups.append(("**all**", averaged(metric, keys)))
        text += [f"### {label}", "", _metric_table(groups, models, first="synthesised modality",
                                                   reference_model=reference_model, digits=digits)]
        text += _table_notes(reference_model)

    text += ["## Per scenario (given → missing) and synthesised modality", ""]
    for metric, label, digits in _METRICS:
        groups = [(f"{scen}: **{mod}**", {m: {c: getattr(r, metric) for c, r in table[m][(scen, mod)].items()}
                                          for m in models}) for scen, mod in keys]
        text += [f"### {label}", "", _metric_table(groups, models, first="scenario: synthesised",
                                                   reference_model=reference_model, digits=digits)]
        text += _table_notes(reference_model)
    return atomic_write_text(out_dir / "report.md", "\n".join(text))


# -------------------------------------------------------------------------------------------------- figures


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return _as_tensor(x).to(torch.float64).numpy()


def synthesis_figure(
    path: Path,
    *,
    inputs: np.ndarray | torch.Tensor,
    available: Sequence[bool] | np.ndarray | torch.Tensor,
    synthesized: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    modalities: Sequence[str],
    title: str,
) -> Path:
    """A PNG grid for one 2D slice: a row per modality; columns input, synthesised, truth and |error|.

    A missing modality's input panel is left blank and labelled "missing" (whatever the input holds there is not
    drawn). Images are drawn in grey on [0, 1]; the error column is ``|synthesised − truth|`` on one colour scale
    shared by all rows (0 to the largest error, at least 0.01), with a colour bar.

    Args:
        path: the PNG to write (atomically).
        inputs, synthesized, truth: ``(M, H, W)`` slices scaled to [0, 1].
        available: ``(M,)`` bool, True = the modality was given as input.
        modalities: the ``M`` names (row labels); title: the figure's title.
    """
    x, s, t = _as_numpy(inputs), _as_numpy(synthesized), _as_numpy(truth)
    avail = [bool(a) for a in np.asarray(available).ravel()]
    n = len(modalities)
    if x.ndim != 3 or not (x.shape == s.shape == t.shape) or x.shape[0] != n or len(avail) != n:
        raise ValueError(
            f"synthesis_figure: inputs, synthesized and truth must be (M, H, W) with M = {n} modalities and "
            f"available (M,), got {x.shape}, {s.shape}, {t.shape} and {len(avail)} flags"
        )
    err = np.abs(s - t)
    vmax = max(float(err.max()), 0.01)
    plt = pyplot()
    fig, axes = plt.subplots(n, 4, figsize=(8.4, 2.1 * n + 0.5), squeeze=False, constrained_layout=True)
    im = None
    for i, mod in enumerate(modalities):
        row = axes[i]
        if avail[i]:
            row[0].imshow(x[i], cmap="gray", vmin=0, vmax=1)
        else:
            row[0].text(0.5, 0.5, "missing", ha="center", va="center", transform=row[0].transAxes, fontsize=10)
        row[1].imshow(s[i], cmap="gray", vmin=0, vmax=1)
        row[2].imshow(t[i], cmap="gray", vmin=0, vmax=1)
        im = row[3].imshow(err[i], cmap="magma", vmin=0, vmax=vmax)
        row[0].set_ylabel(f"{mod} ({'given' if avail[i] else 'missing'})", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], ("input", "synthesised", "truth", "|synthesised − truth|"), strict=True):
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[:, 3].tolist(), shrink=0.8, label="absolute error")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def metric_vs_steps_figure(
    path: Path, steps: Sequence[int], values: Mapping[str, Sequence[float]], *, ylabel: str, title: str
) -> Path:
    """A metric (e.g. PSNR) against the sampler's number of steps, one line per series, log-scaled x axis.

    Args:
        path: the PNG to write (atomically).
        steps: positive step counts (x values).
        values: series name → one value per entry of ``steps``.
        ylabel, title: axis label and figure title.
    """
    if not steps or any(int(s) <= 0 for s in steps):
        raise ValueError(f"metric_vs_steps_figure: steps must be positive integers, got {list(steps)}")
    if not values:
        raise ValueError("metric_vs_steps_figure: no series to plot")
    for name, v in values.items():
        if len(v) != len(steps):
            raise ValueError(f"metric_vs_steps_figure: series {name!r} has {len(v)} values for {len(steps)} steps")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4), constrained_layout=True)
    for name, v in values.items():
        ax.plot(list(steps), list(v), marker="o", ms=4, lw=1.2, label=name)
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(steps)), [str(s) for s in sorted(set(steps))])
    ax.minorticks_off()
    ax.set(xlabel="sampler steps", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
