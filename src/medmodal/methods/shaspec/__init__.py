"""ShaSpec (Wang et al., *Multi-modal Learning with Missing Modality via Shared-Specific Feature Modelling*,
CVPR 2023) as a method plug-in: one network that segments or classifies from any subset of modalities.

The pure network is :mod:`medmodal.networks.shaspec`; the losses :mod:`medmodal.losses.shaspec`; the training
system :mod:`medmodal.methods.shaspec.system`; the main job (ShaSpec vs the zero-fill baseline)
:mod:`medmodal.methods.shaspec.quickstart`, exposed as ``medmodal quickstart``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from torch import nn

from medmodal.engine.cases import CasesPlugin, tiny_case_recipe
from medmodal.engine.plugin import register_method
from medmodal.engine.recipe import Recipe
from medmodal.engine.runinfo import LoadedRun, TaskInfo
from medmodal.methods.shaspec.config import ShaSpecMethod, ShaSpecPhase
from medmodal.methods.shaspec.features import write_feature_picture

__all__ = ["ShaSpecMethod", "ShaSpecPhase", "ShaSpecPlugin", "write_feature_picture"]

log = logging.getLogger("medmodal")


class ShaSpecPlugin(CasesPlugin):
    name = "shaspec"
    config = ShaSpecMethod
    summary = "ShaSpec shared + specific feature model"

    def check_recipe(self, recipe: Recipe) -> None:
        phases = recipe.method.phases
        if phases and sum(p.steps for p in phases) != recipe.train.max_steps:
            total = " + ".join(str(p.steps) for p in phases)
            raise ValueError(f"method.phases last {total} steps but train.max_steps is {recipe.train.max_steps}")

    def ddp_find_unused_parameters(self, recipe: Recipe) -> bool:
        # the specific encoder of a modality missing from every sample of a rank's batch gets no gradient
        return True

    def is_classification(self, recipe: Recipe) -> bool:
        return recipe.method.task == "classification"

    def make_system(self, recipe: Recipe, network: nn.Module, task: TaskInfo, common: dict[str, Any]) -> Any:
        from medmodal.methods.shaspec.system import ShaSpecSystem

        m = recipe.method
        return ShaSpecSystem(
            network=network, task=m.task, alpha=m.alpha, beta=m.beta, dao_form=m.dao_form, dao_pairs=m.dao_pairs,
            aux_on_missing=m.aux_on_missing, subset_sampler=m.subset_sampler, sample_per=m.sample_per,
            dedicated=m.dedicated, phases=[(p.steps, p.sampler) for p in m.phases or []],
            phase_schedule=m.phase_schedule, **m.loss_kwargs(), **common,
        )

    def default_subsets(self, run: LoadedRun) -> list[tuple[str, ...]] | None:
        m = run.recipe.method
        if m.dedicated:
            return [tuple(x for x in run.info.modalities if x in m.dedicated)]
        if m.phases and all(p.sampler == "full" for p in m.phases):
            log.warning(
                "this run was trained with all modalities only; expect poor results on subsets "
                "(the 'only white dots' of billhhh/ShaSpec#2) — add a random-subset phase"
            )
        return None

    def feature_picture(self, run: LoadedRun, network: nn.Module, cases: Sequence, out_dir: Path) -> None:
        write_feature_picture(network, cases, out_dir, modalities=run.info.modalities,
                              roi_size=run.info.inference["roi_size"], title=f"{run.recipe.name}: ShaSpec features")

    def add_commands(self, app: typer.Typer) -> None:
        from medmodal.methods.shaspec.commands import add_commands

        add_commands(app)

    def contract_recipe(self, spatial_dims: int) -> dict[str, Any]:
        return tiny_case_recipe(spatial_dims, method={"name": self.name, "alpha": 0.1, "beta": 0.02},
                                model={"name": "shaspec", "kwargs": {"channels": [4, 8]}})


register_method(ShaSpecPlugin())
