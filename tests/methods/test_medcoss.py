"""MedCoSS as a method (``shared/methods/medcoss.md`` §3): the learning-rate schedule, modality-homogeneous slots,
loss routing, the frozen teacher, ``medmodal pretrain`` over stages (buffers carried from run to run), adding a
stage to a finished model, and the bad inputs of the issue."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from medmodal.cli import app
from medmodal.methods.medcoss.data import BufferItems, Source, StageBatches, TextItems, collate_stage
from medmodal.methods.medcoss.stages import tiny_recipe
from medmodal.methods.medcoss.system import MedCoSSSystem, medcoss_lr_factor

runner = CliRunner()


def invoke(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_lr_schedule_is_linear_warm_up_then_half_cosine() -> None:
    """Invariant 10 in epochs (40 warm-up of 300): lr(0) = 0, lr(40) = peak, lr(170) = peak / 2, lr(300) = 0."""
    f = [medcoss_lr_factor(e, warmup_steps=40, total_steps=300) for e in (0, 20, 40, 170, 300)]
    assert f == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-12)
    assert medcoss_lr_factor(400, warmup_steps=40, total_steps=300) == pytest.approx(0.0, abs=1e-12)


def _text(n: int, name: str = "t") -> TextItems:
    ids = np.arange(n * 6).reshape(n, 6) % 50 + 5
    return TextItems(ids, np.ones_like(ids), np.tile(np.arange(6), (n, 1)), [f"{name}{i}" for i in range(n)],
                     np.zeros(n, dtype=np.int64))


def test_slots_hold_one_modality_and_buffers_get_their_share() -> None:
    """Invariant 11: every batch one source; ⌊n/B⌋ slots per source per cycle (at least one for a small buffer);
    buffer items only from the buffer."""
    current = _text(50, "cur")
    big = BufferItems("text", {"ids": _text(17).ids, "mask": _text(17).mask, "word_ids": _text(17).word_ids},
                      [f"old{i}" for i in range(17)], np.zeros(17, dtype=np.int64))
    small = BufferItems("image2d", {"x": np.random.default_rng(0).random((3, 3, 8, 8)).astype(np.float32)},
                        ["a", "b", "c"], np.zeros(3, dtype=np.int64))
    sources = [Source("report", "text", "current", current), Source("old", "text", "buffer", big),
               Source("xray", "image2d", "buffer", small)]
    data = StageBatches(sources=sources, batch_size=8, batches_per_epoch=9, seed=3)
    assert sorted(data.slots) == [0] * 6 + [1, 1, 2]  # 50 // 8, 17 // 8, max(1, 3 // 8)
    seen = []
    for epoch in range(2):
        data.set_epoch(epoch)
        for j in range(data.batches_per_epoch):
            batch = collate_stage([data[j * 8 + p] for p in range(8)])
            src, items = data.plan(j)
            assert batch["source"] == sources[src].name and batch["role"] == sources[src].role
            if batch["source"] == "xray":
                assert batch["x"].shape == (8, 3, 8, 8) and set(items.tolist()) <= {0, 1, 2}
            seen.append(batch["source"])
    for cycle in (seen[:9], seen[9:]):  # one cycle = 9 slots = one epoch here
        assert (cycle.count("report"), cycle.count("old"), cycle.count("xray")) == (6, 2, 1)
    data.set_epoch(0)
    assert collate_stage([data[p] for p in range(8)])["source"] == seen[0]  # the draw is a function of the seed


def _system(tmp_path: Path) -> MedCoSSSystem:
    from medmodal.networks.medcoss import MAEDecoder, MLMHead, medcoss_vit_tiny

    torch.manual_seed(0)
    kw = {"width": 16, "depth": 1, "heads": 2, "vocab_size": 60, "max_text_len": 8, "pos_grid_2d": (2, 2)}
    student, teacher = medcoss_vit_tiny(**kw), medcoss_vit_tiny(**kw)
    teacher.load_state_dict(student.state_dict())
    heads = {"image2d": MAEDecoder(spatial_dims=2, patch_size=8, channels=3, encoder_width=16, width=8, depth=1,
                                   heads=2, pos_grid=(2, 2)),
             "text": MLMHead(width=16, vocab_size=60)}
    return MedCoSSSystem(network=student, heads=heads, teacher=teacher,
                         text={"mask_id": 4, "vocab_size": 60, "special_ids": [0, 1, 2, 3, 4]}, val_names=[])


def _batches() -> dict[str, dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g)
    ids = torch.randint(5, 60, (4, 8), generator=g)
    text = {"ids": ids, "mask": torch.ones_like(ids), "word_ids": torch.arange(8).expand(4, 8).clone()}
    return {"current_image": {"kind": "image2d", "role": "current", "source": "xray", "x": x},
            "buffer_image": {"kind": "image2d", "role": "buffer", "source": "xray", "x": x},
            "current_text": {"kind": "text", "role": "current", "source": "report", **text},
            "buffer_text": {"kind": "text", "role": "buffer", "source": "report", **text}}


@pytest.mark.parametrize("name", ["current_image", "buffer_image", "current_text", "buffer_text"])
def test_each_batch_gets_only_its_own_loss(tmp_path: Path, name: str) -> None:
    """Invariant 7: a current batch trains its pretext head; a buffer batch only distils (no head gradient) and
    never moves the teacher."""
    system = _system(tmp_path).train()
    loss = system.batch_loss(_batches()[name], torch.Generator().manual_seed(0))
    loss.backward()
    grads = {k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
             for k, m in system.heads.items()}
    if name == "current_image":
        assert grads == {"image2d": True, "text": False}
    elif name == "current_text":
        assert grads == {"image2d": False, "text": True}
    else:
        assert grads == {"image2d": False, "text": False} and loss.item() >= 0
    assert all(p.grad is None for p in system.teacher.parameters())
    assert any(p.grad is not None for p in system.network.parameters())


def test_the_teacher_is_frozen_in_eval_mode_and_deterministic(tmp_path: Path) -> None:
    """Invariants 5 and 6: after system.train() the teacher stays in eval mode (drop-path off), is frozen, an
    optimiser step leaves it unchanged; with identical weights and the student in eval, L_kd = 0 exactly; the
    released code's teacher (teacher_mode train) is stochastic."""
    system = _system(tmp_path)
    system.train()
    assert not system.teacher.training and system.network.training
    assert not any(p.requires_grad for p in system.teacher.parameters())
    batch = _batches()["buffer_image"]
    system.network.eval()
    assert system.distillation(batch, torch.Generator().manual_seed(2)).item() == 0.0
    system.train()
    before = {k: v.clone() for k, v in system.teacher.state_dict().items()}
    opt = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-2)
    system.batch_loss(batch, torch.Generator().manual_seed(3)).backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in system.teacher.state_dict().items())
    tokens = system.teacher.tokenize("image2d", batch["x"])
    assert torch.equal(system.teacher.encode(tokens), system.teacher.encode(tokens))
    system.teacher_mode = "train"
    system.train()
    assert system.teacher.training
    assert not torch.equal(system.teacher.encode(tokens), system.teacher.encode(tokens))  # drop-path on


