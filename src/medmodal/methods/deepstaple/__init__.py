"""DeepSTAPLE (Weihsbach, Bigalke, Kruse, Hempe, Heinrich, *DeepSTAPLE: Learning to Predict Multimodal
Registration Quality for Unsupervised Domain Adaptation*, WBIR 2022) as a method plug-in.

A segmentation network learns from several candidate (e.g. atlas-registered) labels per target while one data
parameter θ per label learns that label's quality; the θ-weighted consensus fuses each target's labels.
Modules: :mod:`~medmodal.methods.deepstaple.config` (recipe section), :mod:`~medmodal.methods.deepstaple.labels`
(candidate labels, data module, θ export, consensus), :mod:`~medmodal.methods.deepstaple.system` (training),
:mod:`~medmodal.methods.deepstaple.experiments` (``medmodal experiment deepstaple``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from medmodal.data.case import CaseRecord
from medmodal.engine.plugin import MethodPlugin, Training, register_method
from medmodal.engine.recipe import Recipe
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.deepstaple.config import CandidateLabelsConfig, DeepStapleMethod, LabelNoiseConfig

__all__ = ["CandidateLabelsConfig", "DeepStapleMethod", "DeepStaplePlugin", "LabelNoiseConfig"]


class DeepStaplePlugin(MethodPlugin):
    name = "deepstaple"
    config = DeepStapleMethod
    summary = "DeepSTAPLE data-parameter label fusion"

    def check_recipe(self, recipe: Recipe) -> None:
        m = recipe.method
        if m.candidates is None:
            raise ValueError("method.candidates: DeepSTAPLE needs candidate labels: set method.candidates.manifest "
                             "(registered labels) or method.candidates.noise (synthetic labels)")
        if m.candidates.manifest is not None and recipe.data.path is None:
            raise ValueError("data.path: a registration manifest needs the target data set it was registered onto")
        if recipe.train.warmup_steps:
            raise ValueError("train.warmup_steps: DeepSTAPLE uses the paper's step decay (method.lr_decay); "
                             "remove it")
        if recipe.train.gradient_clip_norm is not None:
            raise ValueError("train.gradient_clip_norm: DeepSTAPLE steps its optimisers itself (out-of-line "
                             "update); gradient clipping is not offered")

    def build(self, recipe: Recipe) -> Training:
        from medmodal.methods.deepstaple.labels import build_deepstaple

        return build_deepstaple(recipe)

    def evaluate(self, run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, features: bool,
                 progress: bool, model_name: str | None = None) -> Path:
        from medmodal.methods.deepstaple.evaluate import evaluate_deepstaple

        if features:
            raise self.not_offered("evaluate --features")
        if data is not None:
            raise self.not_offered("evaluate --data (it evaluates the run's own validation targets)")
        return evaluate_deepstaple(run, out_dir, split=split, progress=progress)

    def predict(self, run: LoadedRun, records: Sequence[CaseRecord], out_dir: Path, *, overwrite: bool,
                progress: bool) -> list[Path]:
        from medmodal.engine.predict import predict_cases

        return predict_cases(run, records, out_dir, overwrite=overwrite, progress=progress)

    def fuse(self, run: LoadedRun, out_dir: Path, *, overwrite: bool) -> list[Path]:
        from medmodal.methods.deepstaple.labels import write_dp_consensus

        return write_dp_consensus(run.dir, out_dir, overwrite=overwrite)

    def add_commands(self, app: typer.Typer) -> None:
        from medmodal.methods.deepstaple.commands import add_commands

        add_commands(app)

    def contract_recipe(self, spatial_dims: int) -> dict[str, Any]:
        size = [17, 18, 19] if spatial_dims == 3 else [33, 34]
        return {
            "name": f"contract_deepstaple_{spatial_dims}d",
            "data": {"phantom": {"cases": 4, "spatial_dims": spatial_dims, "size": size, "seed": 1},
                     "modalities": ["t2"], "patch_size": [16, 16, 16] if spatial_dims == 3 else [24, 24],
                     "batch_size": 2, "val_fraction": 0.25, "num_workers": 0},
            "model": {"name": "unet", "kwargs": {"channels": [4, 8]}},
            "method": {"name": "deepstaple", "candidates": {"noise": {"labels_per_target": 2, "seed": 0}}},
            # one epoch = 6 training labels / batch 2 = 3 steps; DeepSTAPLE validates once per epoch
            "train": {"max_steps": 3, "val_every_steps": 3, "checkpoint_every_steps": 1, "progress": False,
                      "accelerator": "cpu", "threads": 1},
            "eval": {"overlap": 0.0, "sw_batch_size": 1},
        }


register_method(DeepStaplePlugin())
