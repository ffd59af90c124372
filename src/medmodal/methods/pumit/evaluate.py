"""``medmodal evaluate`` on a PUMIT tokenizer run: reconstruction error and codebook usage per modality and degree
of anisotropy.

Each held-out image (the run's validation cases; ``--split all``: every case; ``--data DIR``: every case of another
data set) is prepared like the training images, cropped at its centre to the largest whole number of tokens (at most
``eval_tokens`` per axis, so that big volumes stay affordable) and reconstructed in one pass. Per image: L1 and PSNR
on the [0, 1] scale, and the codebook usage (share of codes that are some token's most likely one) and perplexity.
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

#: at most this many tokens per axis in an evaluated crop.
EVAL_TOKENS = 16


def _centre_crop(array: np.ndarray, token: tuple[int, int, int]) -> np.ndarray | None:
    shape = [min((s // t), EVAL_TOKENS) * t for s, t in zip(array.shape, token, strict=True)]
    if min(shape) == 0:
        return None
    start = [(s - c) // 2 for s, c in zip(array.shape, shape, strict=True)]
    return np.asarray(array[tuple(slice(a, a + c) for a, c in zip(start, shape, strict=True))], dtype=np.float32)


def evaluate_run(run: LoadedRun, *, out_dir: Path, split: str, data: Path | None, progress: bool,
                 model_name: str | None = None) -> Path:
    """Score ``run`` (see the module docstring); writes ``images.csv``, ``summary.csv`` and ``report.md``."""
    from medmodal.data.collection_cache import build_collection_cache
    from medmodal.engine.cases import run_source
    from medmodal.losses.pumit_prior import codebook_usage
    from medmodal.methods.pumit.data import case_of, collection_records

    source = run_source(run, data)
    _, records = source.records()
    if data is None and split != "all":
        keep = set(run.split("val"))
        records = [r for r in records if r.case_id in keep]
        where = "the run's validation cases"
    else:
        where = f"every case of {data}" if data is not None else "every case of the training data"
    inf = run.info.inference
    index = build_collection_cache(collection_records(records, run.info.modalities),
                                   source.cache_dir / "collection", percentiles=tuple(inf["percentiles"]),
                                   progress=progress)
    network = run.network()
    rows: list[dict[str, Any]] = []
    for image in index.images:
        token = network.token_size(image.da)
        crop = _centre_crop(image.array(), token)
        if crop is None:
            continue
        x = torch.from_numpy(crop)[None, None] * 2.0 - 1.0
        with torch.no_grad():
            x_hat, quant = network(x, image.da)
        err = ((x_hat.clamp(-1, 1) - x) / 2.0)  # on the [0, 1] scale
        mse = float(err.square().mean())
        stats = codebook_usage(quant.probs)
        rows.append({"image_id": image.image_id, "case_id": case_of(image.image_id), "modality": image.modality,
                     "spatial_dims": image.spatial_dims, "da": image.da, "crop": "x".join(map(str, crop.shape)),
                     "l1": float(err.abs().mean()), "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))),
                     "code_usage": float(stats.usage), "perplexity": float(stats.perplexity)})
    if not rows:
        raise DataError(f"no image of {where} spans one token {network.token_size(0)}; nothing to evaluate")
    out_dir.mkdir(parents=True, exist_ok=True)
    header = list(rows[0])
    write_csv(out_dir / "images.csv", header, [[r[k] for k in header] for r in rows])
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["modality"], r["da"])].append(r)
    summary = []
    for (mod, da), rs in sorted(groups.items()):
        summary.append([mod, da, len(rs), *(f"{np.mean([r[k] for r in rs]):.4f}"
                                             for k in ("l1", "psnr", "code_usage", "perplexity"))])
    write_csv(out_dir / "summary.csv", ["modality", "da", "images", "l1", "psnr", "code_usage", "perplexity"], summary)
    lines = [f"# PUMIT tokenizer evaluation: {model_name or run.dir.name}", ""]
    if source.info.synthetic:
        lines += ["**Data: synthetic phantom** (procedurally generated images, not patients).", ""]
    lines += [f"- run: `{run.dir}`; images: {len(rows)} of {where}; centre crops of at most {EVAL_TOKENS} tokens per "
              "axis", "", "| modality | DA | images | L1 | PSNR (dB) | code usage | perplexity |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {d} | {n} | " + " | ".join(f"{float(v):.3f}" for v in vals) + " |"
              for m, d, n, *vals in summary]
    lines += ["", "L1 and PSNR of the reconstruction on the [0, 1] intensity scale; code usage = share of the codebook "
              "that is some token's most likely code; perplexity = exp(H(p̄)), the effective number of codes.", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    return out_dir / "report.md"