# ------------------------------------------------------------------------------------------ the command line


def _recipe(tmp_path: Path, **method: object) -> Path:
    recipe = tiny_recipe()
    recipe["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe["method"].update(method)
    recipe["train"].update(max_steps=2, val_every_steps=2, checkpoint_every_steps=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two-stage tiny recipe (reports, then 2D slices) pretrained with buffers."""
    tmp = tmp_path_factory.mktemp("medcoss")
    code, text = invoke("pretrain", _recipe(tmp), "--out", tmp / "model")
    assert code == 0, text
    return tmp / "model"


def test_pretrain_runs_the_stages_and_carries_the_buffers(pretrained: Path) -> None:
    first, second = pretrained / "1_report", pretrained / "2_slices"
    info = json.loads((second / "run.json").read_text(encoding="utf-8"))
    assert info["inference"]["stages"] == ["report", "slices"] and info["task"]["kind"] == "pretraining"
    assert info["initialised_from"]["loaded"] > 0 and info["inference"]["previous_run"] == str(first.resolve())
    index = json.loads((second / "buffers" / "buffers.json").read_text(encoding="utf-8"))
    assert sorted(index) == ["report", "slices"]  # the first stage's buffer carried on, its own added
    assert index["report"] == json.loads((first / "buffers" / "buffers.json").read_text(encoding="utf-8"))["report"]
    # 9 training reports, 18 training slices (2 contrasts of 9 cases): k = max(1, int(0.01 N)) = 1 and
    # q = max(1, int(0.05 N // k)) = 1, so one item each
    sizes = {name: (e["k"], e["q"], e["size"], e["of"]) for name, e in index.items()}
    assert sizes == {"report": (1, 1, 1, 9), "slices": (1, 1, 1, 18)}
    for entry in index.values():
        with np.load(second / "buffers" / entry["file"]) as f:
            assert list(f["names"]) == entry["items"]
    assert (second / "text_tokenizer.json").is_file()
    metrics = (second / "metrics.csv").read_text(encoding="utf-8")
    assert "val/report_kd" in metrics and "val/slices_mae" in metrics
    report = (pretrained / "report.md").read_text(encoding="utf-8")
    assert "## stage `1_report`" in report and "## stage `2_slices`" in report
    code, text = invoke("pretrain", tiny_recipe_path(pretrained), "--out", pretrained)
    assert code == 2 and "--overwrite" in text, text


def tiny_recipe_path(pretrained: Path) -> Path:
    return pretrained.parent / "recipe.yaml"


def test_a_stage_added_later_keeps_every_earlier_buffer(pretrained: Path, tmp_path: Path) -> None:
    """`pretrain --from RUN --stage ct --data DIR`: the model continues with a new modality of a kind it has."""
    folder = tmp_path / "ct"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        nib.save(nib.Nifti1Image(rng.normal(size=(18, 17, 9)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])),
                 folder / f"ct{i}.nii.gz")
    code, text = invoke("pretrain", "--from", pretrained / "2_slices", "--stage", "ct", "--data", folder,
                        "--out", tmp_path / "more")
    # the tiny model has text and 2D tokenizers only: a 3D stage is refused, naming what it has
    assert code == 2 and "no tokenizer of that kind" in text and "image2d, text" in text, text
    pictures = tmp_path / "tiles"
    pictures.mkdir()
    from PIL import Image

    for i in range(6):
        Image.fromarray(rng.integers(0, 255, size=(20, 19, 3), dtype=np.uint8)).save(pictures / f"tile{i}.png")
    code, text = invoke("pretrain", "--from", pretrained / "2_slices", "--stage", "pathology", "--data", pictures,
                        "--out", tmp_path / "more", "--set", "train.max_steps=2")
    assert code == 0, text
    run = tmp_path / "more" / "3_pathology"
    index = json.loads((run / "buffers" / "buffers.json").read_text(encoding="utf-8"))
    assert sorted(index) == ["pathology", "report", "slices"]
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert info["inference"]["stages"] == ["report", "slices", "pathology"]
    stored = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    assert stored["method"]["stages"][-1] == {"name": "pathology", "kind": "image2d",
                                              "data": {"collection": str(pictures.resolve()), "path": None,
                                                       "phantom": stored["method"]["stages"][-1]["data"]["phantom"],
                                                       "modalities": None, "cache_dir": None}}


def test_bad_inputs_are_one_line_errors(pretrained: Path, tmp_path: Path) -> None:
    from medmodal.engine.plugin import get_method

    # --from a run of another method
    other = get_method("zero_fill").contract_recipe(2)
    other["data"]["cache_dir"] = str(tmp_path / "zf_cache")
    (tmp_path / "zf.yaml").write_text(yaml.safe_dump(other), encoding="utf-8")
    code, text = invoke("train", tmp_path / "zf.yaml", "--out", tmp_path / "zf", "--set", "train.max_steps=1")
    assert code == 0, text
    code, text = invoke("pretrain", "--method", "medcoss", "--from", tmp_path / "zf", "--stage", "x", "--data",
                        tmp_path)
    assert code == 2 and "zero_fill run, not a MedCoSS run" in text, text
    # a stage name the model already has
    code, text = invoke("pretrain", "--from", pretrained / "2_slices", "--stage", "report", "--data", tmp_path)
    assert code == 2 and "already has a stage of that name" in text, text
    # an empty corpus: a data set of cases without any report
    from medmodal.data.phantom import write_phantom

    data = write_phantom(tmp_path / "noreports", cases=3, spatial_dims=2, size=[20, 20], seed=4)
    meta = data / "metadata.csv"
    if meta.exists():
        meta.unlink()
    recipe = tiny_recipe()
    recipe["method"]["stages"][0]["data"] = {"path": str(data)}
    (tmp_path / "empty.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, text = invoke("pretrain", tmp_path / "empty.yaml", "--out", tmp_path / "empty")
    assert code == 2 and "no report text to train on" in text, text
    # a typo in a stage
    recipe = tiny_recipe()
    recipe["method"]["stages"][1]["kind"] = "image4d"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, text = invoke("pretrain", tmp_path / "typo.yaml", "--out", tmp_path / "typo")
    assert code == 2 and "kind" in text, text


def test_texts_longer_than_the_maximum_are_cut_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    import logging

    from medmodal.engine.recipe import load_recipe
    from medmodal.methods.medcoss.sources import text_items

    recipe = load_recipe(_recipe(tmp_path, text_max_length=6))
    with caplog.at_level(logging.INFO, logger="medmodal"):
        from medmodal.data.text import train_text_tokenizer
        from medmodal.methods.medcoss.sources import stage_corpus

        stage = recipe.method.stages[0]
        tok = train_text_tokenizer(stage_corpus(stage).texts, vocab_size=60)
        train, val = text_items(stage, tokenizer=tok, method=recipe.method, seed=0)
    assert train.ids.shape[1] == 6 and len(train) + len(val) == 12
    assert "12 of 12 reports cut to 6 tokens" in caplog.text


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_the_pretrained_encoder_fine_tunes_through_train_from(pretrained: Path, tmp_path: Path, task: str) -> None:
    """`medmodal train --from` a MedCoSS stage run: every pretrained image tensor of the encoder is loaded into the
    fine-tuning network's `encoder.`; the head (and the UNETR decoder) start fresh; the text tokenizer stays behind."""
    from medmodal.engine.plugin import get_method

    enc = tiny_recipe()["model"]["kwargs"]
    recipe = get_method("zero_fill").contract_recipe(2)
    recipe["data"].update(modalities=["t1c"], cache_dir=str(tmp_path / "cache"))
    recipe["data"]["phantom"].update(cases=8)
    if task == "classification":
        recipe["model"] = {"name": "medcoss_vit_cls", "kwargs": {**enc, "num_classes": 2}}
        recipe["method"] = {"name": "zero_fill", "task": "classification"}
    else:
        recipe["model"] = {"name": "medcoss_vit_seg", "kwargs": {**enc, "feature_size": 4}}
    recipe["train"].update(max_steps=1, val_every_steps=1)
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, text = invoke("train", tmp_path / "ft.yaml", "--out", tmp_path / "ft", "--from", pretrained / "2_slices")
    assert code == 0, text
    info = json.loads((tmp_path / "ft" / "run.json").read_text(encoding="utf-8"))["initialised_from"]
    from safetensors.torch import load_file

    pre = load_file(str(pretrained / "2_slices" / "weights" / "model.safetensors"))
    image_part = [k for k in pre if not k.startswith("tokenizers.text")]
    assert info["loaded"] == len(image_part)
    assert all(not k.startswith("encoder.") for k in info["not_loaded"]), info["not_loaded"]


def test_feature_drift_and_the_forgetting_report(pretrained: Path, tmp_path: Path) -> None:
    """The experiment's measures: no drift of a run against itself, some after a later stage; the report's
    forgetting line is the best earlier probe minus the final one."""
    from medmodal.methods.medcoss.experiment import _Job, _report, feature_drift

    first, second = pretrained / "1_report", pretrained / "2_slices"
    assert feature_drift(first, first, "report") == 0.0
    assert feature_drift(second, first, "report") > 0.0
    rows = [["medcoss", 0, "1_report", "report", "0.9000", ""], ["medcoss", 0, "2_slices", "report", "0.7000", "0.01"],
            ["medcoss", 0, "2_slices", "slices", "0.6000", ""], ["medcoss", 1, "1_report", "report", "0.8000", ""],
            ["medcoss", 1, "2_slices", "report", "0.8000", "0.03"], ["medcoss", 1, "2_slices", "slices", "0.7000", ""]]
    text = _report([_Job("medcoss", 0, tmp_path, "medcoss_tiny", {}, False)], [], rows, fast=False, minutes=1.0,
                   jobs=1, figure=tmp_path / "forgetting.png")
    assert "| 1_report | 0.850 ± 0.071 |  |" in text
    assert "Forgetting (best earlier minus final, positive = forgotten): report +0.100" in text
    assert "| 2_slices | 2.00e-02 ± 1.41e-02 |" in text


def test_two_processes_pretrain_every_stage_in_step(tmp_path: Path) -> None:
    """`medmodal pretrain` with 2 processes: every stage trains as DDP with the ranks in sync, and the buffer that
    rank 0 writes at the end of a stage is there for both processes of the next stage (a barrier)."""
    import os
    import subprocess
    import sys

    recipe = _recipe(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("MASTER_PORT", None)
    out = subprocess.run([sys.executable, "-m", "medmodal.cli", "pretrain", str(recipe), "--out", str(tmp_path / "m"),
                          "--set", "train.devices=2", "--set", "train.accelerator=cpu", "--set", "data.batch_size=4"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("done: report at") == 1  # printed by rank 0 only
    for stage in ("1_report", "2_slices"):
        doc = json.loads((tmp_path / "m" / stage / "distributed.json").read_text(encoding="utf-8"))
        assert doc["world_size"] == 2 and doc["ranks"][0]["parameter_checksum"] == doc["ranks"][1]["parameter_checksum"]
    second = json.loads((tmp_path / "m" / "2_slices" / "run.json").read_text(encoding="utf-8"))
    assert second["inference"]["buffers"] == ["report", "slices"]
    metrics = (tmp_path / "m" / "2_slices" / "metrics.csv").read_text(encoding="utf-8")
    assert "val/report_kd" in metrics  # both processes distilled the first stage's buffer


def test_a_text_stage_reads_a_report_table_without_images(tmp_path: Path) -> None:
    """A text stage's data may be a CSV of reports (an archive of report texts with no images)."""
    import csv

    from medmodal.data.phantom import generate_phantom_cases

    cases = list(generate_phantom_cases(cases=12, spatial_dims=2, size=[20, 20], seed=3))
    table = tmp_path / "reports.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["study_id", "impression", "target"])
        writer.writerows([c.case_id, c.report, c.target] for c in cases)
    recipe = tiny_recipe()
    recipe["method"]["stages"] = [{"name": "report", "kind": "text", "data": {"path": str(table)}}]
    recipe["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe["train"].update(max_steps=2, val_every_steps=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, text = invoke("pretrain", tmp_path / "r.yaml", "--out", tmp_path / "m")
    assert code == 0, text
    index = json.loads((tmp_path / "m" / "1_report" / "buffers" / "buffers.json").read_text(encoding="utf-8"))
    assert index["report"]["of"] == 9 and set(index["report"]["items"]) <= {c.case_id for c in cases}
    probes = (tmp_path / "m" / "1_report" / "eval" / "probes.csv").read_text(encoding="utf-8")
    assert "report,text,9,3," in probes  # the table's targets reached the probe
