"""What every ``medmodal`` command shares: the consoles and the user-error → exit-code-2 wrapper."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from medmodal.data.case import DataError
from medmodal.engine.recipe import RecipeError
from medmodal.engine.run import RunError

err_console = Console(stderr=True)
console = Console()
F = TypeVar("F", bound=Callable[..., Any])


#: operating-system errors on a path the user gave: a missing file, a file where a folder belongs, no permission
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def check_output_path(path: Path, *, option: str) -> None:
    """Raise :class:`DataError` when a folder above ``path`` is a file: nothing could be written there, and a
    command would find out only after its work (a file or a folder, ``path`` itself may not exist yet)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{option} {path}: {parent} is a file, not a folder; choose another {option}")
            return


def user_errors(fn: F) -> F:
    """Turn the library's user-facing errors (and the operating system's errors on a path the user gave) into
    one red line and exit code 2; Ctrl-C into one line and exit code 130. An ``out`` path under a file is refused
    before the command starts."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if isinstance(kwargs.get("out"), Path):
                check_output_path(kwargs["out"], option="--out")
            return fn(*args, **kwargs)
        except (DataError, RecipeError, RunError) as err:
            # escaped: a message quoting a list (['A', 'B']) or a [section] is text, not console markup
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt as err:  # Ctrl-C: one line (what was kept, how to continue, if the command says)
            err_console.print(f"interrupted{f': {escape(str(err))}' if str(err) else ''}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(code=130) from None
        except _PATH_ERRORS as err:
            text = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
            err_console.print(f"[bold red]error:[/] {escape(text)}; check the path", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def parse_seeds(text: str, *, option: str = "--seeds") -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; a typer ``BadParameter`` (exit 2, one line) for anything else or no seed."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option} must be integers separated by commas, got {text!r}") from None
    if not seeds:
        raise typer.BadParameter(f"{option}: give at least one seed")
    return seeds


def experiment_group(app: typer.Typer) -> typer.Typer:
    """The ``experiment`` sub-command group of ``app``, created on first use (each method adds its own to it)."""
    for group in app.registered_groups:
        if group.name == "experiment" and group.typer_instance is not None:
            return group.typer_instance
    group_app = typer.Typer(help="Reproduce the methods' experiments on the synthetic phantom.", no_args_is_help=True)
    app.add_typer(group_app, name="experiment")
    return group_app
