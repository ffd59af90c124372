"""The generic base of methods that train on cached multi-modal cases (patches for segmentation, whole images
for classification), evaluate under every modality subset and predict from whichever modalities a case has.

A plug-in of this family subclasses :class:`CasesPlugin` and implements :meth:`CasesPlugin.make_system` (and
:meth:`CasesPlugin.is_classification` when it can classify); data, network construction, the run description,
evaluation and prediction come from here. Nothing here names a method.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from medmodal.data.case import CaseRecord, DataError, DatasetInfo
from medmodal.engine.datamodule import CacheDataModule, DataSource, prepare_cache, resolve_source
from medmodal.engine.distributed import per_rank_batch
from medmodal.engine.plugin import MethodPlugin, Training
from medmodal.engine.recipe import Recipe, RecipeError
from medmodal.engine.run import RunError
from medmodal.engine.runinfo import LoadedRun, TaskInfo

log = logging.getLogger("medmodal")

PREPROCESSING = {"orientation": "closest RAS", "crop": "non-zero region of the available modalities",
                 "normalisation": "per-modality z-score over the foreground"}


def network_kwargs(recipe: Recipe, modalities: Sequence[str], *, out_channels: int,
                   classification: bool = False) -> dict[str, Any]:
    """Constructor arguments of the recipe's network: the shared vocabulary plus ``model.kwargs``."""
    shared = {"spatial_dims": recipe.spatial_dims, "modalities": list(modalities), "out_channels": out_channels}
    clash = sorted(set(shared) & set(recipe.model.kwargs))
    if clash:
        raise RecipeError(f"model.kwargs: {clash} are set from the data; remove them from the recipe")
    kw = recipe.model.kwargs
    if classification and int(kw.get("num_classes", 0)) < 2:
        raise RecipeError("model.kwargs.num_classes: a classification task needs num_classes >= 2")
    if classification and _norm(recipe.model.name, kw) == "instance" and kw.get("cls_pool", "avg") == "avg":
        log.warning(
            "model.kwargs: classification with instance norm and an average-pooled head sees only the shape of "
            "each feature's distribution (instance norm removes every sample's mean); on the phantom it learns a "
            "constant class. Set model.kwargs.norm=batch or model.kwargs.cls_pool=avgmax."
        )
    return {**shared, **kw}


def _norm(name: str, kwargs: dict[str, Any]) -> Any:
    """The normalisation a network of ``name`` gets (``kwargs["norm"]`` or its factory's default; ``None`` when it
    has no such argument)."""
    from medmodal.networks.registry import network_argument_default

    if "norm" in kwargs:
        return kwargs["norm"]
    try:
        return network_argument_default(name, "norm")
    except KeyError:
        return None


