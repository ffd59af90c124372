"""The M2DN plug-in (``medmodal.methods.m2dn``): its intensity space, filling a case, the recipe section, training on
incomplete data, the EMA sampling weights, ``medmodal synthesize`` and ``medmodal evaluate``.

The tiny runs are trained once per module through the ``medmodal`` command (:func:`runs`).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.data.formats import open_dataset
from medmodal.data.phantom import write_phantom
from medmodal.engine.plugin import get_method
from medmodal.engine.recipe import RecipeError, recipe_from_dict
from medmodal.engine.runinfo import load_run
from medmodal.methods.m2dn import network_settings
from medmodal.methods.m2dn.data import CaseIntensity, otsu_threshold, to_unit
from medmodal.methods.m2dn.diffusion import MaskedDiffusion
from medmodal.methods.m2dn.inference import SamplerSettings, fill_case, regression_input
from medmodal.networks.registry import create_network

runner = CliRunner()
SIZE_2D = [33, 34]


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    return " ".join(lines[0].split())


def train(root: Path, recipe: dict, *sets: str) -> tuple[int, str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    args = [x for s in sets for x in ("--set", s)]
    code, text = invoke("train", root / "recipe.yaml", "--out", root / "run", *args)
    return code, text, root / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``m2dn_2d``: the 2D contract recipe trained 3 steps (EMA 0.9); ``m2dn_3d``: the 3D one, 2 steps;
    ``zero_fill``: zero_fill's 2D one, 1 step."""
    root = tmp_path_factory.mktemp("m2dn_runs")
    out = {}
    code, text, out["m2dn_2d"] = train(root / "m2dn_2d", get_method("m2dn").contract_recipe(2), "train.max_steps=3")
    assert code == 0, text
    code, text, out["m2dn_3d"] = train(root / "m2dn_3d", get_method("m2dn").contract_recipe(3), "train.max_steps=2",
                                       "train.val_every_steps=2")
    assert code == 0, text
    code, text, out["zero_fill"] = train(root / "zero_fill", get_method("zero_fill").contract_recipe(2),
                                         "train.max_steps=1", "train.val_every_steps=1")
    assert code == 0, text
    return out


# -- 1. intensity space ----------------------------------------------------------------------------------------
def ramp_case(background: np.ndarray | float, fg_low: float, fg_step: float) -> tuple[np.ndarray, np.ndarray]:
    """``(3, 15, 17)``: channel 0 a ramp of 201 foreground values, channel 1 twice it, channel 2 junk (missing)."""
    shape = (15, 17)
    fg = (np.arange(np.prod(shape)) < 201).reshape(shape)
    ramp = np.zeros(shape)
    ramp[fg] = fg_low + fg_step * np.arange(201)
    image = np.stack([np.where(fg, ramp, background), np.where(fg, 2 * ramp, background),
                      np.random.default_rng(0).normal(size=shape) * 50]).astype(np.float32)
    return image, fg


def test_intensity_zero_background_uses_the_nonzero_rule_and_exact_percentiles() -> None:
    image, fg = ramp_case(0.0, 1.0, 1.0)  # foreground 1..201: percentile 0.5 → 2, 99.5 → 200
    avail = [True, True, False]
    stats = CaseIntensity.of_case(image, avail)
    assert stats.threshold is None
    np.testing.assert_allclose(stats.ranges, [[2.0, 200.0], [4.0, 400.0], [0.0, 1.0]], rtol=1e-6)
    assert np.array_equal(stats.foreground(image, avail), fg)
    x = stats.to_model(image, avail)
    assert x.shape == image.shape and x.dtype == np.float32
    flat0 = x[0][fg]
    assert flat0[1] == pytest.approx(-1.0) and flat0[199] == pytest.approx(1.0)  # values 2 and 200
    assert flat0[100] == pytest.approx(0.0, abs=1e-6)  # value 101, mid-range
    assert flat0[0] == -1.0 and flat0[200] == 1.0  # clipped below / above the percentiles
    np.testing.assert_allclose(x[1][fg], flat0, atol=1e-6)  # channel 1 is an affine copy
    assert (x[:2][:, ~fg] == -1.0).all()  # background
    assert (x[2] == -1.0).all()  # missing channel
    np.testing.assert_allclose(to_unit(x)[0][fg][100], 0.5, atol=1e-6)


