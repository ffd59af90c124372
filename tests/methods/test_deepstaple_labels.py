"""DeepSTAPLE through the engine: recipe → train → data_parameters.csv → DP consensus on the target grid.

Also the inputs: registration manifests (missing columns or files, labels off their target's grid, targets with a
single label) and the ``experiment deepstaple`` command's wiring.
"""

from __future__ import annotations

import csv
import importlib
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from medmodal.data.case import DataError, Volume
from medmodal.data.io import read_image, write_image
from medmodal.data.phantom import write_phantom
from medmodal.engine.recipe import RecipeError, builtin_recipe_path, dump_recipe, load_recipe, recipe_from_dict
from medmodal.engine.run import RunError
from medmodal.engine.train import train
from medmodal.methods.deepstaple.experiments import evaluate_label_quality
from medmodal.methods.deepstaple.labels import (
    build_deepstaple,
    load_label_set,
    read_data_parameters,
    write_dp_consensus,
)
from medmodal.methods.deepstaple.system import spearman


def _recipe_dict(candidates: object = None, **data: object) -> dict:
    return {
        "name": "ds_tiny", "seed": 0,
        "data": {"phantom": {"cases": 8, "spatial_dims": 2, "size": 33, "seed": 0}, "modalities": ["t2"],
                 "patch_size": [33, 33], "batch_size": 6, "val_fraction": 0.25, "num_workers": 0, **data},
        "model": {"name": "unet", "kwargs": {"channels": [4, 8, 16]}},
        "method": {"name": "deepstaple",
                   "candidates": {"noise": {"labels_per_target": 5, "seed": 0}} if candidates is None else candidates},
        "train": {"max_steps": 60, "lr": 0.01, "checkpoint_every_steps": 20,
                  "progress": False, "threads": 1},
        "eval": {"overlap": 0.0, "sw_batch_size": 1},
    }


