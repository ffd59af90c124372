"""MedCoSS as a method plug-in: one run trains one stage (module doc of :mod:`medmodal.methods.medcoss`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from medmodal.engine.plugin import MethodPlugin, PretrainRequest, Training
from medmodal.engine.recipe import Recipe, RecipeError
from medmodal.engine.runinfo import LoadedRun
from medmodal.methods.medcoss.config import MedCoSSMethod

log = logging.getLogger("medmodal")

NETWORK = "medcoss_vit"
TOKENIZER_FILE = "text_tokenizer.json"
BUFFERS = "buffers"
BUFFER_INDEX = "buffers.json"
#: encoder arguments the method sets (from the stages and the text tokenizer)
SET_BY_METHOD = ("kinds", "vocab_size", "max_text_len", "image_channels_2d", "image_channels_3d")


def load_previous(path: Path) -> LoadedRun:
    """The run of the previous stage (a MedCoSS run)."""
    from medmodal.engine.run import RunError
    from medmodal.engine.runinfo import load_run

    try:
        run = load_run(path)
    except RunError as err:
        raise RecipeError(f"method.previous_run: {err}") from None
    if run.info.method != "medcoss":
        raise RecipeError(f"method.previous_run: {path} is a {run.info.method} run, not a MedCoSS run; continue a "
                          "model that medmodal pretrain made with MedCoSS")
    return run


def buffer_index(run_dir: Path) -> dict[str, Any]:
    """``buffers/buffers.json`` of a run: modality name -> what its buffer holds (empty when it has none)."""
    path = Path(run_dir) / BUFFERS / BUFFER_INDEX
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def text_settings(tokenizer: Any) -> dict[str, Any] | None:
    """What whole-word masking needs from the text tokenizer (``None`` without one)."""
    if tokenizer is None:
        return None
    from medmodal.data.text import special_token_ids

    ids = special_token_ids(tokenizer)
    return {"mask_id": ids.mask, "vocab_size": tokenizer.get_vocab_size(), "special_ids": list(ids.all)}


class StageFiles(L.Callback):
    """Writes a stage run's own files on rank 0: the text tokenizer, the earlier buffers it carries on, and, at the
    end of training, the rehearsal buffer of its own stage (k-means on the encoder's features, spec §2.5)."""

    def __init__(self, *, tokenizer: Any, previous: Path | None, carry_buffers: bool, build: dict[str, Any] | None
                 ) -> None:
        self.tokenizer, self.previous, self.carry, self.build = tokenizer, previous, carry_buffers, build

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from medmodal.atomic import atomic_write_text
        from medmodal.data.text import save_text_tokenizer

        run_dir = Path(trainer.default_root_dir)
        if self.tokenizer is not None and not (run_dir / TOKENIZER_FILE).is_file():
            save_text_tokenizer(self.tokenizer, run_dir / TOKENIZER_FILE)
        if self.carry and self.previous is not None:
            old = buffer_index(self.previous)
            if old:
                (run_dir / BUFFERS).mkdir(exist_ok=True)
                for entry in old.values():
                    target = run_dir / BUFFERS / entry["file"]
                    if not target.is_file():
                        shutil.copyfile(self.previous / BUFFERS / entry["file"], target)
                index = {**old, **buffer_index(run_dir)}
                atomic_write_text(run_dir / BUFFERS / BUFFER_INDEX, json.dumps(index, indent=2) + "\n")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.build is None:
            return
        if trainer.is_global_zero:  # computed once; the next stage's processes all read it from the run folder
            build_buffer(pl_module.network, run_dir=Path(trainer.default_root_dir), **self.build)
        trainer.strategy.barrier("medcoss_buffer")  # no process goes on to the next stage before it is written


def encoder_features(network: torch.nn.Module, items: Any, *, kind: str, pooling: str = "mask_aware",
                     batch_size: int = 32) -> np.ndarray:
    """``(N, W)`` features of every item (its fixed version): the mean of the encoder's output tokens with nothing
    masked (images: cls included; texts: ``pooling``), in eval mode (spec §2.5 step 1)."""
    from medmodal.methods.medcoss.buffer import pool_tokens

    was = network.training
    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            rows = [items.fixed(k) for k in range(start, min(start + batch_size, len(items)))]
            if kind == "text":
                ids = torch.as_tensor(np.stack([r["ids"] for r in rows]), dtype=torch.long)
                mask = torch.as_tensor(np.stack([r["mask"] for r in rows]), dtype=torch.long)
                tokens = network.encode(network.tokenize("text", ids, mask))
                out.append(pool_tokens(tokens, mask, mode=pooling))
            else:
                x = torch.as_tensor(np.stack([r["x"] for r in rows]), dtype=torch.float32)
                out.append(pool_tokens(network.encode(network.tokenize(kind, x))))
    network.train(was)
    return torch.cat(out).numpy().astype(np.float64)


def build_buffer(network: torch.nn.Module, *, run_dir: Path, name: str, kind: str, items: Any, selection: str,
                 ratio: float, cluster_ratio: float, backend: str, seed: int, pooling: str) -> dict[str, Any]:
    """Choose and store the rehearsal buffer of stage ``name`` in ``run_dir/buffers`` (spec §2.5)."""
    from medmodal.atomic import atomic_write_text
    from medmodal.methods.medcoss.buffer import buffer_quota, select_buffer
    from medmodal.methods.medcoss.data import save_buffer, stack_items

    features = encoder_features(network, items, kind=kind, pooling=pooling)
    entry: dict[str, Any] = {"kind": kind, "of": len(items), "selection": selection, "file": f"{name}.npz"}
    if selection == "kmeans":
        sel = select_buffer(features, ratio=ratio, cluster_ratio=cluster_ratio, backend=backend, seed=seed)
        chosen = np.asarray(sel.indices)
        entry.update(k=int(sel.k), q=int(sel.q), inertia=float(sel.inertia), backend=sel.backend)
    else:  # the same number of items as k clusters x q, drawn uniformly
        k, q = buffer_quota(len(items), ratio=ratio, cluster_ratio=cluster_ratio)
        chosen = np.sort(np.random.default_rng([seed, 5]).choice(len(items), size=min(len(items), k * q),
                                                                 replace=False))
        entry.update(k=int(k), q=int(q))
    entry["size"] = len(chosen)
    entry["items"] = [items.names[int(i)] for i in chosen]
    folder = run_dir / BUFFERS
    folder.mkdir(parents=True, exist_ok=True)
    save_buffer(folder / entry["file"], kind=kind, arrays=stack_items(items, chosen), names=entry["items"],
                targets=items.targets[chosen])
    index = {**buffer_index(run_dir), name: entry}
    atomic_write_text(folder / BUFFER_INDEX, json.dumps(index, indent=2) + "\n")
    log.info("stage %s: rehearsal buffer of %d of %d items (%s)", name, len(chosen), len(items), selection)
    return entry


class MedCoSSPlugin(MethodPlugin):
    name = "medcoss"
    config = MedCoSSMethod
    summary = "MedCoSS continual self-supervised pretraining, one modality per stage with a rehearsal buffer"
    spatial_dims = (2,)
    evaluation_metrics = {"accuracy": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0)}

    def check_recipe(self, recipe: Recipe) -> None:
        m: MedCoSSMethod = recipe.method  # type: ignore[assignment]
        if recipe.model.name != NETWORK:
            raise ValueError(f"model.name: MedCoSS trains {NETWORK!r}, not {recipe.model.name!r}")
        clash = sorted(set(SET_BY_METHOD) & set(recipe.model.kwargs))
        if clash:
            raise ValueError(f"model.kwargs: {clash} are set by the method (the stages' kinds and the text "
                             "tokenizer); remove them")
        if m.previous_run is not None and m.strategy != "joint":
            init = recipe.train.init_from
            if init is None or Path(init).resolve() != Path(m.previous_run).resolve():
                raise ValueError("train.init_from must be method.previous_run (the student starts from the previous "
                                 "stage's encoder); medmodal pretrain sets both")

    def ddp_find_unused_parameters(self, recipe: Recipe) -> bool:
        return True  # each batch is one kind: the other tokenizers and the pretext heads get no gradient

    def build(self, recipe: Recipe) -> Training:
        from medmodal.data.text import load_text_tokenizer, train_text_tokenizer
        from medmodal.engine.cases import build_network
        from medmodal.engine.distributed import per_rank_batch
        from medmodal.engine.runinfo import TaskInfo
        from medmodal.methods.medcoss.data import MedCoSSData, load_buffer
        from medmodal.methods.medcoss.sources import stage_corpus, stage_items
        from medmodal.methods.medcoss.system import MedCoSSSystem
        from medmodal.networks.medcoss import MAEDecoder, MLMHead

        m: MedCoSSMethod = recipe.method  # type: ignore[assignment]
        try:
            per_rank_batch(recipe.data.batch_size, recipe.world_size)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        previous = Path(m.previous_run).resolve() if m.previous_run is not None else None
        prev_run = load_previous(previous) if previous is not None else None
        if prev_run is not None:
            done = prev_run.info.inference.get("stages", [])
            want = [s.name for s in m.stages[: m.stage - 1]]
            if done != want:
                raise RecipeError(f"method.previous_run: {previous} trained the stages {done}; stage {m.stage} of "
                                  f"this recipe follows {want}")
        # the text tokenizer: trained on the first text stage's reports, then carried from run to run
        tokenizer = None
        if prev_run is not None:
            if (previous / TOKENIZER_FILE).is_file():
                tokenizer = load_text_tokenizer(previous / TOKENIZER_FILE)
        else:
            texts = [s for s in m.stages if s.kind == "text"]
            if texts:
                tokenizer = train_text_tokenizer(stage_corpus(texts[0]).texts, vocab_size=m.text_vocab_size,
                                                 min_frequency=m.text_min_frequency)
        # the encoder: the previous run's architecture, or the recipe's with the stages' kinds
        if prev_run is not None:
            kwargs = dict(prev_run.info.network["kwargs"])
        else:
            kinds = sorted({s.kind for s in m.stages})
            kwargs = {**recipe.model.kwargs, "kinds": kinds}
            if tokenizer is not None:
                kwargs.update(vocab_size=tokenizer.get_vocab_size(), max_text_len=m.text_max_length)
        trained = m.stages if m.strategy == "joint" else [m.current]
        for stage in trained:
            if stage.kind not in kwargs["kinds"]:
                raise RecipeError(f"stage {stage.name!r} is {stage.kind} but the model has no tokenizer of that kind "
                                  f"(it has {', '.join(kwargs['kinds'])}); a model's kinds are fixed by its first "
                                  "recipe: start a new model whose stages include one of that kind")
        network = build_network(NETWORK, kwargs)
        t, d = recipe.train, recipe.data
        current = {}
        for stage in trained:
            train_items, val_items = stage_items(stage, tokenizer=tokenizer, method=m, seed=recipe.seed,
                                                 progress=t.progress)
            current[stage.name] = (stage.kind, train_items, val_items)
        buffers = {}
        if prev_run is not None and m.strategy == "medcoss":
            for name, entry in buffer_index(previous).items():
                buffers[name] = load_buffer(previous / BUFFERS / entry["file"])
        heads: dict[str, torch.nn.Module] = {}
        for kind in sorted({s.kind for s in trained}):
            if kind == "text":
                heads[kind] = MLMHead(width=network.width, vocab_size=int(kwargs["vocab_size"]))
            else:
                dims = 2 if kind == "image2d" else 3
                heads[kind] = MAEDecoder(
                    spatial_dims=dims, patch_size=network.patch_size(kind),
                    channels=3 if dims == 2 else 1, encoder_width=network.width, width=m.decoder_width,
                    depth=m.decoder_depth, heads=m.decoder_heads,
                    pos_grid=kwargs.get(f"pos_grid_{dims}d", (14, 14) if dims == 2 else (12, 12, 1)))
        teacher = prev_run.network() if (prev_run is not None and buffers) else None
        val_names = [f"{n}_{'mlm' if k == 'text' else 'mae'}" for n, (k, _, _) in current.items()]
        val_names += [f"{n}_kd" for n in buffers]
        system = MedCoSSSystem(network=network, heads=heads, teacher=teacher, text=text_settings(tokenizer),
                               val_names=val_names, mask_ratio=m.mask_ratio, norm_pix=m.norm_pix,
                               mlm_probability=m.mlm_probability, mixup=m.mixup, teacher_mode=m.teacher_mode,
                               lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                               max_steps=t.max_steps, seed=recipe.seed)
        data = MedCoSSData(current=current, buffers=buffers, batch_size=d.batch_size,
                           steps_per_epoch=min(t.val_every_steps, t.max_steps), val_batches=m.val_batches,
                           seed=recipe.seed, num_workers=d.num_workers)
        build = None
        if m.strategy == "medcoss":
            build = {"name": m.current.name, "kind": m.current.kind, "items": current[m.current.name][1],
                     "selection": m.buffer_selection, "ratio": m.buffer_ratio, "cluster_ratio": m.cluster_ratio,
                     "backend": m.buffer_backend, "seed": recipe.seed, "pooling": m.text_pooling}
        stages_so_far = [s.name for s in (m.stages if m.strategy == "joint" else m.stages[: m.stage])]
        inference = {"stages": stages_so_far, "stage": m.stage, "strategy": m.strategy,
                     "kinds": {s.name: s.kind for s in m.stages[: len(stages_so_far)]},
                     "text_tokenizer": TOKENIZER_FILE if tokenizer is not None else None,
                     "input_size_2d": list(m.input_size_2d), "input_size_3d": list(m.input_size_3d),
                     "previous_run": None if previous is None else str(previous),
                     "buffers": sorted(buffers) + ([m.current.name] if build else [])}
        preprocessing = {"images": "each image of a stage's collection in [0, 1] by its 0.5/99.5 percentiles; random "
                                   "crops of the input size with random flips (2D: grey replicated to RGB)",
                         "text": f"BPE tokens, at most {m.text_max_length} per report", "target_spacing": None}
        return Training(system=system, data=data, network_name=NETWORK, network_kwargs=kwargs,
                        task=TaskInfo(kind="pretraining"), modalities=tuple(stages_so_far),
                        preprocessing=preprocessing, inference=inference,
                        callbacks=[StageFiles(tokenizer=tokenizer, previous=previous,
                                              carry_buffers=m.strategy == "medcoss", build=build)])

    def pretrain(self, request: PretrainRequest) -> Path:
        from medmodal.methods.medcoss.stages import pretrain

        return pretrain(request)

    def evaluate(self, run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, features: bool,
                 progress: bool, model_name: str | None = None) -> Path:
        from medmodal.methods.medcoss.evaluate import evaluate_run

        if features or data is not None:
            raise self.not_offered("evaluate --features / --data")
        return evaluate_run(run, out_dir=out_dir, progress=progress, model_name=model_name)

    def add_commands(self, app: Any) -> None:
        from medmodal.methods.medcoss.commands import add_commands

        add_commands(app)

    def contract_recipe(self, spatial_dims: int) -> dict[str, Any]:
        from medmodal.methods.medcoss.stages import tiny_recipe

        return tiny_recipe()
