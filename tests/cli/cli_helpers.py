"""Running the ``medmodal`` command in-process for the tests of this folder."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from medmodal.cli import app

_runner = CliRunner()


def run_cli(*args: str | Path) -> tuple[int, str]:
    """``medmodal ARGS`` in this process: exit code and output (stdout + stderr) with whitespace collapsed."""
    result = _runner.invoke(app, [str(a) for a in args])
    return result.exit_code, re.sub(r"\s+", " ", result.output)
