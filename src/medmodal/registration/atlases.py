"""Multi-atlas label propagation: register every labelled atlas onto every target, in parallel.

``register_atlases(atlases, targets, out)`` writes::

    out/labels/<target_id>/<atlas_id>.nii.gz   each atlas label warped onto the target's own grid
    out/manifest.csv                            one row per pair (see MANIFEST_COLUMNS)
    out/registration.json                       settings, modalities, counts and software versions

A pair that fails (unreadable file, missing modality, registration error) is logged, recorded with
``status=failed`` and skipped; the run fails only when every pair fails. The output folder appears only when
the run is finished (all or nothing).

Example (cross-contrast, T1c atlases onto T2 targets)::

    summary = register_atlases("atlases/", "targets/", "runs/labels", atlas_modality="t1c",
                               target_modality="t2", progress=False)
    for pair in summary.ok:          # PairResult: target, atlas, label (path), metric, dice_to_reference
        ...
    rows = read_manifest_rows("runs/labels")   # the same rows, later, from manifest.csv
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import multiprocessing
import os
import platform
import statistics
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from medmodal.data.case import CaseRecord, DataError, DatasetInfo
from medmodal.data.formats import open_dataset
from medmodal.data.formats.brats import canonical_modality
from medmodal.data.io import staged_output_dir
from medmodal.registration.multi_atlas import (
    PairJob,
    PairResult,
    init_worker,
    manifest_text,
    run_pair,
    run_pair_reporting,
)
from medmodal.registration.progress import Throttle
from medmodal.registration.sitk import RegistrationSettings

__all__ = ["RegistrationSummary", "choose_modalities", "register_atlases"]

log = logging.getLogger(__name__)


@dataclass
class RegistrationSummary:
    """What :func:`register_atlases` did.

    Attributes:
        out: the output folder.
        manifest: ``out/manifest.csv``.
        pairs: one :class:`~medmodal.registration.multi_atlas.PairResult` per pair (targets, then atlases, in
            data-set order), label paths under ``out``.
        settings: the contents of ``out/registration.json``.
    """

    out: Path
    manifest: Path
    pairs: list[PairResult]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> list[PairResult]:
        return [p for p in self.pairs if p.ok]

    @property
    def failed(self) -> list[PairResult]:
        return [p for p in self.pairs if not p.ok]

    @property
    def median_seconds(self) -> float | None:
        """Median wall time of the successful pairs."""
        return statistics.median(p.seconds for p in self.ok) if self.ok else None

    @property
    def mean_dice(self) -> float | None:
        """Mean foreground Dice to the targets' own labels, over the pairs where it is known."""
        known = [p.dice_to_reference for p in self.ok if p.dice_to_reference is not None]
        return statistics.fmean(known) if known else None


def _pick(name: str | None, info: DatasetInfo, *, option: str, role: str) -> str | None:
    if name is None:
        return None
    modality = canonical_modality(name)
    if modality not in info.modalities:
        raise DataError(f"{option} {name!r}: the {role} data set has no such modality; it has {list(info.modalities)}")
    return modality


def choose_modalities(
    atlas_info: DatasetInfo, target_info: DatasetInfo, *, atlas_modality: str | None, target_modality: str | None
) -> tuple[str, str]:
    """The atlas and target modalities to register.

    A given name must be one of its data set's modalities (aliases such as ``t1ce`` are understood). An omitted
    one is the other side's name when its data set has it, else the first modality both data sets share.
    Different contrasts (atlas ``t1c`` → target ``t2``) are allowed: the metric is mutual information.
    """
    atlas = _pick(atlas_modality, atlas_info, option="--atlas-modality", role="atlas")
    target = _pick(target_modality, target_info, option="--target-modality", role="target")
    shared = [m for m in atlas_info.modalities if m in target_info.modalities]
    if atlas is None:
        atlas = target if target in atlas_info.modalities else (shared[0] if shared else None)
    if target is None:
        target = atlas if atlas in target_info.modalities else (shared[0] if shared else None)
    if atlas is None or target is None:
        raise DataError(
            f"the atlases have modalities {list(atlas_info.modalities)} and the targets "
            f"{list(target_info.modalities)}, none in common; choose them with --atlas-modality and "
            "--target-modality"
        )
    return atlas, target


def _open(path: Path, *, role: str) -> tuple[DatasetInfo, list[CaseRecord]]:
    try:
        info, records = open_dataset(path)
    except DataError as err:
        raise DataError(f"{role} data set: {err}") from None
    if not records:
        raise DataError(f"{role} data set {path}: holds no cases")
    return info, records


def _versions() -> dict[str, str]:
    import numpy
    import SimpleITK

    import medmodal

    return {"medmodal": medmodal.__version__, "SimpleITK": SimpleITK.Version_VersionString(),
            "numpy": numpy.__version__, "python": platform.python_version()}


