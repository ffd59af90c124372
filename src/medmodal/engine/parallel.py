"""Training several runs at once (an experiment's seeds and models) in worker processes, Ctrl-C safe.

On 2 cores two single-thread runs side by side have 1.36× the throughput of the same two runs one after the other
with 2 threads each (``benchmarks/parallel_runs.py``, docs/benchmarks.md): small networks use a second thread
poorly. Workers are spawned (a fresh interpreter each); the caller builds shared data (phantoms, caches) first, so
that the workers never race to write it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

log = logging.getLogger("medmodal")


def default_jobs(n_runs: int) -> int:
    """Runs trained at once by default: one per usable CPU core, at most ``n_runs``."""
    return max(1, min(n_runs, len(os.sched_getaffinity(0))))


def threads_per_job(jobs: int) -> int | None:
    """CPU threads each of ``jobs`` worker processes gets (the usable cores shared evenly, at least 1); ``None``
    when the jobs run in this process (``jobs`` 1: its own thread setting stands)."""
    return max(1, len(os.sched_getaffinity(0)) // jobs) if jobs > 1 else None


def run_jobs(fn: Callable[..., Any], items: Sequence[Any], *, jobs: int, describe: Callable[[Any], str] = str,
             what: str = "run", **kwargs: Any) -> list[Any]:
    """``[fn(item, **kwargs) for item in items]``, ``jobs`` at a time in spawned worker processes (in this
    process when ``jobs`` is 1), in the order of ``items``; one log line per finished item (``describe(item)``).

    Ctrl-C reaches every process of the group: running items stop (a training saves its ``last.ckpt`` first),
    queued ones are dropped, and :class:`KeyboardInterrupt` is raised with a message saying that running the same
    command again continues where it stopped.
    """
    if jobs <= 1:
        out = []
        for item in items:
            log.info("%s: %s", what, describe(item))
            out.append(fn(item, **kwargs))
        return out
    log.info("%s: %d jobs, %d at a time; a line per finished one", what, len(items), jobs)
    results: list[Any] = [None] * len(items)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_ctrl_c)
    try:
        futures = {pool.submit(_interruptible, fn, item, **kwargs): i for i, item in enumerate(items)}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            results[i] = future.result()
            log.info("%s: %d/%d done: %s", what, done, len(items), describe(items[i]))
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)
        raise KeyboardInterrupt("the finished runs and each interrupted run's checkpoint are kept; run the same "
                                "command again to continue where it stopped") from None
    pool.shutdown()
    return results


def _ignore_ctrl_c() -> None:
    """Worker initialiser: an idle worker ignores Ctrl-C (the parent stops the pool); see :func:`_interruptible`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interruptible(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one job in a worker with Ctrl-C enabled: it interrupts the job (a KeyboardInterrupt the pool hands to
    the parent as the job's outcome, or the training's own graceful stop), never the idle worker loop."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_setup(threads: int | None) -> None:
    """In a worker process of :func:`run_jobs` (``threads`` given): quiet third-party logging and use ``threads``
    threads; in the calling process (``None``) nothing."""
    if threads is None:
        return
    import torch

    from medmodal.engine.run import quiet_third_party

    quiet_third_party()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(threads)


def train_and_evaluate(recipe: Any, run_dir: Any, *, model_name: str) -> float:
    """Train (or reuse, or resume) the run of ``recipe`` in ``run_dir``, then evaluate it into ``run_dir/eval``
    unless an evaluation newer than its weights is there; returns the seconds spent training."""
    import time
    from pathlib import Path

    from medmodal.engine.evaluate import evaluate_run
    from medmodal.engine.train import train_or_resume

    run_dir = Path(run_dir)
    t = time.perf_counter()
    train_or_resume(recipe, run_dir)
    seconds = time.perf_counter() - t
    summary, weights = run_dir / "eval" / "summary.csv", run_dir / "weights" / "model.safetensors"
    if not summary.is_file() or summary.stat().st_mtime < weights.stat().st_mtime:
        evaluate_run(run_dir, out_dir=run_dir / "eval", overwrite=True, progress=False, model_name=model_name)
    return seconds
