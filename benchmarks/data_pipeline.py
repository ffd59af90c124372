"""Data-pipeline benchmark: cached memory-mapped patches vs decoding ``.nii.gz`` files for every sample.

On one synthetic 3D phantom (BraTS layout, written with :func:`medmodal.data.phantom.write_phantom`) it
measures patches per second of

* **cached**: :class:`medmodal.data.sampling.PatchDataset` over the preprocessed cache (memory-mapped .npy);
* **naive**: nibabel decodes every modality and the label of a random case for every sample, then crops;
* **MONAI**: ``LoadImaged`` + ``EnsureChannelFirstd`` + ``ConcatItemsd`` + ``RandSpatialCropd`` per sample;

and then the fraction of a training step spent waiting for data: a ``DataLoader(PatchDataset)`` feeding a
small 3D ``BasicUNet`` (time inside ``next(iterator)`` vs the whole step).

Example::

    python benchmarks/data_pipeline.py --cases 8 --size 64 --patch 48 --iters 30 --out /tmp/medmodal-bench
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medmodal.data.cache import build_cache
from medmodal.data.case import CaseRecord
from medmodal.data.formats import open_dataset
from medmodal.data.phantom import read_phantom_parameters, write_phantom
from medmodal.data.sampling import PatchDataset, make_collate


def rate(draw: Callable[[int], object], iters: int, repeats: int) -> tuple[float, list[float]]:
    """Median patches/s of ``draw(i)`` over ``repeats`` runs of ``iters`` samples (after one warm-up run)."""
    for i in range(min(iters, 4)):
        draw(i)
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(iters):
            draw((r + 1) * iters + i)
        rates.append(iters / (time.perf_counter() - start))
    return statistics.median(rates), rates


def naive_sampler(records: list[CaseRecord], modalities: tuple[str, ...], patch: tuple[int, ...]) -> Callable:
    """Decode every modality + label with nibabel for each sample, then crop one random patch."""

    def draw(i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(i)
        rec = records[int(rng.integers(len(records)))]
        image = np.stack([nib.load(rec.images[m]).get_fdata(dtype=np.float32) for m in modalities])
        label = np.asarray(nib.load(rec.label).dataobj)
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(label.shape, patch, strict=True)]
        window = tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))
        return np.ascontiguousarray(image[(slice(None), *window)]), np.ascontiguousarray(label[window])

    return draw


def monai_sampler(records: list[CaseRecord], modalities: tuple[str, ...], patch: tuple[int, ...]) -> Callable:
    """MONAI dictionary transforms that load, stack and randomly crop every sample from the files."""
    from monai.transforms import Compose, ConcatItemsd, EnsureChannelFirstd, LoadImaged, RandSpatialCropd

    keys = [*modalities, "label"]
    transform = Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            ConcatItemsd(keys=list(modalities), name="image"),
            RandSpatialCropd(keys=["image", "label"], roi_size=patch, random_size=False),
        ]
    )
    items = [{**{m: str(r.images[m]) for m in modalities}, "label": str(r.label)} for r in records]

    def draw(i: int) -> dict:
        rng = np.random.default_rng(i)
        transform.set_random_state(seed=i)
        return transform(dict(items[int(rng.integers(len(items)))]))

    return draw


def training_wait(
    ds: PatchDataset,
    *,
    modalities: tuple[str, ...],
    steps: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> dict[str, float]:
    """Train a small 3D BasicUNet for ``steps`` steps; time spent in ``next(iterator)`` vs the whole step."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    features = (8, 16, 32, 64, 128, 8)
    net = BasicUNet(spatial_dims=3, in_channels=len(modalities), out_channels=4, features=features)
    net.to(device)
    optimiser = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    lut = torch.zeros(256, dtype=torch.long)
    lut[torch.tensor([0, 1, 2, 4])] = torch.arange(4)  # BraTS 0/1/2/4 -> class indices
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=make_collate(modalities),
        pin_memory=device.type == "cuda",
    )
    waits, totals = [], []
    it = iter(loader)
    for step in range(steps + 1):  # step 0 (worker start-up, first allocations) is not counted
        t0 = time.perf_counter()
        batch = next(it).to(device)
        t1 = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch.image), lut.to(device)[batch.label])
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step > 0:
            waits.append(t1 - t0)
            totals.append(t2 - t0)
    return {"step_s": sum(totals) / steps, "wait_s": sum(waits) / steps, "fraction": sum(waits) / sum(totals)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="phantom grid size (voxels per axis)")
    p.add_argument("--patch", type=int, default=48, help="cubic patch edge (voxels)")
    p.add_argument("--iters", type=int, default=30, help="patches per timed run (each method)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="training steps for the data-wait measurement")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", type=Path, required=True, help="working folder (phantom + cache, reused)")
    args = p.parse_args(argv)
    console = Console(width=150)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    patch = (args.patch,) * 3
    raw, cache = args.out / "phantom", args.out / "cache"

    t = time.perf_counter()
    wanted = {"cases": args.cases, "size": args.size, "spatial_dims": 3, "seed": 0, "layout": "brats"}
    params = read_phantom_parameters(raw)
    if params is None or any(params.get(k) != v for k, v in wanted.items()):
        write_phantom(
            raw, cases=args.cases, seed=0, spatial_dims=3, size=args.size, layout="brats", overwrite=True
        )
    info, records = open_dataset(raw)
    t_phantom = time.perf_counter() - t
    t = time.perf_counter()
    index = build_cache(records, info, cache)
    t_cache = time.perf_counter() - t
    t = time.perf_counter()
    build_cache(records, info, cache)
    t_reuse = time.perf_counter() - t

    ds = PatchDataset(index=index, patch_size=patch, samples_per_epoch=10**6, seed=0)
    results = {
        "cached (medmodal PatchDataset, mmap)": rate(ds.__getitem__, args.iters, args.repeats),
        "naive (nibabel decode every sample)": rate(
            naive_sampler(records, info.modalities, patch), args.iters, args.repeats
        ),
        "MONAI (LoadImaged ... RandSpatialCropd)": rate(
            monai_sampler(records, info.modalities, patch), args.iters, args.repeats
        ),
    }
    ours = next(iter(results.values()))[0]
    table = Table(
        title=f"patch sampling, {args.cases} phantom cases {args.size}^3 x 4 modalities, "
        f"patch {args.patch}^3 (SYNTHETIC data)"
    )
    for col in ("pipeline", "patches/s (median)", "ms/patch", "runs (patches/s)", "cached speed-up"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for name, (median, runs) in results.items():
        table.add_row(
            name,
            f"{median:,.1f}",
            f"{1000 / median:.2f}",
            " ".join(f"{r:,.0f}" for r in runs),
            f"{ours / median:.1f}x",
        )
    console.print(table)
    console.print(
        f"one-off: phantom write+index {t_phantom:.1f} s, cache build {t_cache:.2f} s, "
        f"cache reuse check {t_reuse * 1000:.0f} ms"
    )

    n = args.batch_size * (args.steps + 1)
    ds = PatchDataset(index=index, patch_size=patch, samples_per_epoch=n, seed=1)
    w = training_wait(
        ds,
        modalities=info.modalities,
        steps=args.steps,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
    )
    table = Table(
        title=f"training step with DataLoader(PatchDataset), batch {args.batch_size}, "
        f"{args.num_workers} workers, BasicUNet 3D on {device.type}"
    )
    for col in ("steps", "step time (s)", "waiting for data (s)", "data-wait fraction"):
        table.add_column(col, justify="right")
    table.add_row(str(args.steps), f"{w['step_s']:.3f}", f"{w['wait_s']:.4f}", f"{100 * w['fraction']:.2f} %")
    console.print(table)
    console.print(
        f"ratios: cached/naive {ours / results['naive (nibabel decode every sample)'][0]:.1f}x, "
        f"cached/MONAI {ours / results['MONAI (LoadImaged ... RandSpatialCropd)'][0]:.1f}x"
    )
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    console.print(
        f"command: {command}   date: {datetime.datetime.now().isoformat(timespec='seconds')}   "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