def _pool_context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes, never a fork of this one (it may hold ITK, torch or progress-bar threads).

    A fork server imports medmodal's registration code once and forks every worker from that clean process;
    where there is none (Windows), workers are spawned.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["medmodal.registration.multi_atlas"])
    return context


def _run_jobs(
    jobs: list[PairJob], *, workers: int, threads: int, on_done: Callable[[int, PairResult], None],
    on_iteration: Callable[[int, str, int, int], None] | None = None,
) -> list[PairResult]:
    """Run ``jobs`` (in-process for one worker, else in a process pool); results in job order.

    ``on_done(i, result)`` follows each finished job; ``on_iteration(i, stage, done, total)`` the optimiser
    iterations of job ``i`` (throttled; from the workers through a queue that a thread of this process drains).
    """
    if workers == 1:
        results = []
        for i, job in enumerate(jobs):
            report = None if on_iteration is None else Throttle(functools.partial(on_iteration, i))
            results.append(run_pair(replace(job, threads=threads), on_iteration=report))
            on_done(i, results[-1])
        return results
    done: dict[int, PairResult] = {}
    context = _pool_context()
    queue = context.Queue() if on_iteration is not None else None
    drain = None
    if queue is not None:
        drain = threading.Thread(target=_drain, args=(queue, on_iteration), daemon=True)
        drain.start()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=init_worker,
                               initargs=(threads, queue))
    try:
        futures: dict[Future[PairResult], int] = {
            pool.submit(run_pair_reporting, replace(job, threads=threads), i): i for i, job in enumerate(jobs)
        }
        for future in as_completed(futures):
            i = futures[future]
            try:
                done[i] = future.result()
            except Exception as err:  # the worker died (e.g. out of memory): the pair failed
                job = jobs[i]
                done[i] = PairResult(job.target.case_id, job.atlas.case_id, None,
                                     job.target.images.get(job.target_modality), None, 0.0, "failed",
                                     f"worker process failed: {type(err).__name__}: {err}", None)
            on_done(i, done[i])
    except BaseException:  # interrupted: do not wait for the queued pairs
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if queue is not None and drain is not None:
            queue.put(None)
            drain.join(timeout=5)
    pool.shutdown()
    return [done[i] for i in range(len(jobs))]


def _drain(queue: Any, on_iteration: Callable[[int, str, int, int], None]) -> None:
    while (item := queue.get()) is not None:
        on_iteration(*item)


def _progress(
    jobs: list[PairJob], enabled: bool
) -> tuple[Callable[[int, PairResult], None], Callable[[int, str, int, int], None] | None, Callable[[], None]]:
    """Per-pair callbacks (rich progress bars, or log lines) and a function that closes the display.

    Returns ``(on_done, on_iteration, close)``: with ``enabled``, one overall bar plus one line per running
    pair that follows its optimiser (stage and iterations); else ``on_iteration`` is ``None``.
    """
    count = [0]
    total = len(jobs)

    def report(result: PairResult) -> None:
        count[0] += 1
        if not result.ok:
            log.warning("pair %s <- %s failed: %s", result.target, result.atlas, result.error)
        else:  # the progress bar already shows each pair
            log.log(logging.DEBUG if enabled else logging.INFO, "[%d/%d] %s <- %s: %.1f s, MI %.3f", count[0],
                    total, result.target, result.atlas, result.seconds, result.metric)

    if not enabled:
        return lambda i, result: report(result), None, lambda: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.fields[what]}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.description}"))
    overall = bar.add_task("", total=total, what="registering")
    running: dict[int, Any] = {}
    lock = threading.Lock()

    def advance(i: int, result: PairResult) -> None:
        report(result)
        with lock:
            if i in running:
                bar.remove_task(running.pop(i))
        bar.update(overall, advance=1, description=f"{result.target} <- {result.atlas}: {result.status}")

    def iteration(i: int, stage: str, done: int, stage_total: int) -> None:
        with lock:
            if i not in running:
                running[i] = bar.add_task("", total=None, what=f"  {jobs[i].target.case_id} <- "
                                                              f"{jobs[i].atlas.case_id}")
            bar.update(running[i], completed=done, total=stage_total, description=f"{stage} iteration {done}")

    return advance, iteration, bar.stop


def _jobs(
    atlases: Iterable[CaseRecord], targets: Iterable[CaseRecord], stage: Path, **common: Any
) -> list[PairJob]:
    jobs = []
    for target in targets:
        for atlas in atlases:
            same = (atlas.images.get(common["atlas_modality"]) is not None
                    and atlas.images.get(common["atlas_modality"]) == target.images.get(common["target_modality"]))
            if same:  # the same image on both sides (atlases used as targets): nothing to learn
                continue
            path = stage / "labels" / target.case_id / f"{atlas.case_id}.nii.gz"
            jobs.append(PairJob(atlas=atlas, target=target, label_path=path, **common))
    return jobs


