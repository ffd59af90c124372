"""``medmodal experiment m2dn --fast`` end to end: four trained runs per seed, the synthesis report against three
baselines, and the downstream segmentation tables; a rerun reuses the runs and reproduces the report."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.methods.m2dn.experiment import completed_cases, zscore_in

runner = CliRunner()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m2dn_exp") / "exp"
    result = runner.invoke(app, ["experiment", "m2dn", "--fast", "--seeds", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _csv_means(path: Path) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            psnr = float(row["psnr"])
            if np.isfinite(psnr):
                values.setdefault(row["model"], []).append(psnr)
    return {k: float(np.mean(v)) for k, v in values.items()}


def test_report_holds_every_model_and_its_measured_psnr(experiment: Path) -> None:
    report = (experiment / "report.md").read_text(encoding="utf-8")
    means = _csv_means(experiment / "synthesis" / "synthesis.csv")
    assert set(means) == {"m2dn", "regression", "zero fill", "mean fill"}
    for model, value in means.items():  # the summary table shows the mean of the per-case rows
        line = next(line for line in report.splitlines() if line.startswith(f"| {model} |"))
        assert float(line.split("|")[2]) == pytest.approx(value, abs=5e-3), (model, line)
    for run in ("m2dn@0", "regression@0", "shaspec@0", "zero_fill@0", "all4@0"):
        assert (experiment / run / "weights" / "model.safetensors").is_file()
    # both segmenters: 14 subsets x 3 regions, plus the mean over subsets, for M2DN and the regression completion
    for method in ("shaspec", "zero_fill", "all4"):
        section = report.split(f"### {method}")[1].split("###")[0]
        rows = [line for line in section.splitlines() if re.match(r"\| [a-z0-9+*]", line) and "| region |" not in line]
        assert len(rows) == 14 * 3 + 3 + 3, (method, len(rows))
    assert sorted((experiment / "figures").glob("scenario_*.png"))


def test_rerun_reuses_the_runs_and_reproduces_the_report(experiment: Path) -> None:
    first = (experiment / "report.md").read_text(encoding="utf-8")
    result = runner.invoke(app, ["experiment", "m2dn", "--fast", "--seeds", "0", "--out", str(experiment)])
    assert result.exit_code == 2 and "--overwrite" in result.output  # a finished experiment is kept
    (experiment / "report.md").unlink()
    stamp = (experiment / "m2dn@0" / "weights" / "model.safetensors").stat().st_mtime_ns
    result = runner.invoke(app, ["experiment", "m2dn", "--fast", "--seeds", "0", "--out", str(experiment)])
    assert result.exit_code == 0, result.output
    assert (experiment / "m2dn@0" / "weights" / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert (experiment / "report.md").read_text(encoding="utf-8") == first  # seeded sampling: the same numbers


def test_completion_keeps_the_given_channels_and_normalises_the_synthesised_ones(experiment: Path) -> None:
    from medmodal.engine.cases import evaluation_cases
    from medmodal.engine.runinfo import load_run

    run = load_run(experiment / "m2dn@0")
    cases, _, _ = evaluation_cases(run, split="val", data=None, progress=False)
    pattern = (True, False, True, False)
    (row,) = completed_cases(experiment / "m2dn@0", cases[:1], [pattern])[0:1]
    done, image = row[0].image(), np.asarray(cases[0].image())
    assert np.array_equal(done[[0, 2]], image[[0, 2]])  # given channels untouched
    region = (image[[0, 2]] != 0).any(axis=0)
    for m in (1, 3):  # synthesised channels: zero mean, unit std over the given channels' region
        assert not np.array_equal(done[m], image[m])
        assert done[m][region].mean() == pytest.approx(0.0, abs=1e-4)
        assert done[m][region].std() == pytest.approx(1.0, abs=1e-3)


def test_zscore_in_a_region() -> None:
    values = np.array([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    region = np.array([[True, True, True], [False, True, False]])
    out = zscore_in(values, region)
    v = np.array([1.0, 2.0, 3.0, 0.0])
    expect = (v - v.mean()) / v.std()
    assert np.allclose(out[region], expect) and out[1, 0] == 0.0 and out[1, 2] == 0.0
    assert not zscore_in(values, np.zeros_like(region)).any()
