"""Every option of every command, given a bad value, ends in one clear message and exit code 2, never a
traceback (issue 11, item 6).

The options are read from the command tree of :mod:`medmodal.cli`, so a new option is covered without editing
this file; a new *command* needs a baseline invocation in :func:`_baselines` (the test says so).
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from medmodal.cli import app

runner = CliRunner()
#: Path parameters that name something the command writes (a bad value is an existing file, or a path under one).
OUTPUTS = ("out", "dst", "probability")
BAD_TEXT = "../no such value?"
#: options whose "natural" bad value is a valid one: (command, parameter) → bad values to use instead
OVERRIDES = {("fuse", "undecided_label"): ["x"]}  # any integer, -1 included, is a label value


def _leaf_commands() -> list[tuple[tuple[str, ...], typing.Any]]:
    found = []

    def walk(command: typing.Any, path: tuple[str, ...]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            found.append((path, command))

    walk(typer.main.get_command(app), ())
    return found


def _element_type(annotation: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (list, tuple) and args:
        return args[0]
    if args and typing.get_origin(annotation) is not None:  # X | None
        return _element_type(args[0])
    return annotation


def _bad_values(param: typing.Any, garbage: Path, missing: Path) -> list[str]:
    """Values of the parameter's type that no command may accept."""
    kind = _element_type(param.type_descriptor.annotation)
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if kind is bool:
        return []
    if kind in (int, float):
        values = ["x"]
        values.append(str(low - 1) if low is not None else "-1")
        if high is not None:
            values.append(str(high + 1))
        return values
    if kind is Path:
        if param.name in OUTPUTS:
            return [str(garbage), str(garbage / "sub")]
        return [str(missing), str(garbage)]
    values = [BAD_TEXT]
    if param.multiple:
        values += ["no_equals_sign", "=", "x="]
    return values


def _baselines(d: Path, phantom: Path, run: Path, recipe: Path, m2dn_run: Path) -> dict[tuple[str, ...], list[str]]:
    """A valid invocation of every command, cheap to run up to its first check."""
    labels = [str(phantom / c / f"{c}_seg.nii.gz") for c in ("phantom_000", "phantom_001", "phantom_002")]
    t2 = phantom / "phantom_001" / "phantom_001_t2.nii.gz"
    return {
        ("train",): [str(recipe), "--out", str(d / "new_run")],
        ("methods",): [],
        ("evaluate",): [str(run), "--out", str(d / "new_eval")],
        ("predict",): [str(run), "--out", str(d / "new_pred"), "--image", f"t2={t2}"],
        ("synthesize",): [str(m2dn_run), "--out", str(d / "new_synth"), "--image", f"t2={t2}"],
        ("register",): ["--atlases", str(phantom), "--targets", str(phantom), "--out", str(d / "new_reg"),
                        "--transform", "affine"],
        ("fuse",): [*labels, "--method", "staple", "--out", str(d / "fused.nii.gz")],
        ("quickstart",): ["--fast", "--out", str(d / "new_qs")],
        ("data", "phantom"): ["--out", str(d / "new_phantom"), "--cases", "2", "--size", "8", "--dims", "2"],
        ("data", "check"): [str(phantom)],
        ("data", "convert"): [str(phantom), str(d / "new_convert"), "--to", "nnunet"],
        ("experiment", "deepstaple"): ["--fast", "--out", str(d / "new_deepstaple")],
        ("experiment", "m2dn"): ["--fast", "--out", str(d / "new_m2dn")],
        ("experiment", "multimix"): ["--fast", "--out", str(d / "new_multimix")],
        ("experiment", "pumit"): ["--fast", "--out", str(d / "new_pumit")],
        ("experiment", "medcoss"): ["--fast", "--out", str(d / "new_medcoss")],
        ("pretrain",): ["--fast", "--out", str(d / "new_pretrain")],
    }


#: options that replace others of the baseline: (command, option) → baseline parameters kept
_ALONE = {("train", "resume"): (), ("predict", "data"): ("run", "out"), ("synthesize", "data"): ("run", "out")}