def register_atlases(
    atlases: Path | str,
    targets: Path | str,
    out: Path | str,
    *,
    atlas_modality: str | None = None,
    target_modality: str | None = None,
    transform: Literal["affine", "bspline", "demons"] = "bspline",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> RegistrationSummary:
    """Register every atlas onto every target and write the warped atlas labels (see the module doc).

    Args:
        atlases: a data set (BraTS folder, nnU-Net raw folder or manifest) whose cases all have labels.
        targets: a data set with or without labels; a target label only serves ``dice_to_reference``.
        out: output folder; must be missing or empty unless ``overwrite``.
        atlas_modality, target_modality: which images to register (see :func:`choose_modalities`); they may be
            different contrasts.
        transform: ``"affine"``, ``"bspline"`` (default) or ``"demons"`` (same contrast only); see
            :mod:`medmodal.registration.sitk`.
        workers: parallel processes (default ``min(4, cpu count, pairs)``); each gets ``cpu // workers``
            SimpleITK threads. ``1`` runs in this process. With more than one worker, a script that calls this
            needs an ``if __name__ == "__main__":`` guard (workers are fresh processes that import it).
        overwrite: replace the contents of a non-empty ``out``.
        progress: show progress bars: the pairs done, and each running pair's optimiser stage and iterations
            (else log one line per pair).
        **options: further :class:`~medmodal.registration.sitk.RegistrationSettings` fields, e.g.
            ``iterations=50``, ``shrink_factors=(2, 1)``, ``smoothing_sigmas=(1, 0)``, ``seed=1``.

    Returns:
        A :class:`RegistrationSummary`. Pairs whose atlas and target are the same image file are skipped.

    Raises:
        DataError: missing or unreadable data set, an atlas without a label (all are named), unknown modality,
            bad settings, non-empty ``out``, or every pair failed.
    """
    from medmodal.atomic import atomic_write_text  # deferred: worker processes import this module cheaply

    atlases, targets, out = Path(atlases), Path(targets), Path(out)
    if workers is not None and workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    try:
        settings = RegistrationSettings(transform=transform, **options)
    except ValueError as err:
        raise DataError(str(err)) from None
    atlas_info, atlas_records = _open(atlases, role="atlas")
    target_info, target_records = _open(targets, role="target")
    unlabelled = [r.case_id for r in atlas_records if r.label is None]
    if unlabelled:
        raise DataError(f"atlas data set {atlases}: {len(unlabelled)} case(s) have no label: "
                        f"{', '.join(unlabelled)}; every atlas needs a label map")
    atlas_mod, target_mod = choose_modalities(atlas_info, target_info, atlas_modality=atlas_modality,
                                              target_modality=target_modality)
    cpus = os.cpu_count() or 1
    with staged_output_dir(out, overwrite=overwrite) as stage:
        jobs = _jobs(atlas_records, target_records, stage, atlas_info=atlas_info, target_info=target_info,
                     atlas_modality=atlas_mod, target_modality=target_mod, settings=settings)
        if not jobs:
            raise DataError(f"no atlas/target pair to register: {atlases} and {targets} hold the same images")
        n_workers = max(1, min(workers or min(4, cpus), len(jobs)))
        threads = max(1, cpus // n_workers)
        log.info("registering %d atlas(es) onto %d target(s) (%s -> %s, %s): %d pairs, %d worker(s)",
                 len(atlas_records), len(target_records), atlas_mod, target_mod, transform, len(jobs), n_workers)
        on_done, on_iteration, close = _progress(jobs, progress)
        try:
            results = _run_jobs(jobs, workers=n_workers, threads=threads, on_done=on_done, on_iteration=on_iteration)
        finally:
            close()
        failed = [r for r in results if not r.ok]
        if len(failed) == len(results):
            shown = "\n".join(f"  - {r.target} <- {r.atlas}: {r.error}" for r in failed[:5])
            raise DataError(f"all {len(results)} registration pair(s) failed; nothing written to {out}:\n{shown}")
        record = {
            "atlases": str(atlases.resolve()), "targets": str(targets.resolve()),
            "atlas_modality": atlas_mod, "target_modality": target_mod,
            "atlas_cases": len(atlas_records), "target_cases": len(target_records),
            "pairs": len(results), "ok": len(results) - len(failed), "failed": len(failed),
            "workers": n_workers, "threads_per_worker": threads, "settings": settings.as_dict(),
            "metric": "Mattes mutual information, SimpleITK sign (negative; lower is better)",
            "versions": _versions(), "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        atomic_write_text(stage / "manifest.csv", manifest_text(results, root=stage))
        atomic_write_text(stage / "registration.json", json.dumps(record, indent=2) + "\n")
    final = [r if r.label is None else replace(r, label=out / Path(r.label).relative_to(stage)) for r in results]
    return RegistrationSummary(out=out, manifest=out / "manifest.csv", pairs=final, settings=record)
