"""Registration benchmark: seconds per pair and label Dice for affine, affine + B-spline and affine + demons.

On pairs of *different* synthetic phantom cases (inter-subject registration, as in multi-atlas labelling) it
measures, with one SimpleITK thread per registration and ``medmodal register``'s default settings:

* the wall time per pair of :func:`medmodal.registration.register_pair` for ``affine``, ``bspline`` (cross-
  contrast: atlas T1c → target T2, Mattes MI) and ``demons`` (same contrast: T2 → T2, as demons needs);
* the Dice of anatomical structures of the phantom's noiseless tissue map (``csf``, ``white_matter``, ...:
  tumours sit at random places in each case, so a consistent structure is the meaningful atlas label)
  warped from the atlas onto the target, before registration (identity in physical space) and after;
* optionally the throughput of :func:`medmodal.registration.atlases.register_atlases` on the same pairs with one
  worker versus several worker processes.

Example::

    python benchmarks/registration.py --size 64 --pairs 4 --repeats 3 --out /tmp/medmodal-bench-reg
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from rich.console import Console
from rich.table import Table

from medmodal.data.case import Volume
from medmodal.data.phantom import PHANTOM_TISSUES, make_phantom_case, phantom_tissue_map, write_phantom
from medmodal.evaluation.metrics import binary_dice
from medmodal.registration import register_pair, volume_to_image, warp_label
from medmodal.registration.atlases import register_atlases

#: (row name, transform, atlas contrast, target contrast)
METHODS = (
    ("affine", "affine", "t1c", "t2"),
    ("affine + B-spline", "bspline", "t1c", "t2"),
    ("affine + demons", "demons", "t2", "t2"),
)


def structure_dice(warped: sitk.Image, target_tissue: np.ndarray, structures: list[str]) -> dict[str, float]:
    """Per-structure Dice of a warped tissue map (sitk, on the target grid) against the target's tissue map."""
    array = sitk.GetArrayFromImage(warped).transpose()
    index = {s: PHANTOM_TISSUES.index(s) for s in structures}
    return {s: binary_dice(array == index[s], target_tissue == index[s]) for s in structures}


def make_pairs(n: int, size: int) -> list[dict]:
    """``n`` atlas/target pairs of different phantom cases, with their tissue maps."""
    pairs = []
    for i in range(n):
        seeds = (100 + 2 * i, 101 + 2 * i)
        cases = [make_phantom_case(case_id=f"c{s}", seed=s, size=size) for s in seeds]
        tissues = [phantom_tissue_map(seed=s, size=size) for s in seeds]
        pairs.append({"atlas": cases[0], "target": cases[1], "atlas_tissue": tissues[0], "target_tissue": tissues[1]})
    return pairs


def bench_pairs(pairs: list[dict], structures: list[str], repeats: int) -> list[dict]:
    rows = []
    for name, transform, atlas_contrast, target_contrast in METHODS:
        seconds, before, after = [], {s: [] for s in structures}, {s: [] for s in structures}
        for pair in pairs:
            fixed = volume_to_image(pair["target"].images[target_contrast])
            moving = volume_to_image(pair["atlas"].images[atlas_contrast])
            atlas_affine = pair["atlas"].images[atlas_contrast].affine
            label = volume_to_image(Volume(pair["atlas_tissue"], atlas_affine), pixel_type=sitk.sitkUInt8)
            identity = structure_dice(warp_label(label, fixed, sitk.Transform(3, sitk.sitkIdentity)),
                                      pair["target_tissue"], structures)
            for r in range(repeats):
                start = time.perf_counter()
                result = register_pair(fixed, moving, transform=transform, threads=1)
                seconds.append(time.perf_counter() - start)
                if r == 0:  # the registration is deterministic: score it once
                    score = structure_dice(warp_label(label, fixed, result.transform), pair["target_tissue"],
                                           structures)
            for s in structures:
                before[s].append(identity[s])
                after[s].append(score[s])
        rows.append({"name": name, "contrasts": f"{atlas_contrast} -> {target_contrast}",
                     "median_s": statistics.median(seconds), "runs": seconds,
                     "before": {s: statistics.fmean(v) for s, v in before.items()},
                     "after": {s: statistics.fmean(v) for s, v in after.items()}})
    return rows


def bench_throughput(out: Path, pairs: int, size: int, workers: int) -> dict[int, float]:
    """Wall seconds of ``register_atlases`` (B-spline, T1c → T2) on ``pairs`` pairs, per worker count."""
    atlases = write_phantom(out / "atlases", cases=pairs, seed=7, size=size, overwrite=True)
    targets = write_phantom(out / "targets", cases=1, seed=8, size=size, overwrite=True)
    seconds = {}
    for n in sorted({1, workers}):
        start = time.perf_counter()
        summary = register_atlases(atlases, targets, out / f"run_{n}", atlas_modality="t1c", target_modality="t2",
                                   workers=n, overwrite=True, progress=False)
        seconds[n] = time.perf_counter() - start
        assert len(summary.ok) == pairs, summary.failed
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="phantom grid size (voxels per axis); 128 for large")
    p.add_argument("--pairs", type=int, default=4, help="atlas/target pairs (different phantom cases)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per pair and method (median reported)")
    p.add_argument("--structures", default="csf,white_matter,grey_matter",
                   help=f"comma-separated tissues of the phantom used as labels, from {list(PHANTOM_TISSUES)}")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes of the parallel throughput run (0 skips it)")
    p.add_argument("--out", type=Path, default=Path("/tmp/medmodal-bench-registration"),
                   help="working folder for the throughput run")
    args = p.parse_args(argv)
    structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    unknown = sorted(set(structures) - set(PHANTOM_TISSUES))
    if unknown:
        p.error(f"unknown structure(s) {unknown}; choose from {list(PHANTOM_TISSUES)}")
    console = Console(width=160)

    rows = bench_pairs(make_pairs(args.pairs, args.size), structures, args.repeats)
    table = Table(title=f"pairwise registration, {args.pairs} pairs of different phantom cases, {args.size}^3, "
                        f"1 SimpleITK thread, {args.repeats} repeat(s) (SYNTHETIC data)")
    for col in ("method", "contrasts", "s/pair (median)", *[f"Dice {s}: before -> after" for s in structures]):
        table.add_column(col, justify="left" if col in ("method", "contrasts") else "right")
    for row in rows:
        table.add_row(row["name"], row["contrasts"], f"{row['median_s']:.2f}",
                      *[f"{row['before'][s]:.3f} -> {row['after'][s]:.3f}" for s in structures])
    console.print(table)

    if args.workers > 1:
        seconds = bench_throughput(args.out, args.pairs, args.size, args.workers)
        table = Table(title=f"register_atlases throughput, {args.pairs} pairs (B-spline, t1c -> t2), {args.size}^3, "
                            f"{os.cpu_count()} CPU(s)")
        for col in ("workers", "wall s (incl. process start)", "pairs/min", "speed-up"):
            table.add_column(col, justify="right")
        for n, s in seconds.items():
            table.add_row(str(n), f"{s:.1f}", f"{60 * args.pairs / s:.1f}", f"{seconds[1] / s:.2f}x")
        console.print(table)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    console.print(f"command: {command}\ndate: {datetime.date.today().isoformat()}, SimpleITK "
                  f"{sitk.Version_VersionString()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
