"""The zero-fill baseline as a method plug-in: a multi-modal U-Net whose missing modalities are zero channels,
trained with random modality dropout (:class:`~medmodal.methods.zero_fill.system.SegmentationSystem`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from medmodal.engine.cases import CasesPlugin, tiny_case_recipe
from medmodal.engine.plugin import register_method
from medmodal.engine.recipe import Recipe
from medmodal.engine.runinfo import TaskInfo
from medmodal.methods.zero_fill.config import ZeroFillMethod


class ZeroFillPlugin(CasesPlugin):
    name = "zero_fill"
    config = ZeroFillMethod
    summary = "zero-fill network with modality dropout (segmentation or classification)"
    default = True

    def make_system(self, recipe: Recipe, network: nn.Module, task: TaskInfo, common: dict[str, Any]) -> Any:
        from medmodal.methods.zero_fill.system import SegmentationSystem

        m = recipe.method
        return SegmentationSystem(network=network, modality_dropout=m.modality_dropout, task=m.task,
                                  **m.loss_kwargs(), **common)

    def is_classification(self, recipe: Recipe) -> bool:
        return recipe.method.task == "classification"

    def contract_recipe(self, spatial_dims: int) -> dict[str, Any]:
        return tiny_case_recipe(spatial_dims, method={"name": self.name})


register_method(ZeroFillPlugin())
