"""Throughput of several small training runs on few cores: one after the other with all threads each (the naive
way) vs side by side in separate processes with ``cores // runs`` threads each (what ``medmodal quickstart``
does by default). Both ways train the same recipes through the real ``medmodal train`` command.

Example::

    python benchmarks/parallel_runs.py --recipe quickstart --steps 200 --runs 2 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _train_cmd(recipe: str, out: Path, *, seed: int, steps: int, threads: int) -> list[str]:
    return [
        sys.executable, "-m", "medmodal.cli", "train", recipe, "--out", str(out), "--overwrite",
        "--set", f"seed={seed}", "--set", f"train.max_steps={steps}", "--set", f"train.val_every_steps={steps}",
        "--set", f"train.checkpoint_every_steps={steps}", "--set", f"train.threads={threads}",
        "--set", "train.progress=false",
    ]


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def sequential(recipe: str, root: Path, *, runs: int, steps: int, threads: int) -> float:
    """Seconds to train ``runs`` runs one after the other, ``threads`` threads each."""
    t0 = time.perf_counter()
    for i in range(runs):
        subprocess.run(_train_cmd(recipe, root / f"seq{i}", seed=i, steps=steps, threads=threads),
                       env=_env(threads), check=True, capture_output=True)
    return time.perf_counter() - t0


def side_by_side(recipe: str, root: Path, *, runs: int, steps: int, threads: int) -> float:
    """Seconds to train ``runs`` runs at once in separate processes, ``threads`` threads each."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_train_cmd(recipe, root / f"par{i}", seed=i, steps=steps, threads=threads),
                              env=_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(runs)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err.decode()[-2000:])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // args.runs)
    print(f"{datetime.datetime.now().isoformat(timespec='minutes')}  {cores} cores, recipe {args.recipe}, "
          f"{args.runs} runs of {args.steps} steps, {args.repeats} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Build the phantom and its cache once, outside the timings.
        subprocess.run(_train_cmd(args.recipe, root / "warm", seed=0, steps=1, threads=cores), env=_env(cores),
                       check=True, capture_output=True)
        seq, par = [], []
        for _ in range(args.repeats):
            seq.append(sequential(args.recipe, root, runs=args.runs, steps=args.steps, threads=cores))
            par.append(side_by_side(args.recipe, root, runs=args.runs, steps=args.steps, threads=share))
    s, p = statistics.median(seq), statistics.median(par)
    print(f"| way | threads per run | s for {args.runs} runs (median of {args.repeats}) |")
    print("|---|---|---|")
    print(f"| one after the other | {cores} | {s:.1f} |")
    print(f"| side by side (medmodal quickstart) | {share} | {p:.1f} |")
    print(f"side by side is {s / p:.2f}x the throughput")


if __name__ == "__main__":
    main()
