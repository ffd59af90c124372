"""MedCoSS benchmarks (issue 15, spec ``shared/methods/medcoss.md``), one section per part; ``--only`` picks
sections (default: all).

**Machine reference** (printed first, always): GFLOP/s of one float32 matrix product ``(2048 x 768) @ (768 x 2048)``
in numpy (the BLAS that scikit-learn's k-means runs on) and of the repository's reference ``Conv3d`` (32 -> 32, 3³,
1 x 32 x 64³, inference; ``benchmarks/evaluation.py``), medians of 5 round-robin rounds in the same run.

**buffer**: building a rehearsal buffer (:func:`medmodal.methods.medcoss.buffer.select_buffer`: k-means, then the
nearest rows to each centroid) from N synthetic features of width 768 with ``k = 1 %`` of N (spec §2.5), for
N = 20 000 and 100 000 (``--sizes``). Features: ``k`` Gaussian clusters (centres ~ N(0, I), noise ~ N(0, I), sizes
from a Dirichlet(2) draw; seed 0), float32. Backends, all seeded (seed 0), one k-means start (``n_init=1``) and
at most ``--max-iter`` Lloyd iterations each (default 20; sklearn ``KMeans`` may stop earlier at its tolerance,
``MiniBatchKMeans`` counts passes over the data and stops when it stops improving, faiss always runs them all):

* ``sklearn KMeans, k-means++``: the released code's backend with sklearn's default start (``select_buffer``
  seeds it with :func:`sklearn.cluster.kmeans_plusplus` on float64 rows, then runs ``KMeans``); it is run up to
  ``--kmeanspp-max`` samples (default 100 000) and estimated above that (time x N k, its cost's order);
* ``sklearn KMeans, random start``: the same Lloyd iterations from k random rows (faiss's start);
* ``MiniBatchKMeans``: sklearn's default batch 1024, k-means++ on its ``3 k`` (at least 3 072 rows) init subsample;
* ``faiss, random start``: ``faiss.Kmeans`` (``select_buffer``'s faiss default), skipped when faiss is absent;
* ``faiss, k-means++ start``: faiss's Lloyd iterations from the same k-means++ start as the first row.

Each row is timed once (wall clock and process CPU time); the inertia (sum of squared distances to the assigned
centroid, computed the same way for every backend) is compared with the sklearn k-means++ row where it ran, else
with the random-start row. The verdict compares faiss's default (random start) with the first measured sklearn
``KMeans`` row, i.e. sklearn's default. "Lloyd passes" expresses a time as the number of full assignment passes
(``2 N k D`` FLOPs each) the reference matrix product would do in it. Issue 15's target at N = 100 000: faiss at
least 10x faster than sklearn ``KMeans`` with an inertia within 1 %.

**mae**: one MAE training step of the MedCoSS encoder + decoder against MONAI's ``MaskedAutoEncoderViT`` of the
same size (``benchmarks/medcoss_mae.py``, which also runs on its own).

Example (the figures in docs/benchmarks.md)::

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/medcoss.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

# this script's folder is on sys.path when it is run as ``python benchmarks/medcoss.py``
from evaluation import conv_reference
from medmodal.methods.medcoss.buffer import buffer_quota, select_buffer
from multimix import Timed, run_rounds

WIDTH = 768  # ViT-B features (spec §2.1)
SPEEDUP_TARGET = 10.0  # issue 15: faiss >= 10x faster than sklearn KMeans at N = 100 000 ...
INERTIA_TARGET = 0.01  # ... with an inertia within 1 %
TARGET_N = 100_000
REF_SHAPE = (2048, WIDTH, 2048)  # the reference matrix product (m, k, n)


@dataclass(frozen=True)
class Reference:
    """The machine's speed in this run: GFLOP/s of the reference matrix product and convolution."""

    matmul_gflops: float
    conv_gflops: float