class _Crash(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= 25:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic-label run, interrupted at step 25 and resumed to its 60 steps."""
    run = tmp_path_factory.mktemp("deepstaple") / "run"
    with pytest.raises(RunError, match="interrupted"):
        train(recipe_from_dict(_recipe_dict()), run, callbacks=[_Crash()])
    assert not (run / "data_parameters.csv").exists()
    return train(None, run, resume=True)


def test_tiny_training_learns_label_quality(trained_run: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 60  # one step per batch, not one per optimiser
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["lr_schedulers"]  # AdamW + SparseAdam, resumable
    rows = read_data_parameters(trained_run)
    assert len(rows) == 6 * 5 and [int(r["label_id"]) for r in rows] == list(range(30))
    rho = spearman([float(r["theta"]) for r in rows], [float(r["true_dice"]) for r in rows])
    assert rho > 0.3, f"Spearman(θ, true Dice) = {rho:.3f}"
    names = {r["name"] for r in csv.DictReader((trained_run / "metrics.csv").open(encoding="utf-8"))}
    assert {"train/loss", "train/dp_loss", "train/spearman_theta_dice", "val/dice"} <= names
    quality = evaluate_label_quality(trained_run)
    assert quality.spearman == pytest.approx(rho) and len(quality.targets) == 6
    assert {"dp", "staple", "majority", "random", "mean_all", "best"} <= set(quality.targets[0])


def test_dp_consensus_is_written_on_each_target_grid(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "consensus"
    written = write_dp_consensus(trained_run, out, overwrite=False)
    summary = list(csv.DictReader((out / "consensus.csv").open(encoding="utf-8")))
    assert written == [out / f"{r['target']}.nii.gz" for r in summary] and len(written) == 6
    targets = load_label_set(recipe_from_dict(_recipe_dict()), training_grid=False).targets
    for row in summary:
        fused = read_image(out / f"{row['target']}.nii.gz")
        t = targets[row["target"]]
        assert fused.shape == t.shape and np.allclose(fused.affine, t.affine)
        assert set(np.unique(fused.array)) <= {0, 1} and int(row["n_labels"]) == 5
        assert int(row["foreground_voxels"]) == int(fused.array.sum()) and 0 <= float(row["dice_to_reference"]) <= 1
    with pytest.raises(DataError, match="not empty"):
        write_dp_consensus(trained_run, out, overwrite=False)
    assert write_dp_consensus(trained_run, out, overwrite=True) == written


def test_fuse_dp_command_writes_the_consensus(trained_run: Path, tmp_path: Path) -> None:
    from medmodal.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["fuse", "--method", "dp", "--run", str(trained_run), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "c").glob("*.nii.gz"))) == 6 and (tmp_path / "c" / "consensus.csv").is_file()
    res = runner.invoke(app, ["fuse", "--method", "dp", "--run", str(trained_run), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2, res.output


def test_staple_baseline_follows_the_runs_staple_backend(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    """method.staple_backend picks the STAPLE the report compares with: SimpleITK's filter is called only with
    "simpleitk", and on these labels both give the same fused masks (their W agree to ~1e-6)."""
    staple_module = importlib.import_module("medmodal.fusion.staple")  # the package's `staple` is the function
    calls = []
    real = staple_module._staple_simpleitk

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(staple_module, "_staple_simpleitk", spy)
    ours = evaluate_label_quality(trained_run)
    assert not calls
    other = tmp_path / "run"
    other.mkdir()
    for name in ("data_parameters.csv", "run.json"):
        (other / name).write_bytes((trained_run / name).read_bytes())
    recipe = load_recipe(trained_run / "recipe.yaml")
    assert recipe.method.staple_backend == "torch64"
    (other / "recipe.yaml").write_text(dump_recipe(recipe.model_copy(update={
        "method": recipe.method.model_copy(update={"staple_backend": "simpleitk"})})), encoding="utf-8")
    theirs = evaluate_label_quality(other)
    assert len(calls) == len(theirs.targets) == 6
    assert [t["staple"] for t in theirs.targets] == pytest.approx([t["staple"] for t in ours.targets], abs=1e-3)


def test_consensus_needs_a_finished_run(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="data_parameters.csv"):
        write_dp_consensus(tmp_path, tmp_path / "out", overwrite=False)


# -- recipes and manifests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepstaple_tiny", "deepstaple_crossmoda_full"])
def test_builtin_deepstaple_recipes_validate(name: str) -> None:
    recipe = load_recipe(builtin_recipe_path(name))
    assert recipe.name == name and recipe.method.name == "deepstaple" and recipe.method.candidates is not None
    if name.endswith("full"):
        assert recipe.data.patch_size == [128, 128, 50] and recipe.data.batch_size == 8
        assert recipe.train.lr == 0.01 and recipe.method.dp_lr == 0.1 and recipe.train.max_steps == 40 * 400 // 8
    m = recipe.method  # the spec's defaults, spelled out
    assert (m.ce_normalisation, m.lr_decay, m.lr_gamma, m.lr_decay_every, m.drop_last, m.staple_backend) == (
        "weight_sum", "every_kth_epoch_per_batch", 0.99, 10, True, "torch64")
    assert recipe.train.val_every_steps == 100 and recipe.train.schedule == "poly"  # defaults: nothing ignored


def test_resolved_recipe_records_every_switch_with_the_spec_defaults() -> None:
    text = dump_recipe(recipe_from_dict(_recipe_dict()))
    for line in ("ce_normalisation: weight_sum", "lr_decay: every_kth_epoch_per_batch", "lr_gamma: 0.99",
                 "lr_decay_every: 10", "drop_last: true", "staple_backend: torch64"):
        assert f"  {line}\n" in text, line
    old = _recipe_dict()
    old["method"]["lr_decay"] = "faithful"  # the name used before the spec's
    assert recipe_from_dict(old).method.lr_decay == "every_kth_epoch_per_batch"
    bad = _recipe_dict()
    bad["method"]["staple_backend"] = "itk"
    with pytest.raises(RecipeError, match="staple_backend"):
        recipe_from_dict(bad)


@pytest.mark.parametrize(("train", "method", "warned"), [
    ({}, {}, []),
    ({"val_every_steps": 5}, {}, []),  # = one epoch (30 labels / batch 6): what DeepSTAPLE does anyway
    ({"val_every_steps": 7}, {}, ["train.val_every_steps 7 is ignored"]),
    ({"schedule": "constant"}, {}, ["train.schedule 'constant' is ignored"]),
    ({"schedule": "constant"}, {"lr_decay": "schedule"}, []),
])
def test_train_settings_deepstaple_does_not_follow_are_warned_about(train: dict, method: dict, warned: list[str],
                                                                      caplog) -> None:
    d = _recipe_dict()
    d["train"].update(train)
    d["method"].update(method)
    with caplog.at_level(logging.WARNING, logger="medmodal"):
        build_deepstaple(recipe_from_dict(d))
    found = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert len(found) == len(warned) and all(w in f for w, f in zip(warned, found, strict=True)), found


def test_drop_last_with_a_batch_larger_than_the_labels_is_a_clear_error() -> None:
    d = _recipe_dict(batch_size=31)  # 30 training labels
    with pytest.raises(RecipeError, match="data.batch_size: 31 .* method.drop_last: false"):
        build_deepstaple(recipe_from_dict(d))
    d["method"]["drop_last"] = False
    assert build_deepstaple(recipe_from_dict(d)).data.batches_per_epoch == 1


def test_recipe_needs_exactly_one_label_source() -> None:
    for bad in ({}, {"noise": {}, "manifest": "m.csv"}):
        with pytest.raises(RecipeError, match="exactly one"):
            recipe_from_dict(_recipe_dict(candidates=bad))
    d = _recipe_dict()
    del d["method"]["candidates"]
    with pytest.raises(RecipeError, match="method.candidates"):
        recipe_from_dict(d)
    moved = _recipe_dict()
    moved["data"]["candidates"] = moved["method"].pop("candidates")
    with pytest.raises(RecipeError, match="data.candidates moved to the method section"):
        recipe_from_dict(moved)
    with pytest.raises(RecipeError, match="multiple of the 4 training processes"):
        build_deepstaple(recipe_from_dict({**_recipe_dict(), "train": {"devices": 4}}))


@pytest.fixture
def registered(tmp_path: Path) -> tuple[Path, Path]:
    """A 2D target data set (3 phantom cases of 17² voxels) and a manifest of 2 shifted labels per target."""
    targets = write_phantom(tmp_path / "targets", cases=3, spatial_dims=2, size=17, seed=1)
    rows = []
    for case in sorted(p.name for p in targets.iterdir() if p.is_dir()):
        ref = read_image(targets / case / f"{case}_seg.nii.gz")
        for k, offset in enumerate((0, 2)):
            mask = np.roll(ref.array > 0, offset, axis=0).astype(np.uint8)
            rel = f"labels/{case}/atlas{k}.nii.gz"
            write_image(Volume(mask, ref.affine), tmp_path / "reg" / rel)
            rows.append({"target": case, "atlas": f"atlas{k}", "label": rel, "status": "ok", "dice_to_reference": ""})
    rows.append({"target": rows[0]["target"], "atlas": "failed", "label": "", "status": "failed",
                 "dice_to_reference": ""})
    return targets, _write_manifest(tmp_path / "reg" / "manifest.csv", rows)


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _manifest_recipe(targets: Path, manifest: Path) -> dict:
    d = _recipe_dict(path=str(targets), candidates={"manifest": str(manifest)}, patch_size=[17, 17], batch_size=2)
    del d["data"]["phantom"]
    return d


def test_registered_labels_are_read_with_their_true_dice(registered: tuple[Path, Path]) -> None:
    targets, manifest = registered
    label_set = load_label_set(recipe_from_dict(_manifest_recipe(targets, manifest)), training_grid=False)
    assert len(label_set.targets) == 3 and len(label_set.labels) == 6  # the failed row is left out
    for lab in label_set.labels:
        ref = label_set.targets[lab.target].reference
        inter = np.sum(lab.mask & ref)
        assert lab.true_dice == pytest.approx(2 * inter / (lab.mask.sum() + ref.sum()))
        assert (lab.true_dice == 1.0) == (lab.source == "atlas0")
    built = build_deepstaple(recipe_from_dict(_manifest_recipe(targets, manifest)))
    system, data = built.system, built.data
    assert len(data.train_ids) == 2 and len(data.val_ids) == 1 and system.theta.shape == (4,)
    sample = data.train_dataloader().dataset[0]
    assert sample["image"].shape == (1, 17, 17) and sample["label"].shape == (17, 17)


def test_bad_manifests_are_clear_errors(registered: tuple[Path, Path], tmp_path: Path, caplog) -> None:
    targets, manifest = registered
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))

    def load(rows_: list[dict], name: str) -> None:
        path = _write_manifest(manifest.parent / name, rows_)
        build_deepstaple(recipe_from_dict(_manifest_recipe(targets, path)))

    with pytest.raises(DataError, match=r"missing column\(s\) \['atlas'\]"):
        load([{k: v for k, v in r.items() if k != "atlas"} for r in rows], "no_atlas.csv")
    with pytest.raises(DataError, match="nope.nii.gz not found"):
        load([*rows[:2], {**rows[2], "label": "labels/nope.nii.gz"}], "missing.csv")
    first = read_image(manifest.parent / rows[0]["label"])
    write_image(Volume(np.zeros((17, 16), np.uint8), first.affine), manifest.parent / "small.nii.gz")
    with pytest.raises(DataError, match=r"small.nii.gz: shape \(17, 16\) differs"):
        load([{**rows[0], "label": "small.nii.gz"}, *rows[1:]], "shape.csv")
    with pytest.raises(DataError, match="not cases of data.path"):
        load([{**rows[0], "target": "nobody"}, *rows[1:]], "unknown.csv")
    with pytest.raises(DataError, match="not found; run `medmodal register`"):
        build_deepstaple(recipe_from_dict(_manifest_recipe(targets, tmp_path / "absent.csv")))
    with caplog.at_level(logging.WARNING, logger="medmodal"):
        load([r for r in rows if r["atlas"] != "atlas1"], "single.csv")
    assert "one candidate label only" in caplog.text


def test_fast_experiment_writes_the_report(tmp_path: Path) -> None:
    """``medmodal experiment deepstaple --fast`` end to end: experiment I and the multi-atlas registration."""
    from medmodal.methods.deepstaple.commands import add_commands

    app = typer.Typer()

    @app.command()
    def other() -> None:  # a second command so that typer keeps sub-command names
        pass

    add_commands(app)
    out = tmp_path / "exp"
    result = CliRunner().invoke(app, ["experiment", "deepstaple", "--out", str(out), "--fast"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "synthetic" in report and "Spearman" in report and "white_matter" in report
    for name in ("exp1_theta_vs_dice.png", "exp1_fusion.png", "multi_atlas_fusion.png", "multi_atlas_targets.csv",
                 "exp1_ool_targets.csv", "exp1_inline_targets.csv", "multi_atlas/registration/manifest.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "multi_atlas_targets.csv").open(encoding="utf-8")))
    assert rows and all(0 <= float(r["dp"]) <= 1 and 0 <= float(r["staple"]) <= 1 for r in rows)
    again = CliRunner().invoke(app, ["experiment", "deepstaple", "--out", str(out), "--fast"])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_histogram_clip_reaches_deepstaple_preprocessing(monkeypatch):
    """data.histogram_clip applies to DeepSTAPLE's own preprocessing path too (load_label_set), and the
    recorded preprocessing says so."""
    import medmodal.data.preprocess as pre
    from medmodal.engine.recipe import builtin_recipe_path, load_recipe
    from medmodal.methods.deepstaple.labels import load_label_set

    seen = []
    original = pre.preprocess_case

    def spy(*args, **kwargs):
        seen.append(kwargs.get("histogram_clip"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pre, "preprocess_case", spy)
    recipe = load_recipe(builtin_recipe_path("deepstaple_tiny"),
                         overrides={"data.histogram_clip": {"min_count": 7}, "data.phantom.cases": 3})
    load_label_set(recipe)
    assert seen and all(c is not None and c.min_count == 7 for c in seen)
