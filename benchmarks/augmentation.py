"""Augmentation benchmark: patches/s of the training data loader with and without ``data.augmentation``.

A ``DataLoader(PatchDataset)`` over a cached 3D phantom (batch 2, 1 worker, as the quickstart recipes) is timed
for each patch size with augmentation off, with the ``nnunet_like`` preset (elastic off, the default) and with
the preset plus elastic deformation at ShaSpec's probability 0.2. Each figure is the median over ``--repeats``
runs of ``--batches`` batches (the workers' start-up excluded: one warm-up batch per run). It also prints the
seconds of data per batch, to compare with a training step.

Example::

    python benchmarks/augmentation.py --patches 32 48 --batches 12 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from medmodal.data.cache import build_cache
from medmodal.data.phantom import make_phantom_case, phantom_info
from medmodal.data.sampling import PatchDataset, make_collate
from medmodal.engine.recipe import AugmentationConfig
from medmodal.transforms.augment import PatchAugmentation

SETTINGS = {
    "off": AugmentationConfig(enabled=False),
    "nnunet_like (elastic off)": AugmentationConfig(enabled=True),
    "nnunet_like + elastic p=0.2": AugmentationConfig(enabled=True, elastic={"prob": 0.2}),
}


def loader_rate(index, patch: tuple[int, ...], cfg: AugmentationConfig, *, batch: int, workers: int,
                batches: int, repeats: int) -> float:
    """Median patches/s of the training loader (one warm-up batch per run is not timed)."""
    kw = cfg.transform_kwargs()
    augment = PatchAugmentation(spatial_dims=len(patch), patch_size=patch, **kw) if cfg.enabled else None
    rates = []
    for r in range(repeats):
        ds = PatchDataset(index=index, patch_size=patch, samples_per_epoch=batch * (batches + 1), seed=r,
                          augment=augment)
        it = iter(DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=make_collate(index.info.modalities)))
        next(it)
        start = time.perf_counter()
        n = sum(b.image.shape[0] for b in it)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, nargs="+", default=[32, 48])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [make_phantom_case(case_id=f"case_{k:03d}", seed=k, size=args.size) for k in range(args.cases)]
        index = build_cache(cases, phantom_info(), Path(tmp) / "cache")
        table = Table(title=f"training loader, batch {args.batch_size}, {args.workers} worker(s), "
                            f"{args.cases} phantom cases of {args.size}³ (median of {args.repeats} runs)")
        table.add_column("patch")
        for name in SETTINGS:
            table.add_column(f"{name}\npatches/s (s/batch)", justify="right")
        for p in args.patches:
            row = [f"{p}³"]
            for cfg in SETTINGS.values():
                r = loader_rate(index, (p, p, p), cfg, batch=args.batch_size, workers=args.workers,
                                batches=args.batches, repeats=args.repeats)
                row.append(f"{r:.1f} ({args.batch_size / r:.3f})")
            table.add_row(*row)
        Console().print(table)


if __name__ == "__main__":
    main()
