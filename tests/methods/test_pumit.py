"""The PUMIT plug-in's tokenizer stage: a collection of 2D and 3D images of different anisotropy trains in one run
(each batch one degree of anisotropy), the loss terms, and the evaluation per modality and DA."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.data.case import CaseRecord
from medmodal.engine.images import case_of, collection_records
from medmodal.losses.pumit_prior import entropy_loss, quant_prior_loss
from medmodal.methods.pumit.system import PUMITTokenizerSystem, masked_l1
from medmodal.networks.registry import create_network

runner = CliRunner()
TINY = {"widths": [8, 16], "stem_stride": 4, "num_codes": 16, "code_dim": 8}


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_collection_records_take_each_modality_of_each_case() -> None:
    recs = [CaseRecord("a", {"t1": Path("a_t1.nii.gz"), "t2": Path("a_t2.nii.gz")}),
            CaseRecord("b/c", {"t2": Path("b_t2.nii.gz")})]
    images = collection_records(recs, ("t1", "t2", "flair"))
    assert [(i.image_id, i.modality) for i in images] == [("a/t1", "t1"), ("a/t2", "t2"), ("b/c/t2", "t2")]
    assert [case_of(i.image_id) for i in images] == ["a", "a", "b/c"]


def test_the_loss_is_l1_on_valid_voxels_plus_the_weighted_priors() -> None:
    torch.manual_seed(0)
    net = create_network("pumit_tokenizer", **TINY)
    system = PUMITTokenizerSystem(network=net, weight_quant=0.03, weight_ent=1.0, optimizer="adamw", lr=1e-3,
                                  weight_decay=0.0, momentum=0.9, schedule="constant", max_steps=10, warmup_steps=0)
    image = torch.rand(2, 1, 16, 16, 8)
    valid = torch.ones_like(image, dtype=torch.bool)
    valid[..., 6:] = False  # the last slices are padding
    batch = {"image": image, "valid": valid, "da": 1}
    terms = system.losses(batch)
    x = image * 2 - 1
    x_hat, quant = net(x, 1)
    assert torch.allclose(terms["l1"], ((x - x_hat).abs()[..., :6]).mean(), atol=1e-6)
    expected = terms["l1"] + 0.03 * quant_prior_loss(quant.probs) + entropy_loss(quant.probs)
    assert torch.allclose(terms["loss"], expected, atol=1e-6)
    # padding never counts: garbage there leaves the reconstruction error of the valid voxels unchanged
    a = masked_l1(x, x_hat, valid)
    b = masked_l1(torch.where(valid, x, torch.full_like(x, 9.0)), x_hat, valid)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def mixed_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 3 thick-slice MR volumes (1 x 1 x 4 mm: DA 2) and 3 grey PNG X-rays (2D: DA 5)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        vol = rng.normal(100, 20, size=(32, 32, 8)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 4.0, 1.0])), root / f"mr{i}.nii.gz")
        rows.append([f"mr{i}", f"mr{i}.nii.gz", ""])
        Image.fromarray(rng.integers(0, 255, size=(40, 36), dtype=np.uint8)).save(root / f"cxr{i}.png")
        rows.append([f"cxr{i}", "", f"cxr{i}.png"])
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["case_id", "mr", "xray"], *rows])
    (root / "medmodal.json").write_text(json.dumps({"modalities": ["mr", "xray"]}), encoding="utf-8")
    return root


def test_2d_and_3d_images_of_any_anisotropy_train_together(mixed_collection: Path, tmp_path: Path) -> None:
    recipe = {"name": "mixed", "seed": 0,
              "data": {"path": str(mixed_collection / "manifest.csv"), "patch_size": [16, 16, 16], "batch_size": 2,
                       "val_fraction": 0.34, "num_workers": 0, "cache_dir": str(tmp_path / "cache")},
              "model": {"name": "pumit_tokenizer", "kwargs": TINY},
              "method": {"name": "pumit", "token_grid": [2, 2, 2], "val_batches": 2},
              "train": {"max_steps": 6, "val_every_steps": 3, "checkpoint_every_steps": 3, "progress": False,
                        "accelerator": "cpu", "threads": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, text = invoke("train", tmp_path / "r.yaml", "--out", tmp_path / "run")
    assert code == 0, text
    split = json.loads((tmp_path / "run" / "split.json").read_text(encoding="utf-8"))
    assert sorted(split["train"] + split["val"]) == sorted([f"mr{i}" for i in range(3)] + [f"cxr{i}" for i in range(3)])
    code, text = invoke("evaluate", tmp_path / "run", "--split", "all")
    assert code == 0, text
    with (tmp_path / "run" / "eval" / "summary.csv").open(newline="", encoding="utf-8") as f:
        rows = {(r["modality"], int(r["da"])): r for r in csv.DictReader(f)}
    assert set(rows) == {("mr", 2), ("xray", 5)}  # one run, both kinds of image, each at its own anisotropy
    assert all(int(r["images"]) == 3 and 0 < float(r["l1"]) < 2 for r in rows.values())
    with (tmp_path / "run" / "eval" / "images.csv").open(newline="", encoding="utf-8") as f:
        crops = {r["image_id"]: r["crop"] for r in csv.DictReader(f)}
    assert crops["mr0/mr"] == "32x32x8" and crops["cxr0/xray"] == "32x40x1"  # whole tokens (8, 8, 2) / (8, 8, 1)


def test_the_cpu_recipe_builds_its_tokenizer() -> None:
    from medmodal.engine.recipe import builtin_recipe_path, load_recipe

    recipe = load_recipe(builtin_recipe_path("pumit_tokenizer_tiny"))
    net = create_network(recipe.model.name, in_channels=1, **recipe.model.kwargs)
    assert net.stride == 8 and net.token_size(2) == (8, 8, 2)
    assert (recipe.method.weight_quant, recipe.method.weight_ent) == (1.0, 0.2)  # the measured choice (docs)


def _recipe(tmp_path: Path, **method: object) -> dict:
    from medmodal.engine.plugin import get_method

    recipe = get_method("pumit").contract_recipe(3)
    recipe["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe["method"].update(method)
    return recipe


def test_mim_stage_pretrains_the_vit_against_a_frozen_tokenizer_run(tmp_path: Path) -> None:
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(_recipe(tmp_path)), encoding="utf-8")
    code, text = invoke("train", tmp_path / "tok.yaml", "--out", tmp_path / "tok", "--set", "train.max_steps=2")
    assert code == 0, text
    mim = _recipe(tmp_path, stage="mim", tokenizer_run=str(tmp_path / "tok"))
    mim["model"] = {"name": "pumit_vit", "kwargs": {"width": 16, "num_layers": 2, "num_heads": 2}}
    (tmp_path / "mim.yaml").write_text(yaml.safe_dump(mim), encoding="utf-8")
    code, text = invoke("train", tmp_path / "mim.yaml", "--out", tmp_path / "mim")
    assert code == 0, text
    info = json.loads((tmp_path / "mim" / "run.json").read_text(encoding="utf-8"))
    kw = info["network"]["kwargs"]
    assert info["network"]["name"] == "pumit_vit" and kw["codebook_size"] == 16 and kw["patch_size"] == 8
    code, text = invoke("train", "--resume", tmp_path / "mim", "--set", "train.max_steps=4")
    assert code == 0, text
    code, text = invoke("evaluate", tmp_path / "mim")
    assert code == 0, text
    with (tmp_path / "mim" / "eval" / "images.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0 <= float(r["token_accuracy"]) <= 1 and float(r["mim_kl"]) >= -1e-6 for r in rows)
    from medmodal.data.collection_cache import CollectionIndex

    # evaluating the validation cases leaves the training cache whole (6 phantom cases x 4 contrasts)
    assert len(CollectionIndex.load(tmp_path / "cache" / "collection")) == 24
    # a mim recipe without a tokenizer run, or naming a folder that is not one, is one line
    bad = _recipe(tmp_path, stage="mim")
    bad["model"] = mim["model"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad), encoding="utf-8")
    code, text = invoke("train", tmp_path / "bad.yaml", "--out", tmp_path / "bad")
    assert code == 2 and "tokenizer_run" in text, text
    code, text = invoke("train", tmp_path / "mim.yaml", "--out", tmp_path / "bad2", "--set",
                        f"method.tokenizer_run={tmp_path / 'nowhere'}")
    assert code == 2 and "method.tokenizer_run" in text and "nowhere" in text, text


def test_a_mim_step_trains_the_vit_and_leaves_the_tokenizer_alone() -> None:
    from medmodal.methods.pumit.system import PUMITMIMSystem

    torch.manual_seed(0)
    tok = create_network("pumit_tokenizer", in_channels=1, **TINY)
    vit = create_network("pumit_vit", in_channels=1, codebook_size=16, patch_size=8, width=16, num_layers=2,
                         num_heads=2)
    system = PUMITMIMSystem(network=vit, tokenizer=tok, mask_ratio=0.55, mask_layer_ids=[0, 1], optimizer="adamw",
                            lr=1e-3, weight_decay=0.0, momentum=0.9, schedule="constant", max_steps=5, warmup_steps=0)
    batch = {"image": torch.rand(2, 1, 16, 16, 8), "da": 1, "tokens": (2, 2, 2), "image_id": ["a/t1", "b/t1"],
             "corner": [(0, 0, 0), (1, 0, 2)]}
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    system.training_step(batch, 0).backward()
    assert not tok.training  # the frozen tokenizer runs in eval mode
    assert all(p.grad is None for p in tok.parameters())
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())
    assert all(p.grad is not None for n, p in vit.named_parameters() if p.requires_grad), \
        [n for n, p in vit.named_parameters() if p.grad is None]


def test_mim_on_two_processes_trains_as_on_one(tmp_path: Path) -> None:
    """The masks are drawn per crop from (seed, step, image, corner), so 2 gloo processes reach the validation
    values of 1 process (the generic DDP test runs the tokenizer stage, the plug-in's contract recipe)."""
    import os
    import subprocess
    import sys

    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(_recipe(tmp_path)), encoding="utf-8")
    code, text = invoke("train", tmp_path / "tok.yaml", "--out", tmp_path / "tok", "--set", "train.max_steps=1")
    assert code == 0, text
    mim = _recipe(tmp_path, stage="mim", tokenizer_run=str(tmp_path / "tok"))
    mim["model"] = {"name": "pumit_vit", "kwargs": {"width": 16, "num_layers": 2, "num_heads": 2}}
    (tmp_path / "mim.yaml").write_text(yaml.safe_dump(mim), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("MASTER_PORT", None)
    for devices in (1, 2):
        out = subprocess.run([sys.executable, "-m", "medmodal.cli", "train", str(tmp_path / "mim.yaml"), "--out",
                              str(tmp_path / f"mim{devices}"), "--devices", str(devices)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with (tmp_path / "mim1" / "metrics.csv").open(newline="", encoding="utf-8") as f:
        one = {r["name"]: float(r["value"]) for r in csv.DictReader(f) if r["name"].startswith("val/")}
    ranks = json.loads((tmp_path / "mim2" / "distributed.json").read_text(encoding="utf-8"))["ranks"]
    assert ranks[0]["parameter_checksum"] == ranks[1]["parameter_checksum"]
    for name, value in ranks[0]["val"].items():
        assert value == pytest.approx(one[name], abs=1e-5), name


def _pretrained_vit(tmp_path: Path, *, mim_steps: int) -> dict:
    """Train a contract tokenizer (1 step) into ``tmp_path/tok`` and a tiny ViT by MIM against it into
    ``tmp_path/mim``; returns the ViT's architecture (with the tokenizer's stride as its patch)."""
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(_recipe(tmp_path)), encoding="utf-8")
    code, text = invoke("train", tmp_path / "tok.yaml", "--out", tmp_path / "tok", "--set", "train.max_steps=1")
    assert code == 0, text
    vit = {"width": 16, "num_layers": 2, "num_heads": 2, "patch_size": 8}
    mim = _recipe(tmp_path, stage="mim", tokenizer_run=str(tmp_path / "tok"))
    mim["model"] = {"name": "pumit_vit", "kwargs": {k: v for k, v in vit.items() if k != "patch_size"}}
    (tmp_path / "mim.yaml").write_text(yaml.safe_dump(mim), encoding="utf-8")
    code, text = invoke("train", tmp_path / "mim.yaml", "--out", tmp_path / "mim", "--set",
                        f"train.max_steps={mim_steps}")
    assert code == 0, text
    return vit


def test_a_segmenter_fine_tunes_from_the_pretrained_vit(tmp_path: Path) -> None:
    """`medmodal train --from MIM_RUN` loads the pretrained ViT into a segmentation network that wraps it
    (`pumit_vit_seg`: the backbone is its `vit.` submodule); the MIM head stays behind, the decoder starts fresh."""
    from medmodal.engine.plugin import get_method

    vit = _pretrained_vit(tmp_path, mim_steps=2)
    seg = get_method("zero_fill").contract_recipe(3)
    seg["data"].update(modalities=["t1"], cache_dir=str(tmp_path / "cache_seg"))
    seg["model"] = {"name": "pumit_vit_seg", "kwargs": {**vit, "da": 0}}
    seg["train"].update(max_steps=1, val_every_steps=1, lr=1e-12)
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(seg), encoding="utf-8")
    code, text = invoke("train", tmp_path / "seg.yaml", "--out", tmp_path / "seg", "--from", tmp_path / "mim")
    assert code == 0, text
    info = json.loads((tmp_path / "seg" / "run.json").read_text(encoding="utf-8"))["initialised_from"]
    from safetensors.torch import load_file

    pre = load_file(str(tmp_path / "mim" / "weights" / "model.safetensors"))
    fine = load_file(str(tmp_path / "seg" / "weights" / "model.safetensors"))
    backbone = [k for k in pre if not k.startswith(("mim_head", "mask_token"))]
    assert info["loaded"] == len(backbone) and all(f"vit.{k}" in fine for k in backbone)
    assert all(torch.allclose(pre[k], fine[f"vit.{k}"], atol=1e-6) for k in backbone)
    assert info["not_loaded"] and all(k.startswith(("vit.decoder", "vit.seg_head")) for k in info["not_loaded"])


def test_pretrain_runs_both_stages_and_reports_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, text = invoke("pretrain", "--fast", "--out", tmp_path / "pt", "--set", "train.progress=false")
    assert code == 0, text
    report = (tmp_path / "pt" / "report.md").read_text(encoding="utf-8")
    assert "## tokenizer stage" in report and "## mim stage" in report and "FAST" in report
    stored = yaml.safe_load((tmp_path / "pt" / "mim" / "recipe.yaml").read_text(encoding="utf-8"))
    assert stored["method"]["stage"] == "mim"
    assert stored["method"]["tokenizer_run"] == str((tmp_path / "pt" / "tokenizer").resolve())
    code, text = invoke("pretrain", "--fast", "--out", tmp_path / "pt")
    assert code == 2 and "--overwrite" in text, text


def test_a_classifier_fine_tunes_from_the_pretrained_vit_on_a_label_budget(tmp_path: Path) -> None:
    """`pumit_vit_cls` under the zero-fill method's classification task: the backbone comes from the MIM run, the
    head starts fresh, `data.label_fraction` trains on a nested share of the training cases, and the validation
    accuracy the system logs equals the accuracy `medmodal evaluate` computes on the same cases."""
    from medmodal.engine.plugin import get_method

    vit = _pretrained_vit(tmp_path, mim_steps=1)
    cls = get_method("zero_fill").contract_recipe(2)
    cls["data"].update(modalities=["t1c"], cache_dir=str(tmp_path / "cache_cls"), label_fraction=0.5)
    cls["data"]["phantom"].update(cases=12)
    cls["model"] = {"name": "pumit_vit_cls", "kwargs": {**vit, "num_classes": 2}}
    cls["method"] = {"name": "zero_fill", "task": "classification"}
    cls["train"].update(max_steps=2, val_every_steps=2)
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(cls), encoding="utf-8")
    code, text = invoke("train", tmp_path / "cls.yaml", "--out", tmp_path / "cls", "--from", tmp_path / "mim")
    assert code == 0, text
    info = json.loads((tmp_path / "cls" / "run.json").read_text(encoding="utf-8"))
    assert info["task"]["kind"] == "classification"
    loaded = info["initialised_from"]
    assert loaded["loaded"] > 0 and all(k.startswith("vit.cls_head") for k in loaded["not_loaded"]), loaded
    split = json.loads((tmp_path / "cls" / "split.json").read_text(encoding="utf-8"))
    assert len(split["train"]) == 4 and len(split["val"]) == 4  # 12 cases: 4 validation, half of the other 8 train
    code, text = invoke("evaluate", tmp_path / "cls")
    assert code == 0, text
    with (tmp_path / "cls" / "metrics.csv").open(newline="", encoding="utf-8") as f:
        logged = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "val/accuracy"]
    with (tmp_path / "cls" / "eval" / "summary.csv").open(newline="", encoding="utf-8") as f:
        evaluated = [float(r["accuracy"]) for r in csv.DictReader(f)]
    assert logged and evaluated == [pytest.approx(logged[-1])]


