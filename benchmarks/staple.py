"""STAPLE benchmark: medmodal's float64 torch STAPLE vs SimpleITK's ``STAPLEImageFilter`` and
``MultiLabelSTAPLEImageFilter`` on the same synthetic raters, side by side.

The raters imitate registered atlas labels: a smooth random blob is the truth (nested level sets of it give
the labels of the multi-label case), and each rater sees it shifted by a few voxels, eroded or dilated, with
its own smooth boundary noise; the last two raters are bad (a large shift, a strong erosion). Both libraries
get the same arrays, the same iteration limit and the same number of threads; times exclude the numpy →
tensor / image conversion and are medians over ``--repeats`` runs (after one warm-up run of ours).

``--atlas`` runs the at-scale comparison instead: an AAL-sized parcellation (181×217×181, 117 labels with
background: 116 Voronoi parcels of a brain-sized ellipsoid) and ``--raters`` copies of it, each warped by its own
smooth displacement field (up to ~2 voxels, as registered atlases disagree at parcel boundaries). Majority vote
and multi-label STAPLE, ours and SimpleITK's (``LabelVotingImageFilter``, ``MultiLabelSTAPLEImageFilter``), each
run once in a fresh subprocess, so that its peak resident memory (Linux ``VmHWM``) is its own; the table
shows the seconds, the peak RSS, the growth of the RSS during the call (the data and libraries already loaded),
and the fraction of voxels on which ours equals SimpleITK's.

Examples (``OMP_WAIT_POLICY=PASSIVE`` keeps torch's idle OpenMP threads from spinning on a machine whose cores
are shared with other work, which otherwise slows every small torch operation by orders of magnitude)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/staple.py --size 128 --raters 10 --labels 3 --repeats 3
    OMP_WAIT_POLICY=PASSIVE python benchmarks/staple.py --atlas --raters 3

``--baseline-src`` adds rows for the same calls on another medmodal source tree (an older commit), to measure a
change on the same machine and data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from rich.console import Console
from rich.table import Table
from scipy import ndimage

from medmodal.evaluation.metrics import binary_dice
from medmodal.fusion import majority_vote, multilabel_staple, staple

#: AAL's grid (MNI space at 1 mm) and label count, background included.
ATLAS_SHAPE = (181, 217, 181)
ATLAS_LABELS = 117
ATLAS_METHODS = ("ours-majority", "ours-majority-itk-ties", "sitk-majority", "ours-staple", "sitk-staple")
#: The same calls on another medmodal source tree (``--baseline-src``), e.g. an older commit's ``src``.
BASELINE_METHODS = ("baseline-majority", "baseline-staple")


def smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit-variance low-frequency noise on a ``size³`` grid (cubic upsampling of a coarse random grid)."""
    coarse = rng.standard_normal((max(size // 16, 2) + 2,) * 3)
    field = ndimage.zoom(coarse, size / (coarse.shape[0] - 2), order=3)
    start = (field.shape[0] - size) // 2
    field = field[start : start + size, start : start + size, start : start + size]
    return (field - field.mean()) / field.std()


def level_sets(size: int, raters: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The truth's level function ``(S,)`` and each rater's perturbed copy ``(K, S)`` (float32; inside is < 1)."""
    rng = np.random.default_rng(seed)
    axes = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    x, y, z = np.meshgrid(axes, axes, axes, indexing="ij")
    truth = (x / 0.55) ** 2 + ((y - 0.05) / 0.45) ** 2 + ((z + 0.05) / 0.6) ** 2 + 0.35 * smooth_noise(rng, size)
    per_rater, reach = [], max(1, round(size / 40))  # shifts of up to 3 voxels at 128³
    for k in range(raters):
        shift = rng.integers(-reach, reach + 1, 3)
        offset = rng.uniform(-0.12, 0.12)  # > 0 erodes, < 0 dilates
        if k == raters - 1:
            shift = np.round(np.array([10, -6, 4]) * size / 128)  # a failed registration
        elif k == raters - 2:
            offset = 0.45  # a strongly eroded label
        moved = np.roll(truth, tuple(int(s) for s in shift), axis=(0, 1, 2))
        per_rater.append(moved + offset + 0.12 * smooth_noise(rng, size))
    return truth.astype(np.float32), np.stack(per_rater).astype(np.float32)


def to_labels(level: np.ndarray, n_labels: int) -> np.ndarray:
    """Nested regions: label j where the level function is below the j-th of ``n_labels - 1`` thresholds."""
    thresholds = np.linspace(1.0, 0.35, n_labels - 1)
    return sum((level < t).astype(np.uint8) for t in thresholds).astype(np.uint8)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls of ``fn`` and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def mean_label_dice(a: np.ndarray, b: np.ndarray, labels: range) -> float:
    return float(np.mean([binary_dice(a == label, b == label) for label in labels]))


def binary_rows(masks: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> list[list[str]]:
    tensor = torch.from_numpy(masks)
    staple(tensor, max_iter=args.max_iter)  # warm-up
    ours_s, ours = timed(lambda: staple(tensor, max_iter=args.max_iter), args.repeats)
    images = [sitk.GetImageFromArray(m) for m in masks]

    def run_sitk() -> tuple[np.ndarray, int]:
        f = sitk.STAPLEImageFilter()
        f.SetForegroundValue(1)
        f.SetMaximumIterations(args.max_iter)
        out = sitk.GetArrayFromImage(f.Execute(images))
        return out, f.GetElapsedIterations()

    sitk_s, (theirs, elapsed) = timed(run_sitk, args.repeats)
    passes = elapsed + 1 if elapsed < args.max_iter else elapsed  # ITK reports the last pass's 0-based index
    fused, prob = ours.fused.numpy(), ours.probability.numpy()
    agreement = f"{binary_dice(fused, theirs > 0.5):.6f}"
    diff = f"{np.abs(prob - theirs).max():.2e}"
    return [
        ["binary", "medmodal staple (torch float64)", f"{ours_s:.3f}", str(ours.iterations),
         "yes" if ours.converged else "no", agreement, diff, f"{binary_dice(fused, truth):.4f}"],
        ["binary", "SimpleITK STAPLEImageFilter", f"{sitk_s:.3f}", str(passes),
         "yes" if elapsed < args.max_iter else "no", "", "", f"{binary_dice(theirs > 0.5, truth):.4f}"],
    ]


def multilabel_rows(labels: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> list[list[str]]:
    tensor = torch.from_numpy(labels)
    multilabel_staple(tensor, max_iter=args.max_iter)  # warm-up
    ours_s, ours = timed(lambda: multilabel_staple(tensor, max_iter=args.max_iter), args.repeats)
    images = [sitk.GetImageFromArray(m) for m in labels]
    n = int(labels.max()) + 1

    def run_sitk() -> tuple[np.ndarray, np.ndarray]:
        f = sitk.MultiLabelSTAPLEImageFilter()
        f.SetMaximumNumberOfIterations(args.max_iter)
        out = sitk.GetArrayFromImage(f.Execute(images))
        confusion = np.stack([np.array(f.GetConfusionMatrix(k)).reshape(n + 1, n)[:n].T for k in range(len(images))])
        return out, confusion

    sitk_s, (theirs, confusion) = timed(run_sitk, args.repeats)
    fused = ours.fused.numpy()
    foreground = range(1, n)
    agreement = f"{mean_label_dice(fused, theirs, foreground):.6f}"
    diff = f"{np.abs(ours.confusion.numpy() - confusion).max():.2e} (θ)"
    return [
        ["multi-label", "medmodal multilabel_staple", f"{ours_s:.3f}", str(ours.iterations),
         "yes" if ours.converged else "no", agreement, diff, f"{mean_label_dice(fused, truth, foreground):.4f}"],
        ["multi-label", "SimpleITK MultiLabelSTAPLEImageFilter", f"{sitk_s:.3f}", "n/a", "n/a", "", "",
         f"{mean_label_dice(theirs, truth, foreground):.4f}"],
    ]


def parcellation(shape: tuple[int, ...], n_labels: int, *, seed: int) -> np.ndarray:
    """``n_labels - 1`` Voronoi parcels of random seeds inside a centred ellipsoid, background 0 outside: uint8."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    inside = sum(((g - (s - 1) / 2) / (0.42 * s)) ** 2 for g, s in zip(grids, shape, strict=True)) < 1.0
    points = np.argwhere(inside)
    picked = points[rng.choice(len(points), n_labels - 1, replace=False)]
    seeds = np.zeros(shape, dtype=np.int32)
    seeds[tuple(picked.T)] = np.arange(1, n_labels)
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(nearest)]
    labels[~inside] = 0
    return labels.astype(np.uint8)


def warped_raters(labels: np.ndarray, raters: int, *, seed: int, reach: float = 2.0) -> np.ndarray:
    """``(K, *S)`` copies of ``labels``, each resampled (nearest) through its own smooth displacement field."""
    rng = np.random.default_rng(seed)
    shape = labels.shape
    out = np.empty((raters, *shape), dtype=labels.dtype)
    for k in range(raters):
        coords = np.indices(shape, dtype=np.float32)
        for axis in range(len(shape)):
            coarse = rng.standard_normal(tuple(max(s // 24, 2) for s in shape))
            field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=3)
            coords[axis] += reach / 2 * field[tuple(slice(0, s) for s in shape)] / field.std()
        out[k] = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    return out


def _peak_rss_mib() -> float:
    """This process's peak resident memory (Linux ``VmHWM``; ``getrusage`` would include the parent's peak, which
    a child inherits across fork and exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def atlas_worker(method: str, data: Path, out: Path, args: argparse.Namespace) -> None:
    """Run one method on the saved raters and print ``{"seconds", "rss_before", "rss_peak", ...}`` as JSON."""
    if method.startswith("baseline-"):  # the same call, on the medmodal that PYTHONPATH points to
        method = "ours-" + method.removeprefix("baseline-")
    raters = np.load(data)
    undecided = int(raters.max()) + 1  # SimpleITK's default for both filters
    images = [sitk.GetImageFromArray(r) for r in raters] if method.startswith("sitk") else []
    tensor = torch.from_numpy(raters)
    extra: dict[str, object] = {}
    before = _peak_rss_mib()
    start = time.perf_counter()
    if method == "ours-majority":
        fused = majority_vote(tensor).numpy()
    elif method == "ours-majority-itk-ties":
        fused = majority_vote(tensor, undecided=undecided).numpy()
    elif method == "ours-staple":
        result = multilabel_staple(tensor, max_iter=args.max_iter)
        fused = result.fused.numpy()
        extra = {"iterations": result.iterations, "converged": result.converged,
                 "undecided": int(result.undecided.sum())}
    elif method == "sitk-majority":
        f = sitk.LabelVotingImageFilter()
        fused = sitk.GetArrayFromImage(f.Execute(images))
    else:
        f = sitk.MultiLabelSTAPLEImageFilter()
        f.SetMaximumNumberOfIterations(args.max_iter)
        fused = sitk.GetArrayFromImage(f.Execute(images))
    seconds = time.perf_counter() - start
    np.save(out, fused.astype(np.int16))
    import medmodal

    extra["medmodal"] = str(Path(medmodal.__file__).parent)
    print(json.dumps({"seconds": seconds, "rss_before": before, "rss_peak": _peak_rss_mib(), **extra}))


def atlas_rows(args: argparse.Namespace, console: Console) -> None:
    truth = parcellation(ATLAS_SHAPE, ATLAS_LABELS, seed=args.seed)
    raters = warped_raters(truth, args.raters, seed=args.seed + 1)
    agree = [float((r == truth).mean()) for r in raters]
    console.print(f"# {args.raters} raters of {'×'.join(map(str, ATLAS_SHAPE))} with {ATLAS_LABELS} labels "
                  f"(synthetic parcellation), voxels equal to the unwarped map: " + " ".join(f"{a:.3f}" for a in agree))
    results: dict[str, dict] = {}
    fused: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "raters.npy"
        np.save(data, raters)
        del raters
        methods = args.methods or [*ATLAS_METHODS, *(BASELINE_METHODS if args.baseline_src else ())]
        for method in methods:
            out = Path(tmp) / f"{method}.npy"
            command = [sys.executable, __file__, "--worker", method, "--data", str(data), "--out", str(out),
                       "--max-iter", str(args.max_iter), "--threads", str(args.threads)]
            env = dict(os.environ)
            if method.startswith("baseline-"):
                env["PYTHONPATH"] = os.pathsep.join([str(args.baseline_src), env.get("PYTHONPATH", "")])
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                console.print(f"[red]{method} failed[/] (exit {done.returncode}):\n{done.stderr[-2000:]}")
                continue
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
            fused[method] = np.load(out)
    table = Table(title=f"label fusion at atlas scale ({args.threads} threads)")
    for name in ("method", "seconds", "peak RSS MiB", "RSS growth MiB", "EM passes", "= SimpleITK (voxels ≠)",
                 "= baseline", "voxels = truth"):
        table.add_column(name, justify="left" if name == "method" else "right")
    reference = {"ours-majority": "sitk-majority", "ours-majority-itk-ties": "sitk-majority",
                 "ours-staple": "sitk-staple", "baseline-majority": "sitk-majority", "baseline-staple": "sitk-staple"}
    for method, r in results.items():
        ref, base = reference.get(method), method.replace("ours-", "baseline-")
        agreement = ""
        if ref in fused:
            same = fused[method] == fused[ref]
            agreement = f"{float(same.mean()):.6f} ({int(same.size - same.sum())})"
        baseline = f"{float((fused[method] == fused[base]).mean()):.6f}" if base != method and base in fused else ""
        table.add_row(method, f"{r['seconds']:.2f}", f"{r['rss_peak']:.0f}", f"{r['rss_peak'] - r['rss_before']:.0f}",
                      str(r.get("iterations", "")), agreement, baseline,
                      f"{float((fused[method] == truth).mean()):.4f}")
    console.print(table)
    if "ours-staple" in results:
        r = results["ours-staple"]
        console.print(f"ours-staple: converged={r['converged']}, {r['undecided']} undecided voxel(s)")
    console.print("ours-majority gives a tie to the smallest tied label; ours-majority-itk-ties writes the largest "
                  "label + 1 there, as SimpleITK does. RSS growth: peak RSS minus the RSS before the call.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="voxels per axis of the cubic volume (default 128)")
    parser.add_argument("--raters", type=int, default=10, help="number of raters (default 10)")
    parser.add_argument("--labels", type=int, default=3, help="labels of the multi-label case, background included")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median reported)")
    parser.add_argument("--max-iter", type=int, default=200, help="iteration limit for both libraries")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and SimpleITK (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atlas", action="store_true",
                        help=f"fuse an AAL-sized {ATLAS_LABELS}-label atlas instead (vote and multi-label STAPLE)")
    parser.add_argument("--baseline-src", type=Path,
                        help="--atlas: also time the vote and STAPLE of the medmodal package under this folder "
                             "(e.g. `git archive OLD src | tar -x -C /tmp/old` then /tmp/old/src)")
    parser.add_argument("--methods", nargs="+", choices=ATLAS_METHODS + BASELINE_METHODS,
                        help="--atlas: run only these (default: all, the baseline ones with --baseline-src)")
    parser.add_argument("--worker", choices=ATLAS_METHODS + BASELINE_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
        atlas_worker(args.worker, args.data, args.out, args)
        return
    if args.raters < 3 or args.labels < 2 or args.size < 8 or args.repeats < 1:
        parser.error("need --raters >= 3, --labels >= 2, --size >= 8 and --repeats >= 1")
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    if args.atlas:
        console = Console(width=160)
        console.print(f"# {shlex.join(['python', *sys.argv])}")
        console.print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, "
                      f"{os.cpu_count()} CPUs, torch {torch.__version__}, SimpleITK {sitk.Version.VersionString()}, "
                      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
        atlas_rows(args, console)
        return
    truth_level, rater_levels = level_sets(args.size, args.raters, seed=args.seed)
    masks, truth = (rater_levels < 1.0).astype(np.uint8), truth_level < 1.0
    labels, truth_labels = to_labels(rater_levels, args.labels), to_labels(truth_level, args.labels)
    rater_dice = [binary_dice(m.astype(bool), truth) for m in masks]

    console = Console(width=160)
    console.print(f"# {shlex.join(['python', *sys.argv])}")
    now = datetime.datetime.now().isoformat(timespec="seconds")
    console.print(f"# {now}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                  f"SimpleITK {sitk.Version.VersionString()}, {args.threads} threads, "
                  f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    console.print(f"# {args.raters} raters of {args.size}³ (synthetic), rater Dice vs truth: "
                  + " ".join(f"{d:.2f}" for d in rater_dice) + f"; medians of {args.repeats} run(s)")
    table = Table(title="STAPLE: medmodal vs SimpleITK")
    for name in ("case", "implementation", "seconds", "EM passes", "converged", "agreement*", "max |Δ|",
                 "Dice vs truth"):
        table.add_column(name, justify="left" if name in ("case", "implementation") else "right")
    for row in [*binary_rows(masks, truth, args), *multilabel_rows(labels, truth_labels, args)]:
        table.add_row(*row)
    console.print(table)
    console.print("* binary: Dice of the maps thresholded at 0.5, max |Δ| of the probability maps; multi-label: mean "
                  "Dice over foreground labels of the fused maps, max |Δ| of the confusion matrices. SimpleITK's "
                  "multi-label filter does not report its iterations.")


if __name__ == "__main__":
    main()
