"""The method registry: discovery, the contract every plug-in meets, and recipe validation through it."""

from __future__ import annotations

from typing import Literal

import pytest
from typer.testing import CliRunner

from medmodal.engine.plugin import (
    MethodPlugin,
    MethodSection,
    default_method,
    get_method,
    method_names,
    register_method,
)
from medmodal.engine.recipe import RecipeError, dump_recipe, recipe_from_dict


def test_builtin_methods_are_discovered_and_one_is_the_default() -> None:
    names = method_names()
    assert {"zero_fill", "shaspec", "deepstaple"} <= set(names)
    assert default_method().name == "zero_fill"
    assert recipe_from_dict({}).method.name == "zero_fill"
    with pytest.raises(KeyError,
                       match="unknown method 'nope'; registered: deepstaple, m2dn, medcoss, multimix, pumit, shaspec"):
        get_method("nope")


@pytest.mark.parametrize("name", method_names())
def test_every_plugin_meets_the_contract(name: str) -> None:
    plugin = get_method(name)
    assert plugin.name == name and plugin.summary and set(plugin.spatial_dims) <= {2, 3}
    assert plugin.config.model_fields["name"].default == name
    for dims in plugin.spatial_dims:
        recipe = recipe_from_dict(plugin.contract_recipe(dims))
        assert recipe.method.name == name and recipe.spatial_dims == dims
        # the method section survives a dump and reload with its own type (not the base class)
        again = recipe_from_dict(__import__("yaml").safe_load(dump_recipe(recipe)))
        assert type(again.method) is plugin.config and again == recipe


def test_recipe_errors_name_the_method_field() -> None:
    with pytest.raises(RecipeError, match="method.alfa: unknown field"):
        recipe_from_dict({"method": {"name": "shaspec", "alfa": 1}})
    with pytest.raises(RecipeError,
                       match="method: unknown method 'shaspc'; registered: deepstaple, m2dn, medcoss, multimix, pumit, "
                             "shaspec"):
        recipe_from_dict({"method": {"name": "shaspc"}})
    with pytest.raises(RecipeError,
                       match="method: method needs a name: one of deepstaple, m2dn, medcoss, multimix, pumit, shaspec"):
        recipe_from_dict({"method": {"alpha": 1}})
    with pytest.raises(RecipeError, match="method.phases.0.samplr: unknown field"):
        recipe_from_dict({"method": {"name": "shaspec", "phases": [{"steps": 2, "samplr": "full"}]}})


def test_register_refuses_a_second_plugin_of_the_same_name_and_a_mismatched_section() -> None:
    class Other(MethodPlugin):
        name = "shaspec"
        config = get_method("zero_fill").config

    with pytest.raises(ValueError, match="needs `name: Literal\\['shaspec'\\]`"):
        register_method(Other())

    class Section(MethodSection):
        name: Literal["shaspec"] = "shaspec"

    class Clash(MethodPlugin):
        name = "shaspec"
        config = Section

    with pytest.raises(ValueError, match="registered twice"):
        register_method(Clash())
    assert type(get_method("shaspec")).__name__ == "ShaSpecPlugin"


def test_an_operation_a_method_does_not_offer_is_one_line() -> None:
    err = get_method("zero_fill").not_offered("fuse --run")
    assert str(err) == ("fuse --run is not offered by method 'zero_fill' (a zero-fill network with modality dropout "
                        "(segmentation or classification) run)")


def test_methods_command_lists_every_plugin() -> None:
    from medmodal.cli import app

    result = CliRunner().invoke(app, ["methods"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in method_names():
        assert name in result.output
    assert "zero_fill (default)" in result.output and "modality_dropout" in result.output