def test_a_folder_collection_of_mixed_2d_and_3d_images_trains_and_evaluates(tmp_path: Path) -> None:
    """`method.collection`: a plain folder whose sub-folders are modality tags, holding 2D pictures and volumes of
    several spacings, trains the tokenizer without a data set of cases; each image is a unit of the split and the
    evaluation reports each (modality, DA) group of the folder."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for sub in ("ct", "mr", "xray"):
        (folder / sub).mkdir(parents=True)
    for i in range(3):
        nib.save(nib.Nifti1Image(rng.normal(size=(24, 25, 24)).astype(np.float32), np.diag([0.8, 0.8, 0.8, 1.0])),
                 folder / "ct" / f"thin{i}.nii.gz")  # isotropic: DA 0
        nib.save(nib.Nifti1Image(rng.normal(size=(26, 24, 7)).astype(np.float32), np.diag([1.0, 1.0, 4.5, 1.0])),
                 folder / "mr" / f"thick{i}.nii.gz")  # 4.5 mm slices: DA 2
        Image.fromarray(rng.integers(0, 255, size=(33, 41), dtype=np.uint8)).save(folder / "xray" / f"cxr{i}.png")
    recipe = _recipe(tmp_path, collection=str(folder))
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, text = invoke("train", tmp_path / "tok.yaml", "--out", tmp_path / "tok", "--set", "train.max_steps=2")
    assert code == 0, text
    info = json.loads((tmp_path / "tok" / "run.json").read_text(encoding="utf-8"))
    assert info["modalities"] == ["ct", "mr", "xray"]
    assert info["training_data"]["kind"] == "collection" and info["training_data"]["path"] == str(folder.resolve())
    split = json.loads((tmp_path / "tok" / "split.json").read_text(encoding="utf-8"))
    assert sorted(split["train"] + split["val"]) == sorted(f"{s}/{n}{i}.{e}" for s, n, e in
                                                           (("ct", "thin", "nii.gz"), ("mr", "thick", "nii.gz"),
                                                            ("xray", "cxr", "png")) for i in range(3))
    code, text = invoke("evaluate", tmp_path / "tok", "--split", "all")
    assert code == 0, text
    with (tmp_path / "tok" / "eval" / "summary.csv").open(newline="", encoding="utf-8") as f:
        groups = {(r["modality"], int(r["da"])): int(r["images"]) for r in csv.DictReader(f)}
    assert groups == {("ct", 0): 3, ("mr", 2): 3, ("xray", 5): 3}
    import re

    report = (tmp_path / "tok" / "eval" / "report.md").read_text(encoding="utf-8")
    used, k = map(int, re.search(r"positions (\d+) of (\d+) codes", report).groups())
    with (tmp_path / "tok" / "eval" / "images.csv").open(newline="", encoding="utf-8") as f:
        per_image = [round(float(r["code_usage"]) * k) for r in csv.DictReader(f)]
    assert k == 16 and max(per_image) <= used <= k  # the union of the codes each image uses
    assert (tmp_path / "tok" / "eval" / "codebook.png").stat().st_size > 0
    missing = _recipe(tmp_path, collection=str(tmp_path / "nowhere"))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(missing), encoding="utf-8")
    code, text = invoke("train", tmp_path / "bad.yaml", "--out", tmp_path / "bad")
    assert code == 2 and "method.collection" in text and "nowhere" in text, text


def test_colour_pictures_train_with_three_channels_and_a_mim_stage_must_match(tmp_path: Path) -> None:
    """`method.channels: 3` (the spec's RGB): colour pictures keep their channels, grey volumes are replicated; the
    evaluation reads the same channels; a MIM stage on another channel count than its tokenizer is refused."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    (folder / "he").mkdir(parents=True)
    (folder / "mr").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, size=(34, 33, 3), dtype=np.uint8)).save(folder / "he" / f"tile{i}.png")
        nib.save(nib.Nifti1Image(rng.normal(size=(24, 25, 24)).astype(np.float32), np.eye(4)),
                 folder / "mr" / f"vol{i}.nii.gz")
    recipe = _recipe(tmp_path, collection=str(folder), channels=3)
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, text = invoke("train", tmp_path / "tok.yaml", "--out", tmp_path / "tok", "--set", "train.max_steps=2")
    assert code == 0, text
    info = json.loads((tmp_path / "tok" / "run.json").read_text(encoding="utf-8"))
    assert info["network"]["kwargs"]["in_channels"] == 3
    code, text = invoke("evaluate", tmp_path / "tok", "--split", "all")
    assert code == 0, text
    with (tmp_path / "tok" / "eval" / "images.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["modality"] for r in rows} == {"he", "mr"} and all(float(r["l1"]) > 0 for r in rows)
    mim = _recipe(tmp_path, stage="mim", tokenizer_run=str(tmp_path / "tok"), collection=str(folder))
    mim["model"] = {"name": "pumit_vit", "kwargs": {"width": 16, "num_layers": 2, "num_heads": 2}}
    (tmp_path / "mim.yaml").write_text(yaml.safe_dump(mim), encoding="utf-8")
    code, text = invoke("train", tmp_path / "mim.yaml", "--out", tmp_path / "mim")
    assert code == 2 and "method.channels 1" in text and "3 channel" in text, text
