"""Reading a MedCoSS stage's data: its reports (text) or images, as training and held-out items.

A stage's data is a data set of cases (``path`` in any layout medmodal reads, or the built-in phantom) or, for an
image stage, a folder / manifest of images (``collection``). Cases (or images of a collection) are split into
training and held-out items by ``val_fraction`` and the seed, the same way in training, buffer building and
evaluation. Items carry the case's class ``target`` where the data set has one (the linear probes use it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medmodal.data.case import DataError
from medmodal.engine.recipe import DataConfig
from medmodal.methods.medcoss.config import MedCoSSMethod, StageConfig
from medmodal.methods.medcoss.data import ImageItems, TextItems

log = logging.getLogger("medmodal")

#: the intensity percentiles mapped to [0, 1] (the image-collection default).
PERCENTILES = (0.5, 99.5)


def stage_data_config(stage: StageConfig) -> DataConfig:
    """The ``data`` section that reads a stage's cases."""
    d = stage.data
    return DataConfig(path=d.path, phantom=d.phantom, modalities=d.modalities, cache_dir=d.cache_dir)


def stage_records(stage: StageConfig) -> list[Any]:
    """The case records of a stage's data set (the phantom is generated on first use). A text stage's ``path`` may
    be a CSV table of reports without images (``medmodal.data.text.read_report_table``)."""
    from medmodal.engine.datamodule import resolve_source

    path = stage.data.path
    if stage.kind == "text" and path is not None and Path(path).suffix.lower() == ".csv":
        from medmodal.data.text import read_report_table

        return read_report_table(path)
    return list(resolve_source(stage_data_config(stage)).records()[1])


def stage_corpus(stage: StageConfig) -> Any:
    """The reports of a text stage (empty ones dropped and counted; no report at all is an error)."""
    from medmodal.data.text import collect_reports

    corpus = collect_reports(stage_records(stage), dataset=f"stage {stage.name!r}")
    log.info("stage %s: %s", stage.name, corpus.summary())
    return corpus


def _split(names: list[str], groups: list[str], *, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    from medmodal.engine.datamodule import split_cases

    unique = sorted(set(groups))
    if len(unique) < 2:
        raise DataError(f"need at least 2 cases (or images) to hold some out, got {len(unique)}: {unique}")
    _, val = split_cases(unique, val_fraction=val_fraction, seed=seed)
    held = set(val)
    return ([i for i, g in enumerate(groups) if g not in held], [i for i, g in enumerate(groups) if g in held])


def text_items(stage: StageConfig, *, tokenizer: Any, method: MedCoSSMethod, seed: int) -> tuple[TextItems,
                                                                                                 TextItems]:
    """``(train, held-out)`` encoded reports of a text stage."""
    from medmodal.data.text import encode_texts

    corpus = stage_corpus(stage)
    targets = {r.case_id: (-1 if r.target is None else int(r.target)) for r in stage_records(stage)}
    enc = encode_texts(tokenizer, list(corpus.texts), max_length=method.text_max_length)
    if enc.truncated:
        log.info("stage %s: %d of %d reports cut to %d tokens (method.text_max_length)", stage.name, enc.truncated,
                 len(corpus), method.text_max_length)
    names = list(corpus.case_ids)
    items = TextItems(enc.ids.numpy(), enc.attention_mask.numpy(), enc.word_ids.numpy(), names,
                      np.array([targets.get(n, -1) for n in names], dtype=np.int64))
    train, val = _split(names, names, val_fraction=method.val_fraction, seed=seed)
    return items.subset(train), items.subset(val)


def image_items(stage: StageConfig, *, method: MedCoSSMethod, seed: int, progress: bool = False
                ) -> tuple[ImageItems, ImageItems]:
    """``(train, held-out)`` image items of an image stage (crops of the stage kind's input size)."""
    from medmodal.data.collection_cache import build_collection_cache
    from medmodal.engine.images import image_source

    source = image_source(stage_data_config(stage), stage.data.collection, modality=stage.name)
    index = build_collection_cache(source.images(), source.cache_dir / "collection", percentiles=PERCENTILES,
                                   progress=progress)
    if stage.data.collection is None:
        targets = {r.case_id: (-1 if r.target is None else int(r.target)) for r in stage_records(stage)}
    else:
        targets = {}
    groups = [source.group(im.image_id) for im in index.images]
    size = method.input_size_2d if stage.kind == "image2d" else method.input_size_3d
    items = ImageItems(index=index, kind=stage.kind, input_size=size,
                       targets=np.array([targets.get(g, -1) for g in groups], dtype=np.int64))
    train, val = _split(items.names, groups, val_fraction=method.val_fraction, seed=seed)
    return items.subset(train), items.subset(val)


def stage_items(stage: StageConfig, *, tokenizer: Any, method: MedCoSSMethod, seed: int,
                progress: bool = False) -> tuple[Any, Any]:
    """``(train, held-out)`` items of any stage."""
    if stage.kind == "text":
        if tokenizer is None:
            raise DataError(f"stage {stage.name!r} is text but the model has no text tokenizer (its first stage "
                            "had no report text); start a new model whose recipe lists a text stage")
        return text_items(stage, tokenizer=tokenizer, method=method, seed=seed)
    return image_items(stage, method=method, seed=seed, progress=progress)
