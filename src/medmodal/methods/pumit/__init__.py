"""PUMIT as a method plug-in (work in progress): a spatially adaptive tokenizer pretrained on unlabelled 2D and 3D
images of any spacing together.

Paper: L. Luo, X. Chen, B. Tang, et al., *Pre-trained Universal Medical Image Transformer*, arXiv 2312.07630; spec
``shared/methods/pumit.md``. Parts:

* ``layers/sac.py``: spatially adaptive convolutions; ``networks/pumit_tokenizer.py`` and ``networks/pumit_vit.py``;
  ``losses/pumit_prior.py``, ``losses/pumit_tokenizer.py``, ``losses/pumit.py``;
* ``data/collections.py`` (+ cache and sampler): image collections cropped to whole tokens;
* :mod:`.data`: the recipe's data set as a collection; :mod:`.system`: the tokenizer stage; :mod:`.evaluate`.

Trained so far: the tokenizer stage (``method.stage: tokenizer``). The masked-image-modelling stage, ``medmodal
pretrain`` and fine-tuning with ``--from`` follow (issue 14).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medmodal.engine.plugin import MethodPlugin, PretrainRequest, Training, register_method
from medmodal.engine.recipe import Recipe
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.pumit.config import PUMITMethod

#: the networks of the two stages (``model.name``).
TOKENIZER = "pumit_tokenizer"
VIT = "pumit_vit"


class PUMITPlugin(MethodPlugin):
    name = "pumit"
    config = PUMITMethod
    summary = "PUMIT spatially adaptive tokenizer pretraining on 2D/3D images of any spacing (tokenizer stage)"
    evaluation_metrics = {"l1": (0.0, 2.0), "code_usage": (0.0, 1.0)}
    default_pretraining = True

    def check_recipe(self, recipe: Recipe) -> None:
        m: PUMITMethod = recipe.method  # type: ignore[assignment]
        want = TOKENIZER if m.stage == "tokenizer" else VIT
        if recipe.model.name != want:
            raise ValueError(f"model.name: the PUMIT {m.stage} stage trains {want!r}, not {recipe.model.name!r}")

    def build(self, recipe: Recipe) -> Training:
        from medmodal.data.case import DataError
        from medmodal.engine.cases import build_network
        from medmodal.engine.distributed import per_rank_batch
        from medmodal.engine.images import image_source
        from medmodal.engine.recipe import RecipeError
        from medmodal.engine.runinfo import TaskInfo
        from medmodal.methods.pumit.data import CollectionData
        from medmodal.methods.pumit.system import PUMITMIMSystem, PUMITTokenizerSystem, gan_kwargs, mask_layer_ids

        m: PUMITMethod = recipe.method  # type: ignore[assignment]
        try:
            per_rank_batch(recipe.data.batch_size, recipe.world_size)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        kw = dict(recipe.model.kwargs)
        fixed = {"in_channels"} if m.stage == "tokenizer" else {"in_channels", "codebook_size", "patch_size"}
        clash = sorted(fixed & set(kw))
        if clash:
            raise RecipeError(f"model.kwargs: {clash} are set by the method (method.channels; for mim the tokenizer "
                              "run's codebook size and stride); remove them")
        d, t = recipe.data, recipe.train
        optim = {"optimizer": t.optimizer, "lr": t.lr, "weight_decay": t.weight_decay, "momentum": t.momentum,
                 "schedule": t.schedule, "max_steps": t.max_steps, "warmup_steps": t.warmup_steps,
                 "seed": recipe.seed}
        if m.stage == "tokenizer":
            kwargs = {"in_channels": m.channels, **kw}
            network = build_network(TOKENIZER, kwargs)
            stride = network.stride
            try:  # the optional discriminator (method.gan); {} when off
                gan = gan_kwargs(m, network)
            except ValueError as err:
                raise RecipeError(str(err)) from None
            system: Any = PUMITTokenizerSystem(network=network, weight_quant=m.weight_quant,
                                               weight_ent=m.weight_ent, **optim, **gan)
        else:
            tokenizer = self._tokenizer(m)
            stride = tokenizer.stride
            if tokenizer.in_channels != m.channels:
                raise RecipeError(f"method.channels {m.channels}: the tokenizer run {m.tokenizer_run} takes "
                                  f"{tokenizer.in_channels} channel(s); use the same")
            kwargs = {"in_channels": m.channels, "codebook_size": tokenizer.quantizer.num_codes, "patch_size": stride,
                      **kw}
            network = build_network(VIT, kwargs)
            system = PUMITMIMSystem(network=network, tokenizer=tokenizer, mask_ratio=m.mask_ratio,
                                    mask_layer_ids=mask_layer_ids(len(network.blocks), m.mask_layers), **optim)
        try:
            source = image_source(recipe.data, m.collection)
        except DataError as err:
            raise RecipeError(f"method.collection: {err}") from None
        data = CollectionData(
            source=source, batch_size=d.batch_size, steps_per_epoch=min(t.val_every_steps, t.max_steps),
            token_grid=m.token_grid, patch_size=stride, channels=m.channels, val_fraction=d.val_fraction,
            val_batches=m.val_batches,
            percentiles=m.percentiles, seed=recipe.seed, num_workers=d.num_workers, progress=t.progress)
        unit = "each image is one unit of the split" if m.collection is not None else \
            "each modality of each case is one image, cases are split"
        preprocessing = {"collection": f"{source.description}: {unit}; RAS, the coarsest axis last, "
                                      f"percentiles {m.percentiles[0]:g}-{m.percentiles[1]:g} -> [0, 1]; crops of "
                                      "whole tokens, no resampling; the tokenizer sees 2x - 1; "
                                      + ("colour -> grey (ITU-R BT.601)" if m.channels == 1 else
                                         "grey replicated to RGB"),
                         "target_spacing": None}
        inference = {"percentiles": list(m.percentiles), "stage": m.stage, "mask_ratio": m.mask_ratio,
                     "tokenizer_run": None if m.tokenizer_run is None else str(m.tokenizer_run),
                     "collection": None if m.collection is None else str(Path(m.collection).resolve())}
        return Training(system=system, data=data, network_name=TOKENIZER if m.stage == "tokenizer" else VIT,
                        network_kwargs=kwargs, task=TaskInfo(kind="synthesis"), modalities=source.modalities,
                        preprocessing=preprocessing, inference=inference,
                        training_data=None if m.collection is None else {
                            "kind": "collection", "synthetic": source.synthetic, "dataset_name": source.description,
                            "path": str(Path(m.collection).resolve())})

    @staticmethod
    def _tokenizer(m: PUMITMethod) -> Any:
        """The frozen tokenizer of ``method.tokenizer_run`` (a finished PUMIT tokenizer run with the same intensity
        mapping)."""
        from medmodal.engine.recipe import RecipeError
        from medmodal.engine.run import RunError
        from medmodal.engine.runinfo import load_run

        try:
            run = load_run(m.tokenizer_run)  # type: ignore[arg-type]
        except RunError as err:
            raise RecipeError(f"method.tokenizer_run: {err}") from None
        if run.info.method != "pumit" or run.info.inference.get("stage") != "tokenizer":
            raise RecipeError(f"method.tokenizer_run: {m.tokenizer_run} is a {run.info.method} run, not a PUMIT "
                              "tokenizer run (method.stage: tokenizer)")
        if list(run.info.inference.get("percentiles", [])) != list(m.percentiles):
            raise RecipeError(f"method.percentiles {list(m.percentiles)}: the tokenizer run mapped intensities with "
                              f"{run.info.inference.get('percentiles')}; use the same")
        return run.network()

    def evaluate(self, run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, features: bool,
                 progress: bool, model_name: str | None = None) -> Path:
        from medmodal.methods.pumit.evaluate import evaluate_run

        if features:
            raise self.not_offered("evaluate --features")
        return evaluate_run(run, out_dir=out_dir, split=split, data=data, progress=progress, model_name=model_name)

    def pretrain(self, request: PretrainRequest) -> Path:
        from medmodal.methods.pumit.commands import pretrain

        return pretrain(request)

    def add_commands(self, app: Any) -> None:
        from medmodal.methods.pumit.commands import add_commands

        add_commands(app)

    def contract_recipe(self, spatial_dims: int) -> dict[str, Any]:
        from medmodal.engine.cases import tiny_case_recipe

        recipe = tiny_case_recipe(
            spatial_dims, method={"name": self.name, "token_grid": [2, 2, 2], "val_batches": 1},
            model={"name": TOKENIZER, "kwargs": {"widths": [8, 16], "stem_stride": 4, "num_codes": 16,
                                                 "code_dim": 8}})
        recipe["train"]["lr"] = 1e-3
        return recipe


register_method(PUMITPlugin())
