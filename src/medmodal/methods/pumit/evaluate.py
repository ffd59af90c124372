"""``medmodal evaluate`` on a PUMIT run, per modality and degree of anisotropy: a tokenizer run's reconstruction
error and codebook usage; a MIM run's masked-token cross-entropy, KL and accuracy against its tokenizer's soft tokens.

Each held-out image (the run's validation cases; ``--split all``: every case; ``--data DIR``: every case of another
data set) is prepared like the training images, cropped at its centre to the largest whole number of tokens (at most
``eval_tokens`` per axis, so that big volumes stay affordable) and reconstructed in one pass. Per image: L1 and PSNR
on the [0, 1] scale, and the codebook usage (share of codes that are some token's most likely one) and perplexity;
for a MIM run, the masked-token metrics with a mask drawn from the image's identity (the same in every evaluation).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmodal.atomic import atomic_write_text, write_csv
from medmodal.data.case import DataError
from medmodal.engine.runinfo import LoadedRun

#: at most this many tokens per axis in an evaluated crop of the tokenizer (the MIM stage's: its training grid).
EVAL_TOKENS = 16


def _centre_crop(array: np.ndarray, token: tuple[int, int, int], cap: tuple[int, int, int]) -> np.ndarray | None:
    """The centre crop of whole tokens (at most ``cap`` tokens per axis) of ``array (C, X, Y, Z)``."""
    spatial = array.shape[1:]
    shape = [min((s // t), c) * t for s, t, c in zip(spatial, token, cap, strict=True)]
    if min(shape) == 0:
        return None
    start = [(s - c) // 2 for s, c in zip(spatial, shape, strict=True)]
    window = (slice(None), *(slice(a, a + c) for a, c in zip(start, shape, strict=True)))
    return np.asarray(array[window], dtype=np.float32)


def evaluate_run(run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, progress: bool,
                 model_name: str | None = None) -> Path:
    """Score ``run`` (see the module docstring); writes ``images.csv``, ``summary.csv`` and ``report.md``."""
    from medmodal.data.collection_cache import build_collection_cache
    from medmodal.data.collections import to_channels
    from medmodal.engine.images import image_source

    cfg, collection = run.recipe.data, run.recipe.method.collection
    if data is not None:  # another data set (a folder of cases) or, for a collection run, another collection
        if collection is not None:
            collection, cfg = Path(data), cfg.model_copy(update={"cache_dir": None})
        else:
            cfg = cfg.model_copy(update={"path": Path(data), "format": "auto", "cache_dir": None,
                                         "modalities": list(run.info.modalities)})
    elif collection is None and cfg.path is not None and not cfg.path.exists():
        raise DataError(f"data.path: {cfg.path}, the data set {run.dir} was trained on, no longer exists; "
                        "evaluate on another data set with --data DIR")
    source = image_source(cfg, collection)
    inf = run.info.inference
    # the whole data set's cache, as training built it (a cache of a subset would drop the other images from it)
    index = build_collection_cache(source.images(), source.cache_dir / "collection",
                                   percentiles=tuple(inf["percentiles"]), progress=progress)
    images = list(index.images)
    if data is None and split != "all":
        keep = set(run.split("val"))
        images = [im for im in images if source.group(im.image_id) in keep]
        where = "the run's validation images"
    else:
        where = f"every image of {data}" if data is not None else f"every image of {source.description}"
    network = run.network()
    mim = inf.get("stage") == "mim"
    tokenizer, layers = None, []
    if mim:
        from medmodal.engine.runinfo import load_run
        from medmodal.methods.pumit.system import mask_layer_ids

        tokenizer = load_run(inf["tokenizer_run"]).network()
        layers = mask_layer_ids(len(network.blocks), run.recipe.method.mask_layers)  # as in training
    rows: list[dict[str, Any]] = []
    token_net = tokenizer or network
    counts = np.zeros(0 if mim else network.quantizer.num_codes, dtype=np.int64)
    channels = int(run.info.network["kwargs"].get("in_channels", 1))
    # the ViT is scored on crops of the token grid it trained on: a tiny ViT trained on 4 x 4 grids does not carry
    # over to 8 x 8 ones (its learned positions and rotary angles beyond the grid are untrained; docs/pumit.md)
    cap = tuple(int(c) for c in run.recipe.method.token_grid) if mim else (EVAL_TOKENS,) * 3
    for image in images:
        token = token_net.token_size(image.da)
        crop = _centre_crop(to_channels(np.asarray(image.data()), channels), token, cap)
        if crop is None:
            continue
        x = torch.from_numpy(crop)[None] * 2.0 - 1.0
        row = {"image_id": image.image_id, "group": source.group(image.image_id), "modality": image.modality,
               "spatial_dims": image.spatial_dims, "da": image.da, "crop": "x".join(map(str, crop.shape[1:]))}
        row.update(_mim_scores(network, tokenizer, x, image, inf, layers) if mim
                   else _tokenizer_scores(network, x, image, counts))
        rows.append(row)
    if not rows:
        raise DataError(f"no image of {where} spans one token {token_net.token_size(0)}; nothing to evaluate")
    out_dir.mkdir(parents=True, exist_ok=True)
    header = list(rows[0])
    write_csv(out_dir / "images.csv", header, [[r[k] for k in header] for r in rows])
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["modality"], r["da"])].append(r)
    keys = ("mim_ce", "mim_kl", "token_accuracy") if mim else ("l1", "psnr", "code_usage", "perplexity")
    summary = []
    for (mod, da), rs in sorted(groups.items()):
        summary.append([mod, da, len(rs), *(f"{np.mean([r[k] for r in rs]):.4f}" for k in keys)])
    write_csv(out_dir / "summary.csv", ["modality", "da", "images", *keys], summary)
    lines = [f"# PUMIT {'MIM' if mim else 'tokenizer'} evaluation: {model_name or run.dir.name}", ""]
    if source.synthetic:
        lines += ["**Data: synthetic phantom** (procedurally generated images, not patients).", ""]
    titles = ("masked CE", "masked KL", "token accuracy") if mim else ("L1", "PSNR (dB)", "code usage", "perplexity")
    grid = " x ".join(map(str, cap))
    lines += [f"- run: `{run.dir}`; images: {len(rows)} of {where}; centre crops of at most {grid} tokens"
              " (x, y, z)" + (f"; tokenizer: `{inf['tokenizer_run']}`" if mim else ""), "",
              "| modality | DA | images | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(titles)]
    lines += [f"| {m} | {d} | {n} | " + " | ".join(f"{float(v):.3f}" for v in vals) + " |"
              for m, d, n, *vals in summary]
    if mim:
        lines += ["", f"A share {inf['mask_ratio']:g} of each crop's tokens is masked (the mask is drawn from the "
                  "image's id); masked CE = cross-entropy of the ViT's prediction against the tokenizer's soft token "
                  "at the masked positions, KL = CE minus the target's entropy, token accuracy = how often the "
                  "predicted and the tokenizer's most likely codes agree.", ""]
    else:
        from medmodal.methods.pumit.figures import plot_codebook

        plot_codebook(out_dir / "codebook.png", counts=counts, metrics_csv=run.dir / "metrics.csv",
                      title=model_name or run.dir.name)
        used = int((counts > 0).sum())
        lines += ["", "L1 and PSNR of the reconstruction on the [0, 1] intensity scale; code usage = share of the "
                  "codebook that is some token's most likely code; perplexity = exp(H(p̄)), the effective number of "
                  f"codes. Over all evaluated positions {used} of {len(counts)} codes are some position's most "
                  "likely code.", "", "![codebook usage](codebook.png)", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    return out_dir / "report.md"


def _tokenizer_scores(network: Any, x: torch.Tensor, image: Any, counts: np.ndarray) -> dict[str, float]:
    """Reconstruction and codebook statistics of one crop; adds each position's most likely code to ``counts``."""
    from medmodal.losses.pumit_prior import codebook_usage
    from medmodal.methods.pumit.figures import code_counts

    with torch.no_grad():
        x_hat, quant = network(x, image.da)
    counts += np.asarray(code_counts(quant.probs), dtype=np.int64)
    err = (x_hat.clamp(-1, 1) - x) / 2.0  # on the [0, 1] scale
    mse = float(err.square().mean())
    stats = codebook_usage(quant.probs)
    return {"l1": float(err.abs().mean()), "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))),
            "code_usage": float(stats.usage), "perplexity": float(stats.perplexity)}


def _mim_scores(network: Any, tokenizer: Any, x: torch.Tensor, image: Any, inference: dict,
                layers: list[int]) -> dict[str, float]:
    from medmodal.losses.pumit import masked_positions, random_visible, soft_target_cross_entropy, soft_target_kl
    from medmodal.methods.pumit.system import crop_generator, mim_targets

    target = mim_targets(tokenizer, x, image.da)
    n = target.shape[1]
    visible = random_visible(n, mask_ratio=float(inference["mask_ratio"]),
                             generator=crop_generator(0, image.image_id, (0, 0, 0)))
    masked = masked_positions(visible, n)
    with torch.no_grad():
        logits = network.forward_mim(x, image.da, visible, layers)
    hit = (logits[0].argmax(-1) == target[0].argmax(-1))[masked[0]].float().mean()
    return {"mim_ce": float(soft_target_cross_entropy(logits, target, masked)),
            "mim_kl": float(soft_target_kl(logits, target, masked)), "token_accuracy": float(hit)}
