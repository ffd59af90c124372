"""`predict` / `evaluate` on what a user types: modality names, case ids, repeated or empty `--image`, data the
model was not trained on, and a run where every case fails (issue 11, items 3, 4, 5, 12 and 13)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_cli

PHANTOM_WARNING = "was trained only on synthetic data"
invoke = run_cli


@pytest.fixture(scope="module")
def phantom(tiny_phantom: Path) -> Path:
    return tiny_phantom


@pytest.fixture(scope="module")
def t1c_t2_run(tiny_run: Path) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def real_like(tmp_path_factory, phantom: Path) -> Path:
    """The phantom with its "synthetic" flag cleared: stands for a real data set."""
    out = tmp_path_factory.mktemp("real") / "data"
    shutil.copytree(phantom, out)
    sidecar = json.loads((out / "medmodal.json").read_text())
    sidecar["synthetic"] = False
    (out / "medmodal.json").write_text(json.dumps(sidecar))
    return out


def _image(phantom: Path, modality: str, case: str = "phantom_001") -> Path:
    return phantom / case / f"{case}_{modality}.nii.gz"


def test_recorded_modalities_are_normalised(t1c_t2_run: Path) -> None:
    assert json.loads((t1c_t2_run / "run.json").read_text())["modalities"] == ["t1c", "t2"]


def test_image_modality_names_are_case_insensitive_with_aliases(t1c_t2_run, phantom, tmp_path) -> None:
    code, text = invoke("predict", t1c_t2_run, "--image", f"T1CE={_image(phantom, 't1c')}",
                        "--image", f"T2={_image(phantom, 't2')}", "--out", tmp_path / "p")
    assert code == 0, text
    assert (tmp_path / "p" / "case_seg.nii.gz").is_file()


@pytest.mark.parametrize("case_id", ["../escaped", "a/b", "..", ".hidden", "a\\b", ""])
def test_case_id_must_be_a_plain_file_name(t1c_t2_run, phantom, tmp_path, case_id: str) -> None:
    out = tmp_path / "sub" / "p"
    code, text = invoke("predict", t1c_t2_run, "--image", f"t2={_image(phantom, 't2')}", "--case-id", case_id,
                        "--out", out)
    assert code == 2, text
    assert "--case-id" in text and "Traceback" not in text
    assert list(tmp_path.rglob("*seg*")) == [] and not out.exists()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (["t2={t2}", "t2={t1c}"], "--image t2 is given twice"),
        (["t2={t2}", "T2={t1c}"], "--image t2 is given twice"),
        (["t2="], "--image t2=: no file"),
        (["t2= "], "--image t2=: no file"),
    ],
)
def test_repeated_or_empty_image_is_an_error(t1c_t2_run, phantom, tmp_path, images, message) -> None:
    args = []
    for item in images:
        args += ["--image", item.format(t2=_image(phantom, "t2"), t1c=_image(phantom, "t1c"))]
    code, text = invoke("predict", t1c_t2_run, *args, "--out", tmp_path / "p")
    assert code == 2 and message in text, text
    assert not (tmp_path / "p").exists()


def test_a_case_without_the_models_modalities_names_them(t1c_t2_run, phantom, tmp_path) -> None:
    data = tmp_path / "flair_only"
    shutil.copytree(phantom, data)
    for f in [*data.glob("*/*_t1c.nii.gz"), *data.glob("*/*_t2.nii.gz")]:
        if "phantom_000" in f.name:
            f.unlink()
    code, text = invoke("predict", t1c_t2_run, "--data", data, "--out", tmp_path / "p")
    assert code == 2, text
    assert "phantom_000" in text and "this model uses ['t1c', 't2']" in text, text
    assert "unknown modality" not in text and "'t1', 't1c', 't2', 'flair'" not in text


def test_an_image_the_model_does_not_use_names_what_it_uses(t1c_t2_run, phantom, tmp_path) -> None:
    code, text = invoke("predict", t1c_t2_run, "--image", f"FLAIR={_image(phantom, 'flair')}", "--out", tmp_path / "p")
    assert code == 2 and "does not use: ['flair']" in text and "uses ['t1c', 't2']" in text, text
    code, text = invoke("predict", t1c_t2_run, "--image", f"dwi={_image(phantom, 't2')}", "--out", tmp_path / "p")
    assert code == 2 and "unknown modality name(s) ['dwi']" in text, text


def test_predict_leaves_no_output_folder_when_every_case_fails(t1c_t2_run, phantom, tmp_path) -> None:
    data = tmp_path / "broken"
    shutil.copytree(phantom, data)
    for f in data.glob("*/*_t2.nii.gz"):
        f.write_bytes(f.read_bytes()[:100])  # truncated: unreadable
    for f in data.glob("*/*_t1c.nii.gz"):
        f.unlink()
    code, text = invoke("predict", t1c_t2_run, "--data", data, "--out", tmp_path / "p")
    assert code == 2 and "could not be processed" in text, text
    assert not (tmp_path / "p").exists()
    (tmp_path / "given").mkdir()  # an empty folder the user made is left as it was
    code, text = invoke("predict", t1c_t2_run, "--data", data, "--out", tmp_path / "given")
    assert code == 2 and (tmp_path / "given").is_dir() and not any((tmp_path / "given").iterdir())


def test_phantom_model_on_other_data_warns_once(t1c_t2_run, phantom, real_like, tmp_path) -> None:
    code, text = invoke("predict", t1c_t2_run, "--data", phantom, "--out", tmp_path / "a")
    assert code == 0 and PHANTOM_WARNING not in text, text
    code, text = invoke("predict", t1c_t2_run, "--data", real_like, "--out", tmp_path / "b")
    assert code == 0 and text.count(PHANTOM_WARNING) == 1, text
    assert "meaningless" in text
    code, text = invoke("predict", t1c_t2_run, "--image", f"t2={_image(real_like, 't2')}", "--out", tmp_path / "c")
    assert code == 0 and text.count(PHANTOM_WARNING) == 1, text
    code, text = invoke("evaluate", t1c_t2_run, "--data", real_like, "--out", tmp_path / "e")
    assert code == 0 and text.count(PHANTOM_WARNING) == 1, text
    code, text = invoke("evaluate", t1c_t2_run, "--out", tmp_path / "e2")
    assert code == 0 and PHANTOM_WARNING not in text, text