def _with_value(command: typing.Any, base: list[str], param: typing.Any, value: str, path: tuple[str, ...]) -> list:
    """``base`` with ``param`` set to ``value`` (an option replaced or added, an argument replaced)."""
    ctx = command.make_context("medmodal", list(base), resilient_parsing=True)
    given = dict(ctx.params)
    args: list[str] = []
    keep = _ALONE.get((" ".join(path), param.name))
    for p in command.params:
        if keep is not None and p.name not in keep and p.name != param.name:
            continue
        v = value if p.name == param.name else given.get(p.name)
        if p.name != param.name and (v is None or v == p.default or v == () or v == []):
            continue
        values = [v] if p.name == param.name or not isinstance(v, (list, tuple)) else list(v)
        if getattr(p, "is_flag", False):
            if v:
                args.append(p.opts[0])
            continue
        for item in values:
            args += ([p.opts[0]] if p.param_type_name == "option" else []) + [str(item)]
    return args


def _cases(tmp: Path, phantom: Path, run: Path, recipe: Path, m2dn_run: Path) -> list[tuple[str, list[str]]]:
    garbage = tmp / "garbage.txt"
    garbage.write_text("not an image, a data set or a folder\n")
    baselines = _baselines(tmp, phantom, run, recipe, m2dn_run)
    cases = []
    for path, command in _leaf_commands():
        assert path in baselines, f"add a baseline invocation of `medmodal {' '.join(path)}` to _baselines"
        for param in command.params:
            if param.name == "help" or getattr(param, "is_flag", False):
                continue
            bad = OVERRIDES.get((" ".join(path), param.name)) or _bad_values(param, garbage, tmp / "does_not_exist")
            for value in bad:
                args = _with_value(command, baselines[path], param, value, path)
                cases.append((f"{' '.join(path)} {param.opts[0]}={value!r}", [*path, *args]))
    return cases


def test_every_option_rejects_a_bad_value_without_a_traceback(tmp_path, tiny_phantom, tiny_run,
                                                              tiny_recipe_file, tiny_m2dn_run) -> None:
    failures = []
    cases = _cases(tmp_path, tiny_phantom, tiny_run, tiny_recipe_file, tiny_m2dn_run)
    assert len(cases) > 60
    for label, args in cases:
        result = runner.invoke(app, args)
        text = result.output
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        if crashed or result.exit_code != 2 or "Traceback" in text or not text.strip():
            why = repr(result.exception) if crashed else f"exit {result.exit_code}"
            failures.append(f"{label}: {why}: {' '.join(text.split())[:300]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("spacing", ["0,1,1", "-1,1,1", "1,nan,1", "1,inf,1"])
def test_phantom_spacing_must_be_positive(tmp_path, spacing: str) -> None:
    result = runner.invoke(app, ["data", "phantom", "--out", str(tmp_path / "p"), "--cases", "2", "--size", "8",
                                 "--spacing", spacing])
    assert result.exit_code == 2 and not isinstance(result.exception, Exception), result.output
    assert "--spacing" in result.output and "positive" in result.output
    assert not (tmp_path / "p").exists()


def test_recipe_phantom_spacing_must_be_positive(tmp_path) -> None:
    result = runner.invoke(app, ["train", "quickstart_fast", "--out", str(tmp_path / "r"), "--set",
                                 "data.phantom.spacing=[0,1,1]"])
    assert result.exit_code == 2 and not isinstance(result.exception, Exception), result.output
    assert "data.phantom.spacing" in result.output and not (tmp_path / "r").exists()


def test_gpu_accelerator_without_a_gpu_is_one_line(tmp_path, tiny_recipe_file) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["train", str(tiny_recipe_file), "--out", str(tmp_path / "r"), "--set",
                                 "train.accelerator=gpu"])
    assert result.exit_code == 2 and not isinstance(result.exception, Exception), result.output
    assert "train.accelerator" in result.output and "no GPU" in result.output
    assert not (tmp_path / "r").exists()
