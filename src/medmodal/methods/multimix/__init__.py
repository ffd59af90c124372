"""MultiMix as a method plug-in: semi-supervised classification and segmentation from few labels of each, many
unlabelled images and several sources, with a saliency bridge that also explains the classification.

Paper: A. Haque, A.-A.-Z. Imran, A. Wang, D. Terzopoulos, *MultiMix: Sparingly-Supervised, Extreme Multitask
Learning From Medical Images*, ISBI 2021 (journal version: MELBA 2021); spec ``shared/methods/multimix.md``.
Parts:

* ``networks/multimix.py``: the pure network (U-Net + classification branch + saliency bridge);
* ``losses/multimix.py``: FixMatch, the Bernoulli KL (and the released code's zero), Dice;
* ``transforms/views.py``: the weak and strong views;
* :mod:`.data`: images on one grid, splits, label budgets, the five streams; :mod:`.system`: training;
* :mod:`.selection`: which weights are used (best validation score by default);
* :mod:`.inference`, :mod:`.evaluate`, :mod:`.predict`: ``medmodal evaluate`` / ``predict``;
* :mod:`.experiment`: ``medmodal experiment multimix`` (budgets × the paper's baselines × seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medmodal.data.case import CaseRecord, DatasetInfo
from medmodal.engine.plugin import MethodPlugin, Training, register_method
from medmodal.engine.recipe import Recipe
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.multimix.config import MultiMixMethod

#: the networks a MultiMix recipe may name (``model.name``).
NETWORKS = ("multimix_unet", "multimix_unet_tiny")


def task_regions(method: MultiMixMethod, info: DatasetInfo) -> dict[str, tuple[int, ...]]:
    """The regions the model segments (``method.regions`` of the data's, default all; none for a variant that
    does not segment)."""
    from medmodal.engine.recipe import RecipeError

    if not method.tasks[1]:
        return {}
    names = method.regions or list(info.regions)
    unknown = [n for n in names if n not in info.regions]
    if unknown:
        raise RecipeError(f"method.regions: unknown region(s) {unknown}; the data set has {list(info.regions)}")
    return {n: tuple(info.regions[n]) for n in names}


def class_names_of(info: DatasetInfo, records: Sequence[CaseRecord]) -> list[str]:
    """The data set's class names, or ``"0" … "K-1"`` from its largest class index (at least two classes)."""
    if info.class_names:
        return list(info.class_names)
    top = max((r.target for r in records if r.target is not None), default=1)
    return [str(c) for c in range(max(2, int(top) + 1))]


def network_settings(recipe: Recipe, modalities: Sequence[str], *, regions: int, classes: int) -> dict[str, Any]:
    """The network's constructor arguments: the data's vocabulary, ``model.kwargs``, and what the variant fixes."""
    from medmodal.engine.recipe import ModelConfig, RecipeError

    m: MultiMixMethod = recipe.method  # type: ignore[assignment]
    kw = dict(recipe.model.kwargs)
    if kw == ModelConfig.model_fields["kwargs"].default:  # the generic default (a unet's widths) is not a choice
        kw = {}
    fixed = {"classify", "segment", "saliency_bridge", "restore_mode_after_saliency", "saliency_impl"}
    clash = sorted(({"spatial_dims", "modalities", "out_channels", "num_classes"} | fixed) & set(kw))
    if clash:
        raise RecipeError(f"model.kwargs: {clash} are set from the data and method.variant / "
                          "method.eval_mode_after_saliency; remove them from the recipe")
    classify, segment, _, bridge = m.tasks
    return {"spatial_dims": len(m.image_size), "modalities": list(modalities), "out_channels": max(1, regions),
            "num_classes": classes, "classify": classify, "segment": segment, "saliency_bridge": bridge,
            "restore_mode_after_saliency": m.eval_mode_after_saliency == "restore", "saliency_impl": m.saliency_impl,
            **kw}


