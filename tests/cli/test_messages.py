"""Each message fits the command that printed it (issue 11, item 10): `data check` names a file once, and the
pointer to `medmodal data --help` leads to a description of the layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

from cli_helpers import run_cli


def test_data_check_names_the_file_once_per_problem(tiny_phantom: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_phantom, bad)
    f = bad / "phantom_002" / "phantom_002_t2.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    code, text = run_cli("data", "check", bad)
    assert code == 2, text
    assert f"{f}: {f}" not in text, text  # was "case /p: /p: ..."
    assert f"{f}: cannot be read" in text and "1 error(s)" in text, text


def test_data_help_describes_the_layouts_the_errors_point_to(tmp_path: Path) -> None:
    code, text = run_cli("data", "check", tmp_path)  # an empty folder: no layout recognised
    assert code == 2 and "medmodal data --help" in text, text
    code, text = run_cli("data", "--help")
    assert code == 0
    for must in ("BraTS", "_t1ce", "dataset.json", "imagesTr", "manifest", "case_id", "label"):
        assert must in text, must


def test_error_text_is_not_read_as_console_markup(tmp_path) -> None:
    """A message that quotes a list of names (``['a', 'b']`` or ``[lung]``) prints whole: rich would take
    ``[lung]`` for a style tag and drop it."""
    import typer
    from typer.testing import CliRunner

    from medmodal.commands.common import user_errors
    from medmodal.data.case import DataError

    app = typer.Typer()

    @app.command()
    @user_errors
    def fail() -> None:
        raise DataError("method.regions: unknown region(s) [lung]; the data set has [bold] and ['WT']")

    @app.command()
    def other() -> None:  # a second command keeps typer from folding the app into one command
        pass

    result = CliRunner().invoke(app, ["fail"])
    assert result.exit_code == 2
    assert "unknown region(s) [lung]; the data set has [bold] and ['WT']" in result.output
