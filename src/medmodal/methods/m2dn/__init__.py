"""M2DN as a method plug-in: one modality-masked diffusion model fills any subset of missing modalities.

Paper: *Multi-Modal Modality-Masked Diffusion Network for Brain MRI Synthesis With Random Modality Missing*,
IEEE TMI 2024 (IEEE Xplore 10444695); spec ``shared/methods/m2dn.md`` (no official code exists: every gap is a
labelled choice there). Parts:

* ``networks/m2dn.py``: the pure denoiser (per-modality stems, fusion U-Net with SE attention, timestep
  embedding, the missing-modality mask at the bottleneck);
* :mod:`.diffusion`: masked forward process, mask sampler, loss, DDPM/DDIM samplers with re-insertion, EMA;
* :mod:`.system`: training; :mod:`.data`: the intensity space; :mod:`.inference`: filling a batch;
* :mod:`.evaluate`: ``medmodal evaluate`` (PSNR/SSIM/MAE per missing scenario against zero and mean fill);
* :mod:`.synthesize`: ``medmodal synthesize`` (a complete data set in the input's layout);
* :mod:`.experiment`: ``medmodal experiment m2dn`` (seeds, the regression baseline, downstream segmentation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medmodal.data.case import CaseRecord, DatasetInfo
from medmodal.engine.plugin import MethodPlugin, Training, register_method
from medmodal.engine.recipe import Recipe
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.m2dn.config import VARIANTS, M2DNMethod

#: the denoiser the recipes name (``model.name``); its tiny variant too.
NETWORKS = ("m2dn_denoiser", "m2dn_denoiser_tiny")


def network_settings(recipe: Recipe, modalities: Sequence[str]) -> dict[str, Any]:
    """The denoiser's constructor arguments: the data's vocabulary, ``model.kwargs``, and what the method
    section fixes (``variant`` → ``mask_cond``; ``mode: regression`` → no timestep, mask at the input)."""
    from medmodal.engine.recipe import RecipeError

    m: M2DNMethod = recipe.method  # type: ignore[assignment]
    kw = dict(recipe.model.kwargs)
    clash = sorted({"spatial_dims", "modalities", "out_channels"} & set(kw))
    if clash:
        raise RecipeError(f"model.kwargs: {clash} are set from the data; remove them from the recipe")
    fixed: dict[str, Any] = {}
    if m.variant is not None:
        fixed["mask_cond"] = VARIANTS[m.variant][1]
    if m.mode == "regression":
        fixed.update(mask_cond="input_concat", time_embedding=False)
    for key, value in fixed.items():
        if key in kw and kw[key] != value:
            why = f"variant {m.variant}" if m.variant is not None and key == "mask_cond" else f"mode {m.mode}"
            raise RecipeError(f"model.kwargs.{key}: {why} sets it to {value!r}; remove {kw[key]!r} from the recipe")
    return {"spatial_dims": model_dims(recipe), "modalities": list(modalities), "out_channels": len(modalities),
            **kw, **fixed}


def model_dims(recipe: Recipe) -> int:
    """The denoiser's dimension: 2 for 3D data cut in one-voxel-thick patches (``data.patch_size [H, W, 1]``:
    axial slices of volumes, the paper's setting), else the data's."""
    dims = recipe.spatial_dims
    return 2 if dims == 3 and recipe.data.patch_size[-1] == 1 else dims


def diffusion_of(settings: dict[str, Any]) -> Any:
    """The :class:`~medmodal.methods.m2dn.diffusion.MaskedDiffusion` of a method section or recorded
    ``inference`` dict."""
    from medmodal.methods.m2dn.diffusion import MaskedDiffusion

    return MaskedDiffusion(timesteps=int(settings["timesteps"]), beta_schedule=settings["beta_schedule"],
                           beta_start=float(settings["beta_start"]), beta_end=float(settings["beta_end"]),
                           objective=settings["objective"])


class M2DNPlugin(MethodPlugin):
    name = "m2dn"
    config = M2DNMethod
    summary = "modality-masked diffusion synthesis of missing modalities"
    evaluation_metrics = {"psnr": (0.0, float("inf")), "ssim": (-1.0, 1.0), "mae": (0.0, 1.0)}
    evaluates_against = True
    honours_label_fraction = True  # its training cases come from the shared cache data module

    def check_recipe(self, recipe: Recipe) -> None:
        if recipe.model.name not in NETWORKS:
            raise ValueError(f"model.name: method m2dn trains the denoiser {NETWORKS[0]!r} (or {NETWORKS[1]!r}), "
                             f"not {recipe.model.name!r}")
        m: M2DNMethod = recipe.method  # type: ignore[assignment]
        mods = recipe.data.modalities
        if m.fixed_available and mods and set(m.fixed_available) - set(mods):
            raise ValueError(f"method.fixed_available: {sorted(set(m.fixed_available) - set(mods))} are not in "
                             f"data.modalities {mods}")

    # -- training -----------------------------------------------------------------------------------------
    def build(self, recipe: Recipe) -> Training:
        from medmodal.data.case import DataError
        from medmodal.data.formats import canonical_modality
        from medmodal.engine.cases import build_network, cache_data
        from medmodal.engine.datamodule import resolve_source
        from medmodal.engine.recipe import RecipeError
        from medmodal.engine.runinfo import TaskInfo
        from medmodal.methods.m2dn.data import UnitIntensityItems
        from medmodal.methods.m2dn.system import M2DNSystem

        m: M2DNMethod = recipe.method  # type: ignore[assignment]
        source = resolve_source(recipe.data)
        mods = tuple(source.modalities)
        if len(mods) < 2:
            raise DataError(f"M2DN synthesises modalities from others: the data has {list(mods)}; it needs at "
                            "least two modalities (data.modalities)")
        if m.incomplete_cases == "error" and (source.phantom is None or source.phantom.missing_rate > 0):
            # checked here, not only when a training step happens to draw an incomplete case
            lacking = [r.case_id for r in source.records()[1] if set(mods) - set(r.images)]
            if lacking:
                shown = ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else "")
                raise DataError(f"{len(lacking)} case(s) lack one of {list(mods)} ({shown}); M2DN trains on complete "
                                "cases: set method.incomplete_cases: mask to train on incomplete ones (beyond the "
                                "paper), or choose data.modalities every case has")
        data = cache_data(recipe, source, item_transform=UnitIntensityItems(percentiles=tuple(m.percentiles)))
        fixed = None
        if m.fixed_available:
            names = [canonical_modality(n) for n in m.fixed_available]
            unknown = sorted(set(names) - set(mods))
            if unknown:
                raise RecipeError(f"method.fixed_available: unknown modality(ies) {unknown}; the data has "
                                  f"{list(mods)}")
            fixed = [n in names for n in mods]
            if all(fixed):
                raise RecipeError("method.fixed_available: lists every modality; leave at least one to synthesise")
        kwargs = network_settings(recipe, mods)
        network = build_network(recipe.model.name, kwargs)
        t = recipe.train
        try:
            system = M2DNSystem(
                network=network, diffusion=diffusion_of(m.model_dump()), modalities=mods, mode=m.mode,
                loss_channels=m.loss_channels, fixed_available=fixed, curriculum=m.mask_dist == "curriculum",
                curriculum_fraction=m.curriculum_fraction, incomplete_cases=m.incomplete_cases,
                ema_decay=m.ema_decay, val_steps=m.val_steps, clip_x0=m.clip_x0, optimizer=t.optimizer, lr=t.lr,
                weight_decay=t.weight_decay, momentum=t.momentum, schedule=t.schedule, max_steps=t.max_steps,
                warmup_steps=t.warmup_steps, seed=recipe.seed, model_dims=model_dims(recipe),
            )
        except ValueError as err:
            raise RecipeError(f"method: {err}") from None
        from medmodal.engine.cases import PREPROCESSING

        preprocessing = {**PREPROCESSING, **source.preprocessing(),
                         "intensity": f"per case and modality, percentiles {m.percentiles[0]:g}-{m.percentiles[1]:g}"
                                      " of the foreground -> [0, 1] -> [-1, 1] (background -1)"}
        return Training(system=system, data=data, network_name=recipe.model.name, network_kwargs=kwargs,
                        task=TaskInfo(kind="synthesis"), modalities=mods, preprocessing=preprocessing,
                        inference=self.inference_settings(recipe))

    def inference_settings(self, recipe: Recipe) -> dict[str, Any]:
        m: M2DNMethod = recipe.method  # type: ignore[assignment]
        return {"mode": m.mode, "timesteps": m.timesteps, "beta_schedule": m.beta_schedule,
                "beta_start": m.beta_start, "beta_end": m.beta_end, "objective": m.objective, "sampler": m.sampler,
                "steps": m.sample_steps, "eta": m.eta, "clip": m.clip_x0, "seed": m.sample_seed,
                "percentiles": list(m.percentiles), "batch_size": 16, "model_dims": model_dims(recipe)}

    # -- inference ----------------------------------------------------------------------------------------
    def evaluate(self, run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, features: bool,
                 progress: bool, model_name: str | None = None, against: LoadedRun | None = None) -> Path:
        from medmodal.methods.m2dn.evaluate import evaluate_run

        if features:
            raise self.not_offered("evaluate --features")
        return evaluate_run(run, out_dir=out_dir, split=split, data=data, progress=progress, model_name=model_name,
                            against=against)

    def synthesize(self, run: LoadedRun, records: Sequence[CaseRecord], out_dir: Path, *, source: Path | None,
                   source_format: str, source_info: DatasetInfo | None, options: dict[str, Any], overwrite: bool,
                   progress: bool) -> Path:
        from medmodal.methods.m2dn.synthesize import synthesize_records

        return synthesize_records(run, records, out_dir, source=source, source_format=source_format,
                                  source_info=source_info, options=options, overwrite=overwrite, progress=progress)

    def add_commands(self, app: Any) -> None:
        from medmodal.methods.m2dn.commands import add_commands

        add_commands(app)

    def contract_recipe(self, spatial_dims: int) -> dict[str, Any]:
        from medmodal.engine.cases import tiny_case_recipe

        recipe = tiny_case_recipe(
            spatial_dims,
            method={"name": self.name, "timesteps": 20, "beta_schedule": "cosine", "sampler": "ddim", "sample_steps": 4,
                    "val_steps": 2,
                    "ema_decay": 0.9},
            model={"name": "m2dn_denoiser_tiny", "kwargs": {}},
        )
        recipe["train"]["lr"] = 1e-3
        return recipe


register_method(M2DNPlugin())
