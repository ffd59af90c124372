from __future__ import annotations

import pytest

from medmodal.engine.recipe import RecipeError, builtin_recipe_path, dump_recipe, load_recipe, recipe_from_dict

BUILTIN = sorted(p.stem for p in builtin_recipe_path("quickstart").parent.glob("*.yaml"))


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_recipes_validate(name: str) -> None:
    recipe = load_recipe(builtin_recipe_path(name))
    assert recipe.name == name
    # the resolved recipe round-trips through YAML
    assert recipe_from_dict(__import__("yaml").safe_load(dump_recipe(recipe))) == recipe


# DeepSTAPLE's, PUMIT's and MedCoSS's pretraining networks are not built from the shared vocabulary (modalities,
# out_channels); their recipes are built by their plug-ins in tests/methods/test_deepstaple*.py, test_pumit.py and
# test_medcoss.py (the fine-tuning recipes of the pretrained encoders are built here)
@pytest.mark.parametrize("name", [n for n in BUILTIN if "deepstaple" not in n
                                  and (("pumit" not in n and "medcoss" not in n) or "finetune" in n)])
def test_builtin_recipes_build_their_network(name: str) -> None:
    from medmodal.engine.cases import network_kwargs
    from medmodal.networks.registry import create_network

    recipe = load_recipe(builtin_recipe_path(name))
    mods = recipe.data.modalities or ["t1", "t1c", "t2", "flair"]
    kwargs = network_kwargs(recipe, mods, out_channels=3, classification="cls" in name)
    net = create_network(recipe.model.name, **kwargs)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_typo_names_the_field(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(RecipeError, match=r"r.yaml: train.max_step: unknown field"):
        load_recipe(path)


def test_bad_values_and_overrides(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  patch_size: [32, 32]\n")
    with pytest.raises(RecipeError, match="patch_size has 2 sizes but the data is 3D"):
        load_recipe(path)
    recipe = load_recipe(path, overrides={"data.patch_size": [16, 16, 16], "train.max_steps": 7})
    assert recipe.train.max_steps == 7
    with pytest.raises(RecipeError, match="train.lr"):
        load_recipe(path, overrides={"data.patch_size": [16, 16, 16], "train.lr": -1})
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="no built-in recipe 'nope'"):
        builtin_recipe_path("nope")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