def test_intensity_noisy_background_switches_to_otsu() -> None:
    noise = np.abs(np.random.default_rng(1).normal(0.0, 2.0, size=(15, 17))) + 0.01  # Rician-like, never zero
    image, fg = ramp_case(noise, 100.0, 0.1)  # foreground 100..120
    avail = [True, True, False]
    stats = CaseIntensity.of_case(image, avail)
    assert stats.threshold is not None
    fg_mean = image[:2].mean(0)
    assert fg_mean[~fg].max() < stats.threshold < fg_mean[fg].min()
    assert np.array_equal(stats.foreground(image, avail), fg)  # the noise is not foreground
    # percentiles over the foreground only: a noise voxel in the statistics would pull the low end to ~0
    np.testing.assert_allclose(stats.ranges[0], [100.1, 119.9], rtol=1e-6)
    np.testing.assert_allclose(stats.ranges[1], [200.2, 239.8], rtol=1e-6)
    x = stats.to_model(image, avail)
    assert (x[:, ~fg] == -1.0).all() and (x[2] == -1.0).all()
    assert x[0][fg].min() == -1.0 and x[0][fg].max() == 1.0


def test_otsu_threshold_lies_between_the_modes() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0.0, 1.0, 4000), rng.normal(10.0, 1.0, 4000)])
    t = otsu_threshold(values)
    assert 3.5 < t < 6.5
    shifted = otsu_threshold(values * 3 + 7)  # an affine map moves the threshold with it
    assert shifted == pytest.approx(t * 3 + 7, abs=3 * (values.max() - values.min()) / 256 + 1e-9)
    assert otsu_threshold(np.full(10, 4.0)) == 4.0


def test_to_unit_round_trip() -> None:
    u = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(to_unit(u * 2 - 1), u, atol=1e-12)
    t = torch.linspace(0.0, 1.0, 11)
    assert torch.allclose(to_unit(t * 2 - 1), t, atol=1e-6)
    assert to_unit(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]
    assert to_unit(np.array([-3.0, 3.0])).tolist() == [0.0, 1.0]


# -- 2. fill_case ----------------------------------------------------------------------------------------------
MODS3 = ["t1", "t2", "flair"]


def tiny_denoiser(*, regression: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"mask_cond": "input_concat", "time_embedding": False} if regression else {}
    return create_network("m2dn_denoiser_tiny", spatial_dims=2, modalities=MODS3, out_channels=3, **kw).eval()


@pytest.mark.parametrize("batch_size", [1, 7])
def test_fill_case_slice_mode_equals_filling_each_slice(batch_size: int) -> None:
    net = tiny_denoiser(regression=True)
    image = torch.rand(3, 9, 10, 5, generator=torch.Generator().manual_seed(3)) * 2 - 1
    patterns = torch.tensor([[True, False, True], [False, True, False]])
    diffusion = MaskedDiffusion(timesteps=10)
    out = fill_case(net, image, patterns, model_dims=2, mode="regression", diffusion=diffusion,
                    settings=SamplerSettings(), batch_size=batch_size, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 9, 10, 5)
    expected = torch.empty_like(out)
    with torch.no_grad():
        for k in range(2):
            avail = patterns[k][None]
            for z in range(5):
                x = image[..., z][None]
                pred = net(regression_input(x, avail), avail, torch.zeros(1, dtype=torch.long)).clamp(-1, 1)
                expected[k, ..., z] = torch.where(avail[..., None, None], x, pred)[0]
    assert torch.allclose(out, expected, atol=1e-5)
    for k in range(2):
        assert torch.equal(out[k][patterns[k]], image[patterns[k]])  # available channels bit-exact
        assert not torch.allclose(out[k][~patterns[k]], image[~patterns[k]])


