"""What every ``medmodal`` command shares: the consoles and the user-error → exit-code-2 wrapper."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from medmodal.data.case import DataError
from medmodal.engine.recipe import RecipeError
from medmodal.engine.run import RunError

err_console = Console(stderr=True)
console = Console()
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn the library's user-facing errors into a red message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DataError, RecipeError, RunError, FileNotFoundError, FileExistsError) as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def experiment_group(app: typer.Typer) -> typer.Typer:
    """The ``experiment`` sub-command group of ``app``, created on first use (each method adds its own to it)."""
    for group in app.registered_groups:
        if group.name == "experiment" and group.typer_instance is not None:
            return group.typer_instance
    group_app = typer.Typer(help="Reproduce the methods' experiments on the synthetic phantom.", no_args_is_help=True)
    app.add_typer(group_app, name="experiment")
    return group_app
