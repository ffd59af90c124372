from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medmodal.evaluation.inference import nonempty_subsets, predict_subsets, subset_masks
from medmodal.evaluation.metrics import region_metrics
from medmodal.evaluation.report import markdown_table, plot_heatmap, read_rows, summarise, write_rows
from medmodal.evaluation.subsets import SubsetResult
from medmodal.networks.registry import create_network

MODS = ("t1", "t1c", "t2", "flair")


def test_fifteen_subsets_in_a_stable_order() -> None:
    subs = nonempty_subsets(MODS)
    assert len(subs) == 15 and len(set(subs)) == 15
    assert subs[0] == ("t1",) and subs[-1] == MODS
    masks = subset_masks(MODS, subs)
    assert masks.shape == (15, 4) and masks.any(1).all()
    with pytest.raises(ValueError, match="unknown modality"):
        subset_masks(MODS, [("t1", "dwi")])


@pytest.mark.parametrize("shape", [(17, 18, 19), (29, 31)])
def test_batched_subsets_equal_one_subset_at_a_time(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    dims = len(shape)
    net = create_network("unet_tiny", spatial_dims=dims, modalities=MODS, out_channels=3).eval()
    image = torch.randn(1, 4, *shape)
    masks = subset_masks(MODS, nonempty_subsets(MODS))
    roi = (12,) * dims
    together = predict_subsets(net, image, masks, roi_size=roi, overlap=0.25, sw_batch_size=2)
    assert together.shape == (15, 3, *shape)
    for k in (0, 6, 14):
        alone = predict_subsets(net, image, masks[k : k + 1], roi_size=roi, overlap=0.25, sw_batch_size=2)
        torch.testing.assert_close(together[k], alone[0], atol=1e-5, rtol=1e-5)


def test_predict_subsets_rejects_empty_mask() -> None:
    net = create_network("unet_tiny", spatial_dims=2, modalities=MODS, out_channels=3)
    with pytest.raises(ValueError, match="at least one"):
        predict_subsets(net, torch.randn(1, 4, 9, 9), torch.zeros(1, 4, dtype=torch.bool), roi_size=(8, 8))


def test_region_metrics_conventions() -> None:
    target = torch.zeros(1, 3, 9, 10, 11, dtype=torch.bool)
    target[0, 0, 2:6, 2:6, 2:6] = True  # region 0 present; regions 1, 2 empty
    pred = torch.zeros(2, 3, 9, 10, 11, dtype=torch.bool)
    pred[0, 0] = target[0, 0]  # perfect
    pred[1, 0, 2:6, 2:6, 3:7] = True  # shifted by one voxel
    pred[1, 1, 0, 0, 0] = True  # false positive in an empty region
    dice, hd = region_metrics(pred, target, spacing=(1.0, 1.0, 2.0))
    assert dice[0].tolist() == [1.0, 1.0, 1.0]
    assert hd[0].tolist() == [0.0, 0.0, 0.0]
    assert 0.7 < dice[1, 0] < 0.8 and math.isclose(hd[1, 0], 2.0)  # one voxel of 2 mm along z
    assert dice[1, 1] == 0.0 and math.isnan(hd[1, 1])
    assert dice[1, 2] == 1.0 and hd[1, 2] == 0.0


def test_report_files(tmp_path) -> None:
    rows = [
        SubsetResult("unet", f"c{c}", s, s.count("+") + 1, r, d, h)
        for c, d, h in ((0, 0.8, 2.0), (1, 0.6, float("nan")))
        for s in ("t1", "t1+flair")
        for r in ("WT", "ET")
    ]
    write_rows(rows, tmp_path / "rows.csv")
    back = read_rows(tmp_path / "rows.csv")
    assert back[0] == rows[0] and math.isnan(back[-1].hd95)
    summary = summarise(rows)
    assert len(summary) == 4
    s = summary[0]
    assert math.isclose(s.dice_mean, 0.7) and math.isclose(s.dice_std, np.std([0.8, 0.6], ddof=1))
    assert s.hd95_undefined == 1 and s.hd95_median == 2.0
    table = markdown_table(summary)
    assert "| t1+flair | 0.700 ± 0.141 |" in table
    png = plot_heatmap(summary, tmp_path / "h.png", title="test")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_training_curves_figure(tmp_path) -> None:
    from medmodal.evaluation.report import plot_training_curves

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,name,value\n10,train/loss,1.5\n20,train/loss,1.1\n20,val/dice_WT,0.4\n"
                        "20,val/dice_mean,0.3\n40,val/dice_WT,0.6\n", encoding="utf-8")
    png = plot_training_curves(csv_path, tmp_path / "curves.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_rows_round_trip_commas_quotes_and_new_lines(tmp_path) -> None:
    tricky = SubsetResult('a,"b"', 'case, "one"\nline two', "t1+flair", 2, 'W"T', 0.25, float("nan"))
    plain = SubsetResult("unet", "c1", "t1", 1, "ET", 0.5, 3.0)
    path = write_rows([tricky, plain], tmp_path / "rows.csv")
    back = read_rows(path)
    assert len(back) == 2
    assert back[0].model == 'a,"b"' and back[0].case_id == 'case, "one"\nline two' and back[0].region == 'W"T'
    assert back[0].subset == "t1+flair" and back[0].n_modalities == 2 and back[0].dice == 0.25
    assert math.isnan(back[0].hd95)
    assert back[1] == plain
    assert not [p.name for p in tmp_path.iterdir() if p.name != "rows.csv"]  # no temporary file left


def test_report_rows_refuse_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="nothing to write"):
        write_rows([], tmp_path / "rows.csv")
    assert not (tmp_path / "rows.csv").exists()