def machine_reference(rounds: int = 5) -> Reference:
    """Time the reference matrix product and ``Conv3d`` round-robin and print their GFLOP/s."""
    m, k, n = REF_SHAPE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    conv_flops, conv = conv_reference()
    rows = [Timed(f"numpy float32 matmul {m}x{k} @ {k}x{n}", lambda: a @ b, calls=3, flops=2.0 * m * k * n),
            Timed("reference Conv3d 32->32 3³, 64³", conv, flops=conv_flops)]
    run_rounds(rows, rounds=rounds, warmup=1)
    print(f"\n## machine reference (median of {rounds} rounds)")
    for r in rows:
        print(f"{r.name:<44}{r.median * 1e3:>9.1f} ms{r.gflops():>9.1f} GFLOP/s")
    return Reference(rows[0].gflops(), rows[1].gflops())


def clustered_features(n: int, *, clusters: int, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    """``(n, width) float32``: ``clusters`` Gaussian blobs (centres and noise N(0, I)), Dirichlet(2) sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, width), dtype=np.float32)
    labels = rng.choice(clusters, size=n, p=rng.dirichlet(np.full(clusters, 2.0)))
    x = rng.standard_normal((n, width), dtype=np.float32)
    x += centres[labels]
    return x


@dataclass
class BufferRow:
    label: str
    wall: float
    cpu: float
    inertia: float
    size: int
    estimated: bool = False


def time_buffer(label: str, run: Callable[[], object]) -> BufferRow:
    t0, c0 = time.perf_counter(), time.process_time()
    sel = run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"  {label}: {wall:.2f} s", flush=True)
    return BufferRow(label, wall, cpu, sel.inertia, sel.size)  # type: ignore[attr-defined]


def buffer_rows(n: int, *, max_iter: int, kmeanspp_max: int, kmeanspp_at: dict[int, float]) -> list[BufferRow]:
    k, q = buffer_quota(n)
    t0 = time.perf_counter()
    x = clustered_features(n, clusters=k)
    print(f"\nN = {n:,}, D = {WIDTH}: k = {k}, q = {q}; features generated in {time.perf_counter() - t0:.1f} s",
          flush=True)
    common = dict(seed=0, n_init=1, max_iter=max_iter)
    rows = []
    if n <= kmeanspp_max:
        rows.append(time_buffer("sklearn KMeans, k-means++", lambda: select_buffer(
            x, backend="sklearn", init="k-means++", **common)))
        kmeanspp_at[n] = rows[-1].wall / (n * k)
    elif kmeanspp_at:
        m = max(kmeanspp_at)  # the largest size measured: time per (N k)
        rows.append(BufferRow(f"sklearn KMeans, k-means++ (est. from N={m:,})", kmeanspp_at[m] * n * k,
                              float("nan"), float("nan"), 0, estimated=True))
    rows.append(time_buffer("sklearn KMeans, random start", lambda: select_buffer(
        x, backend="sklearn", init="random", **common)))
    rows.append(time_buffer("MiniBatchKMeans", lambda: select_buffer(x, backend="minibatch", **common)))
    if importlib.util.find_spec("faiss") is not None:
        rows.append(time_buffer("faiss, random start", lambda: select_buffer(
            x, backend="faiss", init="random", **common)))
        if n <= kmeanspp_max:
            rows.append(time_buffer("faiss, k-means++ start", lambda: select_buffer(
                x, backend="faiss", init="k-means++", **common)))
    else:
        print("  faiss is not installed: no faiss row")
    return rows


def print_buffer_table(n: int, rows: list[BufferRow], ref: Reference) -> str | None:
    k, _ = buffer_quota(n)
    lloyd = 2.0 * n * k * WIDTH / (ref.matmul_gflops * 1e9)  # seconds of one assignment pass at the reference
    measured = [r for r in rows if not r.estimated]
    base = next((r for r in measured if r.label.startswith("sklearn KMeans")), None)
    faiss_row = next((r for r in rows if r.label == "faiss, random start"), None)
    print(f"\nN = {n:,}, k = {k}: one Lloyd pass = {2.0 * n * k * WIDTH / 1e9:,.1f} GFLOP = {lloyd:.2f} s at the "
          f"reference matmul speed")
    print(f"{'':<48}{'wall s':>9}{'CPU s':>8}{'Lloyd passes':>13}{'/ faiss':>9}{'inertia':>16}{'vs ' + 'sklearn':>12}"
          f"{'buffer':>8}")
    for r in rows:
        vs = (r.inertia - base.inertia) / base.inertia if base and not r.estimated else float("nan")
        speed = r.wall / faiss_row.wall if faiss_row else float("nan")
        cpu = "" if r.estimated else f"{r.cpu:.2f}"
        inertia = "" if r.estimated else f"{r.inertia:,.0f}"
        vs_text = "" if r.estimated else f"{vs:+.3%}"
        size = "" if r.estimated else str(r.size)
        print(f"{r.label:<48}{r.wall:>9.2f}{cpu:>8}{r.wall / lloyd:>13.1f}{speed:>8.1f}x{inertia:>16}{vs_text:>12}"
              f"{size:>8}")
    if base is not None:
        print(f"(/ faiss: wall time over faiss with a random start; inertia compared with '{base.label}')")
    if n != TARGET_N or faiss_row is None or base is None:
        return None
    verdict = None
    for r in rows:
        if not r.label.startswith("sklearn KMeans"):
            continue
        ref_row = base if r.estimated else r  # an estimated row has no inertia: the first measured one stands in
        rel = (faiss_row.inertia - ref_row.inertia) / ref_row.inertia
        speedup = r.wall / faiss_row.wall
        word = "PASS" if speedup >= SPEEDUP_TARGET and abs(rel) <= INERTIA_TARGET else "FAIL"
        if r.estimated:
            word = f"{word}, sklearn time estimated: not a verdict"
        elif verdict is None:
            verdict = word
        print(f"target at N = {n:,}, faiss (random start) vs '{r.label}': {speedup:.1f}x faster (>= "
              f"{SPEEDUP_TARGET:.0f}x), inertia {rel:+.2%} vs '{ref_row.label}' (within {INERTIA_TARGET:.0%}) "
              f"-> {word}")
    return verdict


def buffer_section(args: argparse.Namespace, ref: Reference) -> None:
    """Rehearsal-buffer construction: sklearn KMeans / MiniBatchKMeans vs faiss (time, inertia)."""
    print(f"\n## buffer: select_buffer on synthetic clustered features, width {WIDTH}, k = 1 % of N, n_init 1, "
          f"max_iter {args.max_iter}, seed 0")
    kmeanspp_at: dict[int, float] = {}
    verdicts = []
    for n in args.sizes:
        rows = buffer_rows(n, max_iter=args.max_iter, kmeanspp_max=args.kmeanspp_max, kmeanspp_at=kmeanspp_at)
        verdicts.append(print_buffer_table(n, rows, ref))
    verdict = next((v for v in verdicts if v is not None), None)
    print(f"\nbuffer target (faiss >= {SPEEDUP_TARGET:.0f}x faster than sklearn's default KMeans at N = "
          f"{TARGET_N:,}, inertia within {INERTIA_TARGET:.0%}): {verdict or 'not judged (N = 100 000 not run)'}")


#: the sections in order; each takes the parsed arguments and the machine reference
from medcoss_mae import mae_step_section  # noqa: E402  (the MAE-step section lives beside, run from here too)

SECTIONS: dict[str, Callable[[argparse.Namespace, Reference], None]] = {"buffer": buffer_section,
                                                                       "mae": mae_step_section}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, TARGET_N], help="buffer: feature counts N")
    p.add_argument("--max-iter", type=int, default=20, help="buffer: Lloyd iterations at most, every backend")
    p.add_argument("--kmeanspp-max", type=int, default=TARGET_N,
                   help="buffer: largest N for sklearn KMeans with k-means++ (estimated above)")
    p.add_argument("--quick", action="store_true", help="a smoke run: buffer sizes 2 000 and 5 000, max_iter 5")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.max_iter = [2_000, 5_000], 5
    if min(args.threads, args.max_iter, *args.sizes) < 1:
        p.error("--threads, --max-iter and --sizes must be >= 1")
    torch.set_num_threads(args.threads)
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    print(f"# MedCoSS benchmarks, {datetime.datetime.now():%Y-%m-%dT%H:%M}, CPU, {args.threads} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    t0 = time.perf_counter()
    with threadpool_limits(args.threads):
        ref = machine_reference()
        for name in args.only:
            SECTIONS[name](args, ref)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
