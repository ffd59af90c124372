"""The window-blending switch (``eval.blend``) and the window count of the spec's overlap 1/3."""

from __future__ import annotations

import math

import pytest
import torch
from monai.data.utils import compute_importance_map
from torch import nn

from medmodal.engine.plugin import get_method
from medmodal.engine.recipe import recipe_from_dict
from medmodal.evaluation.inference import predict_subsets, recorded_settings, window_count


class WindowConstant(nn.Module):
    """Logits constant over each window: channel r of a window is ``x[window start] * scale[r]``, so windows
    that overlap a voxel disagree about it (a 2D net of one modality)."""

    def __init__(self, scale: tuple[float, ...] = (1.0,)) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        first = image[:, :1, :1, :1]  # (B, 1, 1, 1): the window's first voxel
        return (first * self.scale.reshape(1, -1, 1, 1)).expand(-1, -1, *image.shape[2:]).contiguous()


class WindowCounter(nn.Module):
    """Zero logits; counts the windows and network calls it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.windows, self.calls = 0, 0

    def forward(self, image: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.windows += image.shape[0]
        return image.new_zeros(image.shape[0], 1, *image.shape[2:])


def _three_windows() -> torch.Tensor:
    """A 1×12 image swept by 1×8 windows at overlap 0.75: windows start at x = 0, 2, 4 (interval 2), and
    carry the logits 3, 3, -10 (the image at their starts); x = 4..7 is covered by all three."""
    image = torch.zeros(1, 1, 1, 12)
    image[0, 0, 0, [0, 2, 4]] = torch.tensor([3.0, 3.0, -10.0])
    return image


def test_mean_of_probabilities_and_gaussian_logits_give_the_hand_computed_values() -> None:
    net, image, mask = WindowConstant(), _three_windows(), torch.ones(1, 1, dtype=torch.bool)
    kw = dict(roi_size=(1, 8), overlap=0.75, sw_batch_size="auto")
    mean_prob = predict_subsets(net, image, mask, blend="mean_prob", **kw)[0, 0, 0]
    gaussian = predict_subsets(net, image, mask, blend="gaussian_logits", **kw)[0, 0, 0]

    z = {0: 3.0, 2: 3.0, 4: -10.0}  # window start -> its logit
    g = compute_importance_map((1, 8), mode="gaussian")[0]  # MONAI's (nnU-Net's) window weights
    for x in range(12):
        cover = [s for s in z if s <= x < s + 8]
        p = sum(1 / (1 + math.exp(-z[s])) for s in cover) / len(cover)
        assert torch.sigmoid(mean_prob[x]).item() == pytest.approx(p, abs=1e-6), x
        w = [float(g[x - s]) for s in cover]
        expected = sum(wi * z[s] for wi, s in zip(w, cover, strict=True)) / sum(w)
        assert gaussian[x].item() == pytest.approx(expected, abs=1e-5), x
    # x = 6 (window offsets 6, 4, 2): the mean probability (2σ(3) + σ(-10)) / 3 = 0.635 is foreground,
    # the Gaussian-weighted logit (the -10 window weighs most there) is background
    assert torch.sigmoid(mean_prob[6]) > 0.5 and gaussian[6] < 0
    assert (torch.sigmoid(mean_prob) > 0.5).tolist() != (torch.sigmoid(gaussian) > 0.5).tolist()


def test_mean_of_softmax_probabilities_for_label_tasks() -> None:
    net, image, mask = WindowConstant((1.0, -1.0)), _three_windows(), torch.ones(1, 1, dtype=torch.bool)
    out = predict_subsets(net, image, mask, roi_size=(1, 8), overlap=0.75, blend="mean_prob",
                          activation="softmax")[0]
    z = {0: 3.0, 2: 3.0, 4: -10.0}
    for x in (1, 3, 6, 11):
        cover = [s for s in z if s <= x < s + 8]
        mean = sum(torch.softmax(torch.tensor([z[s], -z[s]]), 0) for s in cover) / len(cover)
        torch.testing.assert_close(out[:, 0, x].softmax(0), mean, atol=1e-6, rtol=0)
    # a sigmoid blend of the same logits is a different, wrong rule for labels: guard against mixing them up
    wrong = predict_subsets(net, image, mask, roi_size=(1, 8), overlap=0.75, activation="sigmoid")[0]
    assert not torch.allclose(wrong[:, 0, 6].softmax(0), out[:, 0, 6].softmax(0), atol=1e-3)


def test_the_spec_overlap_of_one_third_gives_the_expected_window_count() -> None:
    # 17×18×19 with 8³ windows at overlap 1/3: starts every int(8 · 2/3) = 5 voxels, the last moved back to end
    # at the border: 0, 5, 9 | 0, 5, 10 | 0, 5, 10, 11 → 3 · 3 · 4 = 36 windows (at overlap 0.25: 3 · 3 · 3)
    assert window_count((17, 18, 19), (8, 8, 8), 1 / 3) == 36
    assert window_count((17, 18, 19), (8, 8, 8), 0.25) == 27
    assert window_count((32, 64, 64), (32, 32, 32), 1 / 3) == 9  # the quickstart case: 1 · 3 · 3
    assert window_count((5, 6, 7), (8, 8, 8), 1 / 3) == 1  # padded up to one window
    for overlap, expected in ((1 / 3, 36), (0.25, 27)):
        net = WindowCounter()
        predict_subsets(net, torch.zeros(1, 1, 17, 18, 19), torch.ones(1, 1, dtype=torch.bool),
                        roi_size=(8, 8, 8), overlap=overlap)
        assert net.windows == expected and net.calls == 1  # "auto": every window in one call


def test_the_recipe_default_is_the_spec_rule_and_is_recorded_for_the_run() -> None:
    recipe = recipe_from_dict({"data": {"patch_size": [16, 16, 16]}})
    assert recipe.eval.blend == "mean_prob" and recipe.eval.overlap == pytest.approx(1 / 3)
    assert recipe.eval.sw_batch_size == "auto"
    inference = get_method("zero_fill").inference_settings(recipe)  # what run.json records
    assert inference["blend"] == "mean_prob" and inference["overlap"] == pytest.approx(1 / 3)
    settings = recorded_settings(inference, task_kind="regions")
    assert settings["blend"] == "mean_prob" and settings["activation"] == "sigmoid"
    assert settings["sw_batch_size"] == "auto" and settings["roi_size"] == [16, 16, 16]
    assert settings["channels_last"] is True  # windows in the format the network was trained in
    assert recorded_settings(inference, task_kind="labels")["activation"] == "softmax"


def test_a_run_recorded_before_the_switch_keeps_gaussian_logits() -> None:
    old = {"roi_size": [32, 32, 32], "overlap": 0.25, "sw_batch_size": 1}
    settings = recorded_settings(old, task_kind="regions")
    assert settings["blend"] == "gaussian_logits" and settings["channels_last"] is False


def test_bad_arguments_are_one_line_errors() -> None:
    net, image, mask = WindowConstant(), _three_windows(), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="blend must be one of"):
        predict_subsets(net, image, mask, roi_size=(1, 8), blend="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sw_batch_size must be"):
        predict_subsets(net, image, mask, roi_size=(1, 8), sw_batch_size=0)