class MultiMixPlugin(MethodPlugin):
    name = "multimix"
    config = MultiMixMethod
    summary = "semi-supervised joint classification + segmentation with a saliency bridge"
    evaluation_metrics = {"dice": (0.0, 1.0), "correct": (0.0, 1.0)}

    def check_recipe(self, recipe: Recipe) -> None:
        if recipe.model.name not in NETWORKS:
            raise ValueError(f"model.name: method multimix trains {NETWORKS[0]!r} (or {NETWORKS[1]!r}), not "
                             f"{recipe.model.name!r}")
        m: MultiMixMethod = recipe.method  # type: ignore[assignment]
        if len(m.image_size) != recipe.spatial_dims:
            raise ValueError(f"method.image_size {m.image_size} is {len(m.image_size)}D but the data is "
                             f"{recipe.spatial_dims}D (for data on disk data.patch_size sets it: MultiMix trains on "
                             "whole images, so give data.patch_size the image_size)")
        if m.saliency_impl == "backward" and recipe.world_size > 1:
            raise ValueError("method.saliency_impl: backward (the released code's extra backward + zero_grad) "
                             "fires the gradient all-reduce of multi-process training; use autograd_grad with "
                             "train.devices > 1")

    # -- training -----------------------------------------------------------------------------------------
    def build(self, recipe: Recipe) -> Training:
        from medmodal.engine.cases import PREPROCESSING, build_network
        from medmodal.engine.datamodule import resolve_source
        from medmodal.engine.distributed import per_rank_batch
        from medmodal.engine.recipe import RecipeError
        from medmodal.engine.runinfo import TaskInfo
        from medmodal.methods.multimix.data import MultiMixData
        from medmodal.methods.multimix.selection import SelectedWeights
        from medmodal.methods.multimix.system import MultiMixSystem

        m: MultiMixMethod = recipe.method  # type: ignore[assignment]
        try:
            per_rank_batch(recipe.data.batch_size, recipe.world_size)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        source = resolve_source(recipe.data)
        info, records = source.records()
        regions = task_regions(m, info)
        classes = class_names_of(info, records)
        classify, segment, ssl, _ = m.tasks
        kwargs = network_settings(recipe, source.modalities, regions=len(regions), classes=len(classes))
        network = build_network(recipe.model.name, kwargs)
        d, t = recipe.data, recipe.train
        data = MultiMixData(
            records_fn=source.records, modalities=source.modalities, regions=regions, image_size=m.image_size,
            percentiles=m.percentiles, cache_dir=source.cache_dir, batch_size=d.batch_size,
            steps_per_epoch=min(t.val_every_steps, t.max_steps), val_fraction=d.val_fraction,
            test_fraction=m.test_fraction, cross_sources=m.cross_sources, seg_labels=m.seg_labels,
            cls_labels=m.cls_labels, segment=segment, classify=classify, semi_supervised=ssl,
            reshuffle=m.reshuffle_streams, seg_augment=m.seg_augment == "weak", num_workers=d.num_workers,
            seed=recipe.seed, progress=t.progress)
        try:
            system = MultiMixSystem(
                network=network, classify=classify, segment=segment, semi_supervised=ssl,
                weight_cls=m.weight_cls, weight_dice=m.weight_dice, weight_fixmatch=m.weight_fixmatch,
                weight_kl=m.weight_kl, tau=m.tau, fixmatch_norm=m.fixmatch_norm, seg_kl=m.seg_kl,
                input_scaling=m.input_scaling, optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                momentum=t.momentum, warmup_steps=t.warmup_steps, max_steps=t.max_steps, lr_decay=m.lr_decay,
                lr_step_epochs=m.lr_step_epochs, lr_gamma=m.lr_gamma, channels_last=t.channels_last,
                seed=recipe.seed)
        except ValueError as err:
            raise RecipeError(f"method: {err}") from None
        task = TaskInfo(kind="multitask", regions={k: list(v) for k, v in regions.items()},
                        label_names={int(v): str(v) for v in info.labels}, class_names=classes)
        preprocessing = {**PREPROCESSING, **source.preprocessing(), "target_spacing": None,
                         "intensity": f"per image and modality, percentiles {m.percentiles[0]:g}-{m.percentiles[1]:g} "
                                      "-> [0, 1] -> [-1, 1]",
                         "resize": f"every image resized to {m.image_size} in its stored axis order; predictions "
                                   "resized back to the input's grid"}
        return Training(system=system, data=data, network_name=recipe.model.name, network_kwargs=kwargs, task=task,
                        modalities=tuple(source.modalities), preprocessing=preprocessing,
                        inference=self.inference_settings(recipe),
                        callbacks=[SelectedWeights(rule=m.model_selection, name=recipe.model.name, kwargs=kwargs)])

    def inference_settings(self, recipe: Recipe) -> dict[str, Any]:
        m: MultiMixMethod = recipe.method  # type: ignore[assignment]
        return {"image_size": list(m.image_size), "percentiles": list(m.percentiles),
                "input_scaling": m.input_scaling, "model_selection": m.model_selection, "variant": m.variant,
                "batch_size": 16, "channels_last": recipe.train.channels_last}

    # -- inference ----------------------------------------------------------------------------------------
    def evaluate(self, run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, features: bool,
                 progress: bool, model_name: str | None = None) -> Path:
        from medmodal.methods.multimix.evaluate import evaluate_run

        if features:
            raise self.not_offered("evaluate --features")
        return evaluate_run(run, out_dir=out_dir, split=split, data=data, progress=progress, model_name=model_name)

    def predict(self, run: LoadedRun, records: Sequence[CaseRecord], out_dir: Path, *, overwrite: bool,
                progress: bool) -> list[Path]:
        from medmodal.methods.multimix.predict import predict_records

        return predict_records(run, records, out_dir, overwrite=overwrite, progress=progress)

    def add_commands(self, app: Any) -> None:
        from medmodal.methods.multimix.commands import add_commands

        add_commands(app)

    def contract_recipe(self, spatial_dims: int) -> dict[str, Any]:
        from medmodal.engine.cases import tiny_case_recipe

        size = [16, 16, 16] if spatial_dims == 3 else [32, 32]
        recipe = tiny_case_recipe(spatial_dims, method={"name": self.name, "image_size": size, "test_fraction": 0.2},
                                  model={"name": "multimix_unet_tiny", "kwargs": {}})
        recipe["data"].update(patch_size=size, val_fraction=0.2)
        recipe["data"]["phantom"]["cases"] = 10
        recipe["train"]["lr"] = 1e-3
        return recipe


register_method(MultiMixPlugin())
