"""``medmodal pretrain``: self-supervised pretraining by whichever method the recipe, ``--from`` run or ``--method``
names (:meth:`medmodal.engine.plugin.MethodPlugin.pretrain`)."""

from __future__ import annotations

from pathlib import Path

import typer

from medmodal.commands.common import console, user_errors


def pretraining_method(*, method: str | None, recipes: list[str], from_run: Path | None) -> str:
    """The method that pretrains: ``--method``, else the ``--from`` run's, else the first recipe's, else the
    plug-in marked ``default_pretraining``."""
    from medmodal.engine.plugin import get_method, method_names
    from medmodal.engine.recipe import RecipeError, builtin_recipe_path, read_recipe_method

    if method is not None:
        try:
            get_method(method)
        except KeyError as err:
            raise RecipeError(f"--method: {err.args[0]}") from None
        return method
    if from_run is not None:
        from medmodal.engine.runinfo import load_run

        return load_run(from_run).info.method
    if recipes:
        name = recipes[0]
        path = Path(name) if name.endswith((".yaml", ".yml")) else builtin_recipe_path(name)
        return read_recipe_method(path)
    default = [n for n in method_names() if get_method(n).default_pretraining]
    if not default:
        raise RecipeError("name a pretraining recipe (medmodal pretrain RECIPE) or --method")
    return default[0]


def add_commands(app: typer.Typer) -> None:
    """Register ``pretrain`` on ``app``."""

    @app.command("pretrain")
    @user_errors
    def pretrain(
        recipes: list[str] = typer.Argument(  # noqa: B008
            None, help="Pretraining recipe(s), files or built-in names; their method pretrains (how many: see the "
                       "method's docs; default: the method's own)."),
        method: str = typer.Option(None, "--method", help="The method that pretrains, when no recipe or --from "
                                                          "names it."),
        out: Path = typer.Option(None, file_okay=False,
                                 help="Output folder (default: the method's, e.g. runs/<method>)."),
        stage: str = typer.Option(None, "--stage", help="Add this stage (a modality) to the --from model "
                                                        "(methods that pretrain in stages)."),
        data: Path = typer.Option(None, "--data", help="The images or cases to pretrain on (a folder or manifest)."),
        from_run: Path = typer.Option(None, "--from", help="Continue from this pretraining run (add a stage)."),
        set_: list[str] = typer.Option(  # noqa: B006
            [], "--set", help="Override a field of every recipe: --set train.max_steps=100."
        ),
        fast: bool = typer.Option(False, "--fast", help="A tiny smoke version (a few steps)."),
        overwrite: bool = typer.Option(False, help="Retrain finished runs in --out."),
    ) -> None:
        """Self-supervised pretraining by the method the recipe, the --from run or --method names (medmodal methods
        lists them; a method that pretrains in stages adds one with --from RUN --stage NAME --data DIR)."""
        from medmodal.engine.plugin import PretrainRequest, get_method
        from medmodal.engine.recipe import parse_overrides

        name = pretraining_method(method=method, recipes=list(recipes or []), from_run=from_run)
        plugin = get_method(name)
        if not plugin.offers("pretrain"):
            raise plugin.not_offered("pretrain")
        request = PretrainRequest(recipes=tuple(recipes or ()), out=out, stage=stage,
                                  data=data, from_run=from_run, overrides=parse_overrides(set_) if set_ else {},
                                  fast=fast, overwrite=overwrite)
        from medmodal.engine.distributed import is_rank_zero

        report = plugin.pretrain(request)
        if is_rank_zero():  # every process of a multi-process run returns here; one line is enough
            console.print(f"[bold green]done[/]: report at {report}")