def build_network(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``create_network(name, **kwargs)`` with construction errors reported as recipe errors."""
    from medmodal.networks.registry import create_network

    try:
        return create_network(name, **kwargs)
    except (KeyError, TypeError, ValueError) as err:
        raise RecipeError(f"model: {err}") from None


def run_source(run: LoadedRun, data: Path | None) -> DataSource:
    """Where ``run`` is evaluated: ``data`` (any labelled data set with the run's modalities) or the run's own
    training data, which must still exist."""
    cfg = run.recipe.data
    if data is not None:
        cfg = cfg.model_copy(update={"path": Path(data), "format": "auto", "cache_dir": None,
                                     "modalities": list(run.info.modalities)})
    elif cfg.path is not None and not cfg.path.exists():
        raise DataError(f"data.path: {cfg.path}, the data set {run.dir} was trained on, no longer exists; "
                        "evaluate on another labelled data set with --data DIR")
    return resolve_source(cfg)


def cache_data(recipe: Recipe, source: DataSource, *, item_transform: Any = None) -> CacheDataModule:
    """The data module of the recipe's ``data`` and ``train`` sections over ``source`` (patches of the cached
    training cases, whole validation cases); ``item_transform``: see :class:`CacheDataModule`. A global batch
    that the processes cannot share evenly is a :class:`RecipeError`."""
    try:
        per_rank_batch(recipe.data.batch_size, recipe.world_size)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    d, t = recipe.data, recipe.train
    return CacheDataModule(
        source=source, patch_size=tuple(d.patch_size), batch_size=d.batch_size,
        steps_per_epoch=min(t.val_every_steps, t.max_steps), foreground_fraction=d.foreground_fraction,
        num_workers=d.num_workers, val_fraction=d.val_fraction, label_fraction=d.label_fraction, seed=recipe.seed,
        progress=t.progress,
        augmentation=d.augmentation, item_transform=item_transform,
    )


def evaluation_cases(run: LoadedRun, *, split: str, data: Path | None, progress: bool) -> tuple[list, str, bool]:
    """The cached cases ``evaluate`` scores: the run's ``split`` (``"val"``; ``"all"``: every case of its data) or
    every case of ``data``, at most ``eval.max_cases``; with a description of them and whether the data is
    synthetic."""
    source = run_source(run, data)
    index = prepare_cache(source, progress=progress)
    if data is not None or split == "all":
        cases = list(index.cases)
        where = f"all cases of {data}" if data is not None else "all cases of the training data"
    else:
        cases = list(index.subset(run.split(split)).cases)
        where = f"{split} (local held-out cases of the run, not an online benchmark)"
    if run.recipe.eval.max_cases is not None:
        cases = cases[: run.recipe.eval.max_cases]
    return cases, where, bool(source.info.synthetic)


def tiny_case_recipe(spatial_dims: int, *, method: dict[str, Any], model: dict[str, Any] | None = None,
                     **data: Any) -> dict[str, Any]:
    """A recipe on 6 tiny phantom cases (17×18×19 voxels, or 33×34 slices) that trains in seconds."""
    return {
        "name": f"contract_{method['name']}_{spatial_dims}d",
        "data": {"phantom": {"cases": 6, "spatial_dims": spatial_dims,
                             "size": [17, 18, 19] if spatial_dims == 3 else [33, 34], "seed": 1},
                 "patch_size": [16, 16, 16] if spatial_dims == 3 else [24, 24], "batch_size": 2,
                 "val_fraction": 0.34, "num_workers": 0, **data},
        "model": model or {"name": "unet", "kwargs": {"channels": [4, 8]}},
        "method": method,
        "train": {"max_steps": 3, "val_every_steps": 3, "checkpoint_every_steps": 1, "progress": False,
                  "accelerator": "cpu", "threads": 1},
        "eval": {"overlap": 0.0, "sw_batch_size": 1},
    }


class CasesPlugin(MethodPlugin):
    """Base plug-in for methods trained on the cached cases of ``data`` (see the module docstring)."""

    honours_label_fraction = True

    def is_classification(self, recipe: Recipe) -> bool:
        """True when the recipe trains a classifier (whole-image class targets) instead of a segmenter."""
        return False

    def make_system(self, recipe: Recipe, network: nn.Module, task: TaskInfo, common: dict[str, Any]
                    ) -> L.LightningModule:
        """The method's training system around ``network``; ``common`` holds the shared optimisation and
        validation arguments: ``regions, roi_size, optimizer, lr, weight_decay, momentum, schedule, max_steps,
        warmup_steps, overlap, sw_batch_size, blend, seed, channels_last``."""
        raise NotImplementedError

    def task_info(self, recipe: Recipe, info: DatasetInfo) -> TaskInfo:
        if self.is_classification(recipe):
            n = int(recipe.model.kwargs.get("num_classes", 0))
            names = list(info.class_names) if getattr(info, "class_names", None) else [str(c) for c in range(n)]
            return TaskInfo(kind="classification", class_names=names)
        return TaskInfo(kind="regions", regions={k: list(v) for k, v in info.regions.items()},
                        label_names={int(v): str(v) for v in info.labels})

    # -- training -----------------------------------------------------------------------------------------
    def build(self, recipe: Recipe) -> Training:
        source = resolve_source(recipe.data)
        task = self.task_info(recipe, source.info)
        data = cache_data(recipe, source)
        kwargs = network_kwargs(recipe, source.modalities, out_channels=task.out_channels,
                                classification=task.kind == "classification")
        network = build_network(recipe.model.name, kwargs)
        t = recipe.train
        common = dict(
            regions=dict(source.info.regions), roi_size=recipe.eval_roi_size, optimizer=t.optimizer, lr=t.lr,
            weight_decay=t.weight_decay, momentum=t.momentum, schedule=t.schedule, max_steps=t.max_steps,
            warmup_steps=t.warmup_steps, overlap=recipe.eval.overlap, sw_batch_size=recipe.eval.sw_batch_size,
            blend=recipe.eval.blend, seed=recipe.seed, channels_last=t.channels_last,
        )
        try:
            system = self.make_system(recipe, network, task, common)
        except ValueError as err:
            raise RecipeError(f"method: {err}") from None
        return Training(
            system=system, data=data, network_name=recipe.model.name, network_kwargs=kwargs, task=task,
            modalities=tuple(source.modalities),
            preprocessing={**PREPROCESSING, **source.preprocessing()},
            inference=self.inference_settings(recipe),
        )

    def inference_settings(self, recipe: Recipe) -> dict[str, Any]:
        """Sliding-window settings (and post-processing) that ``evaluate`` and ``predict`` use."""
        return {"roi_size": list(recipe.eval_roi_size), "overlap": recipe.eval.overlap, "blend": recipe.eval.blend,
                "sw_batch_size": recipe.eval.sw_batch_size, "channels_last": recipe.train.channels_last,
                "et_min_voxels": recipe.eval.et_min_voxels}

    # -- evaluation ---------------------------------------------------------------------------------------
    def default_subsets(self, run: LoadedRun) -> list[tuple[str, ...]] | None:
        """The modality subsets evaluated by default (``None``: every non-empty subset)."""
        return None

    def postprocess(self, run: LoadedRun) -> tuple[Any, str | None]:
        """``(function (K, R, *S) bool → same, description)`` applied to region predictions, or ``(None, None)``.

        The default applies ``eval.et_min_voxels`` (a predicted ``ET`` region smaller than that becomes
        necrosis, the ShaSpec* rule of the BraTS challenge entries) when the task has an ``ET`` region.
        """
        from functools import partial

        from medmodal.transforms import drop_small_region

        n = run.info.inference.get("et_min_voxels")
        regions = list(run.info.task.regions)
        if not n or "ET" not in regions:
            return None, None
        return (partial(drop_small_region, channel=regions.index("ET"), min_voxels=int(n)),
                f"post-processing: a predicted ET under {n} voxels becomes necrosis")

    def feature_picture(self, run: LoadedRun, network: nn.Module, cases: Sequence, out_dir: Path) -> None:
        """Write a feature picture (``evaluate --features``) if the method has one."""
        raise self.not_offered("evaluate --features")

    def evaluation_rows(self, run: LoadedRun, *, split: str = "val", data: Path | None = None,
                        progress: bool = False, model_name: str | None = None) -> tuple[list, list[str], bool, list]:
        """Per-case rows of ``run`` on ``split`` (or every case of ``data``): :class:`SubsetResult` for region
        segmentation, :class:`ClassificationResult` for classification. Also returns the report's detail lines,
        whether the data is synthetic, and the evaluated cached cases."""
        from medmodal.evaluation.classification import evaluate_classification
        from medmodal.evaluation.inference import recorded_settings
        from medmodal.evaluation.subsets import evaluate_subsets

        network = run.network()
        cases, where, synthetic = evaluation_cases(run, split=split, data=data, progress=progress)
        modalities = tuple(run.info.modalities)  # the channels the model reads (run_source selects them)
        name = model_name or run.recipe.model.name
        subsets = self.default_subsets(run)
        details = [f"run: `{run.dir}` (method {run.info.method})", f"cases: {where}"]
        task, inf = run.info.task, run.info.inference
        if task.kind == "classification":
            rows: list = evaluate_classification(network, cases, modalities=modalities, subsets=subsets,
                                                 model_name=name)
            if not rows:
                raise RunError(f"no case with a class target to evaluate ({where}) for {run.dir}")
        else:
            post, what = self.postprocess(run)
            if what:
                details.append(what)
            window = recorded_settings(inf, task_kind=task.kind)
            details.append(f"sliding windows: {window['roi_size']}, overlap {window['overlap']:.3g}, "
                           f"blend {window['blend']}")
            rows = evaluate_subsets(
                network, cases, modalities=modalities, regions={k: tuple(v) for k, v in task.regions.items()},
                roi_size=window["roi_size"], overlap=window["overlap"], blend=window["blend"],
                sw_batch_size=window["sw_batch_size"], channels_last=window["channels_last"], subsets=subsets,
                model_name=name, progress=progress, postprocess=post,
            )
            if not rows:
                raise RunError(f"no labelled case to evaluate ({where}) for {run.dir}")
        return rows, details, synthetic, cases

    def evaluate(self, run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, features: bool,
                 progress: bool, model_name: str | None = None) -> Path:
        from medmodal.engine.evaluate import write_classification, write_evaluation

        if features and type(self).feature_picture is CasesPlugin.feature_picture:
            raise self.not_offered("evaluate --features")
        rows, details, synthetic, cases = self.evaluation_rows(run, split=split, data=data, progress=progress,
                                                               model_name=model_name)
        if run.info.task.kind == "classification":
            report = write_classification(rows, out_dir, title=f"{run.recipe.name}: accuracy per modality subset",
                                          synthetic=synthetic, details=details)
        else:
            report = write_evaluation(rows, out_dir, title=f"{run.recipe.name}: Dice per modality subset",
                                      synthetic=synthetic, details=details)
        if features:
            self.feature_picture(run, run.network(), cases, out_dir)
        return report

    # -- prediction ---------------------------------------------------------------------------------------
    def predict(self, run: LoadedRun, records: Sequence[CaseRecord], out_dir: Path, *, overwrite: bool,
                progress: bool) -> list[Path]:
        from medmodal.engine.predict import predict_cases

        post, _ = self.postprocess(run)
        return predict_cases(run, records, out_dir, overwrite=overwrite, progress=progress, postprocess=post)