def test_fill_case_3d_model_on_a_2d_case_is_refused() -> None:
    with pytest.raises(ValueError, match="3D model cannot fill a 2D case"):
        fill_case(tiny_denoiser(regression=True), torch.zeros(3, 9, 10), torch.tensor([[True, False, True]]),
                  model_dims=3, mode="regression", diffusion=MaskedDiffusion(timesteps=10),
                  settings=SamplerSettings(), batch_size=2, generator=torch.Generator())


def test_fill_case_diffusion_is_seeded_by_its_generator() -> None:
    net = tiny_denoiser(regression=False)
    image = torch.rand(3, 9, 10, generator=torch.Generator().manual_seed(4)) * 2 - 1
    patterns = torch.tensor([[True, False, False], [False, True, True]])
    diffusion = MaskedDiffusion(timesteps=6)

    def run(seed: int) -> torch.Tensor:
        return fill_case(net, image, patterns, model_dims=2, mode="diffusion", diffusion=diffusion,
                         settings=SamplerSettings(sampler="ddpm"), batch_size=2,
                         generator=torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    for k in range(2):
        assert torch.equal(a[k][patterns[k]], image[patterns[k]])
        assert torch.equal(c[k][patterns[k]], image[patterns[k]])
        assert not torch.allclose(a[k][~patterns[k]], c[k][~patterns[k]])


# -- 3. the recipe section -------------------------------------------------------------------------------------
def recipe_dict(*, model: dict | None = None, **method) -> dict:
    r = get_method("m2dn").contract_recipe(2)
    r["method"].update(method)
    if model is not None:
        r["model"] = model
    return r


def test_variant_u_sets_loss_channels_and_mask_cond(tmp_path: Path, monkeypatch) -> None:
    recipe = recipe_from_dict(recipe_dict(variant="U"))
    assert recipe.method.loss_channels == "missing"
    assert network_settings(recipe, MODS3)["mask_cond"] == "none"
    assert recipe_from_dict(recipe_dict(variant="U+J")).method.loss_channels == "all"
    assert network_settings(recipe_from_dict(recipe_dict(variant="U+M")), MODS3)["mask_cond"] == "bottleneck_concat"
    # the built training: network kwargs and the system's loss channels follow the variant
    monkeypatch.setenv("MEDMODAL_CACHE", str(tmp_path / "cache"))
    training = get_method("m2dn").build(recipe)
    assert training.network_kwargs["mask_cond"] == "none"
    assert training.system.loss_channels == "missing"
    assert training.network_kwargs["modalities"] == ["t1", "t1c", "t2", "flair"]


@pytest.mark.parametrize(("section", "needles"), [
    ({"variant": "U", "loss_channels": "all"}, ["variant U", "loss_channels", "missing", "all"]),
    ({"objective": "pred_eps", "loss_channels": "all"}, ["pred_eps", "loss_channels: missing"]),
    ({"sampler": "ddpm", "eta": 0.3}, ["eta", "ddpm"]),
    ({"mask_dist": "fixed"}, ["mask_dist", "fixed_available"]),
], ids=["variant-loss", "pred_eps-all", "ddpm-eta", "fixed-without-available"])
def test_conflicting_method_settings_are_refused(section: dict, needles: list[str]) -> None:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(recipe_dict(**section))
    assert "method" in str(err.value)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_mask_cond_conflicting_with_variant_or_mode() -> None:
    recipe = recipe_from_dict(recipe_dict(variant="U", model={"name": "m2dn_denoiser_tiny",
                                                               "kwargs": {"mask_cond": "film"}}))
    with pytest.raises(RecipeError, match=r"model.kwargs.mask_cond: variant U sets it to 'none'"):
        network_settings(recipe, MODS3)
    reg = recipe_from_dict(recipe_dict(mode="regression"))
    kw = network_settings(reg, MODS3)
    assert kw["time_embedding"] is False and kw["mask_cond"] == "input_concat"
    assert kw["out_channels"] == 3 and kw["spatial_dims"] == 2
    bad = recipe_from_dict(recipe_dict(mode="regression", model={"name": "m2dn_denoiser_tiny",
                                                                 "kwargs": {"time_embedding": True}}))
    with pytest.raises(RecipeError, match=r"model.kwargs.time_embedding: mode regression"):
        network_settings(bad, MODS3)


def test_model_name_and_fixed_available_are_checked(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(RecipeError, match=r"model.name: .*'unet'"):
        recipe_from_dict(recipe_dict(model={"name": "unet", "kwargs": {"channels": [4, 8]}}))
    r = recipe_dict(mask_dist="fixed", fixed_available=["t1", "xyz"])
    r["data"]["modalities"] = ["t1", "t2"]
    with pytest.raises(RecipeError, match=r"method.fixed_available: \['xyz'\]"):
        recipe_from_dict(r)
    # without data.modalities the names are checked against the data when the training is built
    monkeypatch.setenv("MEDMODAL_CACHE", str(tmp_path / "cache"))
    recipe = recipe_from_dict(recipe_dict(mask_dist="fixed", fixed_available=["t1", "xyz"]))
    with pytest.raises(RecipeError, match=r"method.fixed_available: unknown modality\(ies\) \['xyz'\]"):
        get_method("m2dn").build(recipe)


# -- 4. training on incomplete data, 5. EMA --------------------------------------------------------------------
def test_incomplete_cases_error_then_mask_and_ema_zero(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, text = invoke("data", "phantom", "--out", data, "--cases", 4, "--dims", 2, "--size", 33, "--seed", 4,
                        "--missing-rate", "0.3")
    assert code == 0, text
    assert any(len(r.images) < 4 for r in open_dataset(data)[1])
    recipe = get_method("m2dn").contract_recipe(2)
    recipe["data"] = {**{k: v for k, v in recipe["data"].items() if k != "phantom"}, "path": str(data),
                      "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25}
    recipe["train"].update(max_steps=2, val_every_steps=2)
    code, text, _ = train(tmp_path / "error", recipe)
    assert code == 2, text
    assert "incomplete_cases" in one_error_line(text)
    recipe["method"].update(incomplete_cases="mask", ema_decay=0.0)
    code, text, run = train(tmp_path / "mask", recipe)
    assert code == 0, text
    online, ema, saved = ema_weights(run)
    for key, value in online.items():  # decay 0: the sampling weights are the trained ones
        assert torch.equal(value, ema[key]), key
        assert torch.equal(saved[key], ema[key]), key


def ema_weights(run: Path) -> tuple[dict, dict, dict]:
    """(online, EMA) from last.ckpt's state_dict and the saved weights/model.safetensors."""
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    online = {k.removeprefix("online."): v for k, v in state.items() if k.startswith("online.")}
    ema = {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}
    saved = load_file(run / "weights" / "model.safetensors")
    assert online and set(online) == set(ema) == set(saved)
    return online, ema, saved


def test_ema_weights_are_saved_and_differ_from_the_online_ones(runs) -> None:
    online, ema, saved = ema_weights(runs["m2dn_2d"])
    for key in saved:
        assert torch.equal(saved[key], ema[key]), key
    float_keys = [k for k, v in online.items() if v.is_floating_point() and v.numel() > 1]
    assert any(not torch.equal(online[k], ema[k]) for k in float_keys)


# -- 6. medmodal synthesize ------------------------------------------------------------------------------------
def incomplete_phantom(out: Path, dims: int) -> Path:
    """3 phantom cases (33×34 or 17×18×19) in BraTS layout: phantom_000 complete, 001 and 002 lack modalities."""
    root = write_phantom(out, cases=3, seed=4, spatial_dims=dims, size=SIZE_2D if dims == 2 else [17, 18, 19],
                         missing_rate=0.3)
    have = {r.case_id: set(r.images) for r in open_dataset(root)[1]}
    assert len(have["phantom_000"]) == 4 and all(len(have[c]) < 4 for c in ("phantom_001", "phantom_002"))
    return root


@pytest.fixture(scope="module")
def incomplete_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return incomplete_phantom(tmp_path_factory.mktemp("incomplete") / "ph", 2)


def synthetic_arrays(out: Path) -> dict[str, np.ndarray]:
    return {f.name: np.asarray(nib.load(f).dataobj) for f in sorted(out.rglob("*_synthetic.nii.gz"))}


@pytest.mark.parametrize("dims", [2, 3])
def test_synthesize_brats_data_set(runs, incomplete_2d: Path, tmp_path: Path, dims: int) -> None:
    run = runs[f"m2dn_{dims}d"]
    data = incomplete_2d if dims == 2 else incomplete_phantom(tmp_path / "ph", 3)
    assert load_run(run).info.spatial_dims == dims
    mods = list(load_run(run).info.modalities)
    out = tmp_path / "out"
    code, text = invoke("synthesize", run, "--data", data, "--out", out)
    assert code == 0, text
    _, before = open_dataset(data)
    _, after = open_dataset(out)
    assert [r.case_id for r in after] == [r.case_id for r in before]
    side = json.loads((out / "synthetic.json").read_text())
    assert side["complete"] == ["phantom_000"]
    assert side["provenance"]["seed"] == 0 and side["provenance"]["sampler"] == "ddim"
    for rec_in, rec_out in zip(before, after, strict=True):
        assert set(rec_out.images) == set(mods)  # every case complete
        missing = [m for m in mods if m not in rec_in.images]
        assert side["synthetic"].get(rec_in.case_id, []) == missing
        for m, f in rec_in.images.items():  # acquired files copied byte for byte
            assert Path(rec_out.images[m]).read_bytes() == Path(f).read_bytes()
        if not missing:
            continue
        ref = nib.load(next(iter(rec_in.images.values())))
        raw = np.stack([np.asarray(nib.load(rec_in.images[m]).dataobj, dtype=np.float32) for m in mods
                        if m in rec_in.images])
        fg = CaseIntensity.of_case(raw, [True] * len(raw)).foreground(raw, [True] * len(raw))
        assert 0 < fg.sum() < fg.size
        for m in missing:
            path = Path(rec_out.images[m])
            assert path.name.endswith(f"_{m}_synthetic.nii.gz")
            img = nib.load(path)
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
            arr = np.asarray(img.dataobj)
            assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0 and arr.max() > 0.0
            assert (arr[~fg] == 0).all() and arr[fg].max() > 0.0  # zero outside the case's foreground


def test_synthesize_nnunet_copy(runs, incomplete_2d: Path, tmp_path: Path) -> None:
    nn = tmp_path / "nn"
    code, text = invoke("data", "convert", incomplete_2d, nn, "--to", "nnunet")
    assert code == 0, text
    out = tmp_path / "out"
    code, text = invoke("synthesize", runs["m2dn_2d"], "--data", nn, "--out", out)
    assert code == 0, text
    info, recs = open_dataset(out)
    assert all(len(r.images) == 4 for r in recs) and len(recs) == 3
    side = json.loads((out / "synthetic.json").read_text())
    assert side["complete"] == ["phantom_000"] and set(side["synthetic"]) == {"phantom_001", "phantom_002"}
    assert json.loads((out / "dataset.json").read_text())["medmodal"]


def test_synthesize_is_seeded_and_refuses_bad_calls(runs, incomplete_2d: Path, tmp_path: Path) -> None:
    run = runs["m2dn_2d"]
    arrays = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, text = invoke("synthesize", run, "--data", incomplete_2d, "--out", tmp_path / name, "--seed", seed)
        assert code == 0, text
        arrays[name] = synthetic_arrays(tmp_path / name)
    assert arrays["a"].keys() == arrays["c"].keys() and len(arrays["a"]) >= 2
    assert all(np.array_equal(arrays["a"][k], arrays["b"][k]) for k in arrays["a"])
    assert any(not np.array_equal(arrays["a"][k], arrays["c"][k]) for k in arrays["a"])

    out = tmp_path / "bad"
    for extra, needle in ((["--sampler", "ddpm", "--steps", "5"], "--steps 5"),
                          (["--sampler", "bogus"], "--sampler"),
                          (["--sampler", "ddpm", "--eta", "0.5"], "--eta")):
        code, text = invoke("synthesize", run, "--data", incomplete_2d, "--out", out, *extra)
        assert code == 2, (extra, text)
        assert needle in one_error_line(text)
        assert not out.exists() or not any(out.iterdir())
    code, text = invoke("synthesize", run, "--data", incomplete_2d, "--out", tmp_path / "a")
    assert code == 2, text
    assert str(tmp_path / "a") in " ".join(text.split()) and "--overwrite" in one_error_line(text)

    # a manifest naming a modality the run does not know
    manifest = tmp_path / "extra.json"
    code, text = invoke("data", "convert", incomplete_2d, manifest, "--to", "manifest")
    assert code == 0, text
    doc = json.loads(manifest.read_text())
    doc["modalities"].append("xyz")
    case = doc["cases"][1]
    case["images"]["xyz"] = next(iter(case["images"].values()))
    manifest.write_text(json.dumps(doc))
    code, text = invoke("synthesize", run, "--data", manifest, "--out", out)
    assert code == 2, text
    assert "xyz" in one_error_line(text)

    # two images of one case on different grids
    big = write_phantom(tmp_path / "big", cases=1, seed=9, spatial_dims=2, size=[35, 34])
    t1 = next(incomplete_2d.rglob("phantom_000_t1.nii.gz"))
    t2 = next(big.rglob("*_t2.nii.gz"))
    code, text = invoke("synthesize", run, "--image", f"t1={t1}", "--image", f"t2={t2}", "--case-id", "odd",
                        "--out", out)
    assert code == 2, text
    # --image input of a phantom-trained model is warned about, then one error line (the progress bar is gone)
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], text
    assert all(line.startswith(("warning:", "error:", " ")) for line in lines), text
    assert "case 'odd'" in errors[0] and "not on the same grid" in errors[0]

    code, text = invoke("synthesize", runs["zero_fill"], "--data", incomplete_2d, "--out", out)
    assert code == 2, text
    assert "synthesize is not offered" in one_error_line(text)
    assert not out.exists() or not any(out.iterdir())


# -- 7. medmodal evaluate --------------------------------------------------------------------------------------
def test_evaluate_scores_14_scenarios_and_zero_fill_by_hand(runs, tmp_path: Path) -> None:
    from medmodal.engine.cases import evaluation_cases

    run = runs["m2dn_2d"]
    code, text = invoke("evaluate", run, "--out", tmp_path / "e")
    assert code == 0, text
    with (tmp_path / "e" / "synthesis.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"m2dn", "zero fill", "mean fill"}
    assert len({r["scenario"] for r in rows}) == 14
    for model in ("m2dn", "zero fill", "mean fill"):
        assert len({r["scenario"] for r in rows if r["model"] == model}) == 14
    report = (tmp_path / "e" / "report.md").read_text(encoding="utf-8")
    assert sum(s in report for s in {r["scenario"] for r in rows}) == 14

    loaded = load_run(run)
    cases, _, _ = evaluation_cases(loaded, split="val", data=None, progress=False)
    case = cases[0]
    image = np.asarray(case.image(), dtype=np.float32)
    present = np.asarray(case.available, dtype=bool)
    stats = CaseIntensity.of_case(image, present)
    truth = to_unit(stats.to_model(image, present))
    mask = stats.foreground(image, present)
    mods = list(loaded.info.modalities)
    zero_rows = [r for r in rows if r["model"] == "zero fill" and r["case_id"] == case.case_id]
    assert len(zero_rows) == 28  # Σ over k given of C(4, k)·(4 − k) synthesised images: 12 + 12 + 4
    for r in zero_rows:
        t = truth[mods.index(r["modality"])][mask]
        assert float(r["mae"]) == pytest.approx(float(t.mean()), rel=1e-4, abs=1e-6)
        assert float(r["psnr"]) == pytest.approx(10 * np.log10(1 / float((t**2).mean())), rel=1e-4)
    shutil.rmtree(tmp_path / "e")


@pytest.mark.parametrize("dims", [2, 3])
def test_synthesize_on_a_permuted_grid_gives_the_same_image(runs, tmp_path: Path, dims: int) -> None:
    """The same physical volume stored with permuted voxel axes (the affine permuted to match) is synthesised into
    the same image on its own grid: preprocessing reorients both to RAS, the output is mapped back exactly. The 2D
    run is a 2D model on a 3D volume (slice by slice along the canonical last axis)."""
    root = write_phantom(tmp_path / "ph", cases=1, seed=9, spatial_dims=3, size=[17, 18, 19])
    files = {m: next(root.rglob(f"*_{m}.nii.gz")) for m in ("t1", "t2")}
    perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # (a,b,c) -> (b,c,a)
    moved = {}
    for m, f in files.items():
        img = nib.load(f)
        arr = np.asarray(img.dataobj)
        moved[m] = tmp_path / f"moved_{m}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(arr, (2, 0, 1))), img.affine @ perm), moved[m])
    outs = {}
    for name, given in (("plain", files), ("moved", moved)):
        args = [x for m, f in given.items() for x in ("--image", f"{m}={f}")]
        code, text = invoke("synthesize", runs[f"m2dn_{dims}d"], *args, "--case-id", "c", "--out", tmp_path / name)
        assert code == 0, text
        outs[name] = {f.name: nib.load(f) for f in sorted((tmp_path / name).rglob("*_synthetic.nii.gz"))}
    assert sorted(outs["plain"]) == sorted(outs["moved"]) and len(outs["plain"]) == 2  # t1c and flair
    for fname, plain in outs["plain"].items():
        moved_img = outs["moved"][fname]
        assert np.allclose(moved_img.affine, nib.load(moved["t1"]).affine)
        a = np.asarray(plain.dataobj)
        assert a.any()
        np.testing.assert_allclose(np.asarray(moved_img.dataobj), np.transpose(a, (2, 0, 1)), atol=1e-6)


def test_evaluate_against_the_regression_baseline(runs, tmp_path: Path) -> None:
    """``evaluate RUN --against OTHER`` scores the other run on the same cases and scenarios and tests against it;
    a run of another method, or a method that does not compare runs, is refused in one line."""
    code, text, regression = train(tmp_path / "reg", get_method("m2dn").contract_recipe(2), "train.max_steps=2",
                                   "train.val_every_steps=2", "method.mode=regression")
    assert code == 0, text
    run = runs["m2dn_2d"]
    code, text = invoke("evaluate", run, "--against", regression, "--out", tmp_path / "e")
    assert code == 0, text
    with (tmp_path / "e" / "synthesis.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keys = {m: {(r["scenario"], r["case_id"], r["modality"]) for r in rows if r["model"] == m}
            for m in ("m2dn", "regression", "zero fill", "mean fill")}
    assert keys["regression"] == keys["m2dn"] == keys["zero fill"] and len(keys["m2dn"]) > 0
    m2dn = {(r["scenario"], r["case_id"], r["modality"]): float(r["mae"]) for r in rows if r["model"] == "m2dn"}
    reg = {(r["scenario"], r["case_id"], r["modality"]): float(r["mae"]) for r in rows if r["model"] == "regression"}
    assert any(abs(m2dn[k] - reg[k]) > 1e-6 for k in m2dn)  # two different models were scored
    report = (tmp_path / "e" / "report.md").read_text(encoding="utf-8")
    assert "| m2dn (reference) | zero fill | mean fill | regression |" in report  # a column, tested against m2dn
    assert str(regression) in report
    code, text = invoke("evaluate", run, "--against", runs["zero_fill"], "--out", tmp_path / "e2")
    assert code == 2 and "--against" in one_error_line(text) and "zero_fill" in text
    code, text = invoke("evaluate", runs["zero_fill"], "--against", run, "--out", tmp_path / "e3")
    assert code == 2 and "does not compare runs" in one_error_line(text)


def test_one_slice_patches_of_volumes_train_a_2d_denoiser(tmp_path: Path) -> None:
    """``data.patch_size [H, W, 1]`` on 3D data (the BraTS recipe's setting): a 2D denoiser trains on axial
    slices, validates and evaluates slice by slice, and run.json records the model's dimension."""
    data = write_phantom(tmp_path / "ph", cases=4, seed=2, spatial_dims=3, size=[17, 18, 19])
    recipe = get_method("m2dn").contract_recipe(3)
    recipe["data"] = {"path": str(data), "patch_size": [16, 16, 1], "batch_size": 4, "val_fraction": 0.25,
                      "num_workers": 0, "cache_dir": str(tmp_path / "cache")}
    code, text, run = train(tmp_path / "r", recipe, "train.max_steps=2", "train.val_every_steps=2")
    assert code == 0, text
    info = load_run(run).info
    assert info.spatial_dims == 3 and info.inference["model_dims"] == 2
    assert json.loads((run / "weights" / "model.json").read_text())["kwargs"]["spatial_dims"] == 2
    assert any(name.startswith("val/psnr") for _, name, _ in _metric_rows(run))
    code, text = invoke("evaluate", run, "--out", tmp_path / "e")
    assert code == 0, text
    with (tmp_path / "e" / "synthesis.csv").open(newline="", encoding="utf-8") as f:
        assert len({r["scenario"] for r in csv.DictReader(f)}) == 14


def _metric_rows(run: Path) -> list[tuple[int, str, float]]:
    with (run / "metrics.csv").open(newline="", encoding="utf-8") as f:
        return [(int(r["step"]), r["name"], float(r["value"])) for r in csv.DictReader(f)]


def test_split_hash_is_in_the_report_and_follows_the_split(runs, tmp_path: Path) -> None:
    run = load_run(runs["m2dn_2d"])
    digest = run.split_hash()
    assert len(digest) == 12 and digest == load_run(runs["m2dn_2d"]).split_hash()
    copy = tmp_path / "copy"
    shutil.copytree(runs["m2dn_2d"], copy)
    split = json.loads((copy / "split.json").read_text())
    split["train"], split["val"] = split["train"][1:], [*split["val"], split["train"][0]]
    (copy / "split.json").write_text(json.dumps(split))
    assert load_run(copy).split_hash() != digest  # another split, another hash
    code, text = invoke("evaluate", runs["m2dn_2d"], "--out", tmp_path / "e")
    assert code == 0, text
    assert f"split {digest}" in (tmp_path / "e" / "report.md").read_text(encoding="utf-8")


def test_curriculum_limit_rises_from_one_to_m_minus_one_then_lifts() -> None:
    from medmodal.methods.m2dn.diffusion import MaskedDiffusion
    from medmodal.methods.m2dn.system import M2DNSystem

    system = M2DNSystem(network=tiny_denoiser(regression=False), diffusion=MaskedDiffusion(timesteps=10),
                        modalities=MODS3, curriculum=True, curriculum_fraction=0.5, max_steps=300)
    limits = [system.curriculum_limit(step, 4) for step in (0, 49, 50, 99, 100, 149, 150, 299)]
    assert limits == [1, 1, 2, 2, 3, 3, None, None]
    assert [system.curriculum_limit(step, 3) for step in (0, 74, 75, 149, 150)] == [1, 1, 2, 2, None]
    present = torch.ones(500, 3, dtype=torch.bool)
    assert bool((system._missing(present).sum(1) == 1).all())  # step 0: one contrast hidden at a time


def test_curriculum_recipe_trains(tmp_path: Path) -> None:
    code, text, run = train(tmp_path / "c", get_method("m2dn").contract_recipe(2), "train.max_steps=2",
                            "train.val_every_steps=2", "method.mask_dist=curriculum")
    assert code == 0, text
    assert load_run(run).recipe.method.mask_dist == "curriculum"
