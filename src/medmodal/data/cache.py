"""Preprocess a dataset once and cache it as uncompressed ``.npy`` arrays that patch sampling memory-maps.

Layout of ``cache_dir``::

    cache.json         index: dataset info, parameters, source fingerprint, case entries (written last)
    <case_id>_img.npy  (M, *S) float32, zeros for missing modalities
    <case_id>_seg.npy  (*S) uint8 (labelled cases only)
    <case_id>_fg.npz   up to ``FOREGROUND_SAMPLES`` voxel coordinates (N, D) per label class (oversampling)

Every file is written through :func:`medmodal.atomic.atomic_write` (a temporary file, then :func:`os.replace`),
so an interrupted build never leaves a half-written array behind a valid name. A cache whose parameters and
source match is reused: case by case (record paths + sizes + mtimes, or a content hash for in-memory cases), or
wholesale when the caller passes the same ``fingerprint`` string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from medmodal.atomic import atomic_write
from medmodal.data.case import Case, CaseRecord, DataError, DatasetInfo
from medmodal.data.preprocess import CaseGeometry, HistogramClip, preprocess_case

FORMAT_VERSION = 1
INDEX_NAME = "cache.json"
#: at most this many foreground voxel coordinates are stored per label class (nnU-Net keeps 10k).
FOREGROUND_SAMPLES = 10_000
log = logging.getLogger(__name__)


@dataclass(eq=False)
class CachedCase:
    """One preprocessed case in a cache (cheap to pickle: arrays are opened on demand).

    Attributes:
        case_id: the case identifier.
        available: ``(M,) bool`` which modalities are present.
        target: class index or ``None``; report: report text or ``None``.
        geometry: how to map arrays on this case's grid back to its input grid.
        paths: ``"image"``, and for labelled cases ``"label"`` and ``"foreground"``, → file.
    """

    case_id: str
    available: np.ndarray
    target: int | None
    report: str | None
    geometry: CaseGeometry
    paths: dict[str, Path]

    def __eq__(self, other: object) -> bool:
        fields = ("case_id", "target", "report", "geometry", "paths")
        return (
            isinstance(other, CachedCase)
            and all(getattr(self, f) == getattr(other, f) for f in fields)
            and np.array_equal(self.available, other.available)
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``S`` of the cached arrays."""
        return self.geometry.shape

    def image(self) -> np.ndarray:
        """``(M, *S) float32`` read-only memory map."""
        return _load(self.paths["image"])

    def label(self) -> np.ndarray | None:
        """``(*S) uint8`` read-only memory map, or ``None`` for an unlabelled case."""
        return _load(self.paths["label"]) if "label" in self.paths else None

    def foreground(self) -> dict[int, np.ndarray]:
        """Label value → ``(N, D) int32`` voxel coordinates (a random subset); ``{}`` if unlabelled."""
        if "foreground" not in self.paths:
            return {}
        try:
            with np.load(self.paths["foreground"]) as z:
                return {int(k.split("_")[1]): z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise DataError(f"{self.paths['foreground']}: unreadable ({err}); rebuild the cache") from err


@dataclass
class CacheIndex:
    """The cases of one cache folder. Build with :func:`build_cache`, reopen with :meth:`load`."""

    info: DatasetInfo
    cases: list[CachedCase]
    target_spacing: tuple[float, ...] | None
    root: Path

    @classmethod
    def load(cls, cache_dir: Path | str) -> CacheIndex:
        """Open the cache in ``cache_dir``; :class:`DataError` if missing, corrupt or of another version."""
        root = Path(cache_dir)
        doc = _read_index(root)
        if doc is None:
            raise DataError(f"{root / INDEX_NAME}: no preprocessed cache here; build it with build_cache()")
        return _index_from_doc(doc, root)

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[CachedCase]:
        return iter(self.cases)

    def subset(self, case_ids: Iterable[str]) -> CacheIndex:
        """A view with only ``case_ids`` (in that order); :class:`DataError` for an unknown id."""
        by_id = {c.case_id: c for c in self.cases}
        ids = list(case_ids)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{self.root / INDEX_NAME}: no cached case(s) {missing[:5]}")
        return replace(self, cases=[by_id[i] for i in ids])


def build_cache(
    cases: Iterable[Case] | Sequence[CaseRecord],
    info: DatasetInfo,
    cache_dir: Path | str,
    *,
    target_spacing: Sequence[float] | None = None,
    histogram_clip: HistogramClip | None = None,
    fingerprint: str | None = None,
    progress: bool = False,
    num_workers: int = 0,
) -> CacheIndex:
    """Preprocess every case (:func:`~medmodal.data.preprocess.preprocess_case`) into ``cache_dir``.

    Args:
        cases: in-memory cases, or records read lazily with :func:`medmodal.data.io.read_case`.
        info: the dataset; ``info.modalities`` fixes the ``M`` axis.
        cache_dir: output folder (created). An existing cache with other parameters is rebuilt in place.
        target_spacing: voxel size (mm) per canonical axis, or ``None`` to keep each case's spacing.
        histogram_clip: clip each modality's bright tail before the z-score, or ``None`` (the default) not to.
        fingerprint: a string identifying the source (e.g. ``"phantom-seed0-n8"``). If the cache was built
            with the same fingerprint and parameters it is returned without touching ``cases``.
        progress: show a rich progress bar.
        num_workers: preprocess in this many processes (0 = in this process).

    Returns:
        the :class:`CacheIndex` of the folder.
    """
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    params = {
        "format_version": FORMAT_VERSION,
        "modalities": list(info.modalities),
        "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
    }
    if histogram_clip is not None:  # absent when off, so caches built before the option stay valid
        params["histogram_clip"] = histogram_clip.to_dict()
    old = _read_index(root)
    previous = {e["case_id"]: e for e in old["cases"]} if old is not None else {}
    reusable: dict[str, dict] = {}
    if old is not None and old.get("params") != params:
        log.warning("cache %s was built with %s; rebuilding it with %s", root, old.get("params"), params)
    elif old is not None:
        if fingerprint is not None and old.get("fingerprint") == fingerprint and _files_exist(old, root):
            return _index_from_doc(old, root)
        reusable = previous

    items = list(cases) if isinstance(cases, Sequence) else cases
    total = len(items) if isinstance(items, Sequence) else None
    entries: list[dict] = []
    with ProgressCounter(progress, total) as advance:
        for entry in _run(items, info, root, params, reusable, num_workers):
            entries.append(entry)
            advance()
    doc = {"params": params, "fingerprint": fingerprint, "info": _info_to_dict(info), "cases": entries}
    atomic_write(root / INDEX_NAME, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    kept = {e["case_id"] for e in entries}
    for case_id, e in previous.items():  # cases that left the data set leave the cache
        if case_id not in kept:
            for name in e["files"].values():
                (root / name).unlink(missing_ok=True)
    return _index_from_doc(doc, root)


def _run(
    items: Iterable, info: DatasetInfo, root: Path, params: dict, old: dict, workers: int
) -> Iterator[dict]:
    """Yield one index entry per item, reusing unchanged cases, in input order.

    Before the first array is (re)written the old index is removed, so an interrupted build never leaves an
    index that describes arrays it did not write.
    """
    ts = params["target_spacing"]
    clip = HistogramClip.from_dict(params.get("histogram_clip"))
    seen: set[str] = set()
    jobs = ((item, _source_key(item)) for item in items if _check_id(item.case_id, root, seen))
    if workers <= 0:
        for item, key in jobs:
            reused = _reusable(old.get(item.case_id), key, root)
            if reused is None:
                (root / INDEX_NAME).unlink(missing_ok=True)
            yield reused or _process(item, key, info, root, ts, clip)
        return
    window = 2 * workers  # bounded look-ahead so a generator of cases is not materialised at once
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending: list[Future | dict] = []
        for item, key in jobs:
            reused = _reusable(old.get(item.case_id), key, root)
            if reused is None:
                (root / INDEX_NAME).unlink(missing_ok=True)
            pending.append(reused or pool.submit(_process, item, key, info, root, ts, clip))
            while len(pending) >= window:
                head = pending.pop(0)
                yield head if isinstance(head, dict) else head.result()
        for head in pending:
            yield head if isinstance(head, dict) else head.result()


def _process(
    item: Case | CaseRecord, key: str, info: DatasetInfo, root: Path, ts: list | None, clip: HistogramClip | None
) -> dict:
    """Read (if a record), preprocess and write one case; return its index entry."""
    if isinstance(item, CaseRecord):
        from medmodal.data.io import read_case

        case = read_case(item, info)
    else:
        case = item
    info.check_modalities(list(case.images), where=f"case {case.case_id!r}")
    image, label, available, geometry = preprocess_case(case, info.modalities, target_spacing=ts, histogram_clip=clip)
    files = {"image": f"{case.case_id}_img.npy"}
    atomic_write(root / files["image"], lambda f: np.save(f, image))
    if label is not None:
        files["label"] = f"{case.case_id}_seg.npy"
        files["foreground"] = f"{case.case_id}_fg.npz"
        atomic_write(root / files["label"], lambda f: np.save(f, label))
        fg = _foreground_locations(label, seed=zlib.crc32(case.case_id.encode()))
        arrays = {f"class_{k}": v for k, v in fg.items()}
        atomic_write(root / files["foreground"], lambda f: np.savez(f, **arrays))
    return {
        "case_id": case.case_id,
        "available": available.tolist(),
        "target": case.target,
        "report": case.report,
        "geometry": geometry.to_dict(),
        "source": key,
        "files": files,
    }


def _foreground_locations(label: np.ndarray, *, seed: int) -> dict[int, np.ndarray]:
    """Label value → up to :data:`FOREGROUND_SAMPLES` random ``(N, D) int32`` coordinates of that class."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in np.unique(label):
        if value == 0:
            continue
        coords = np.argwhere(label == value).astype(np.int32)
        if len(coords) > FOREGROUND_SAMPLES:
            coords = coords[np.sort(rng.choice(len(coords), FOREGROUND_SAMPLES, replace=False))]
        out[int(value)] = coords
    return out


def _source_key(item: Case | CaseRecord) -> str:
    """Identity of a case's source: file paths + sizes + mtimes for a record, a content hash for a case."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((item.case_id, item.target, item.report)).encode())
    if isinstance(item, CaseRecord):
        for name, path in sorted({**item.images, "<label>": item.label}.items()):
            if path is not None:
                st = Path(path).stat()
                h.update(repr((name, str(Path(path).resolve()), st.st_size, st.st_mtime_ns)).encode())
        return "files:" + h.hexdigest()
    volumes = sorted(item.images.items()) + ([("<label>", item.label)] if item.label is not None else [])
    for name, vol in volumes:
        arr = np.ascontiguousarray(vol.array)
        h.update(repr((name, arr.dtype.str, arr.shape)).encode())
        h.update(np.asarray(vol.affine, dtype=np.float64).tobytes())
        h.update(memoryview(arr).cast("B"))
    return "content:" + h.hexdigest()


def _check_id(case_id: str, root: Path, seen: set[str]) -> bool:
    """Raise :class:`DataError` for a case id that repeats or is not a safe file name stem."""
    if not case_id or case_id.startswith(".") or any(c in case_id for c in "/\\\0"):
        raise DataError(f"{root}: case id {case_id!r} cannot be used as a file name in the cache")
    if case_id in seen:
        raise DataError(f"{root}: duplicate case id {case_id!r}; case ids must be unique")
    seen.add(case_id)
    return True


def _reusable(entry: dict | None, key: str, root: Path) -> dict | None:
    if entry is None or entry.get("source") != key:
        return None
    return entry if all((root / n).is_file() for n in entry["files"].values()) else None


def _files_exist(doc: dict, root: Path) -> bool:
    return all((root / n).is_file() for e in doc["cases"] for n in e["files"].values())


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot memory-map the cached array ({err}); rebuild the cache") from err


def _read_index(root: Path) -> dict | None:
    path = root / INDEX_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: corrupt cache index ({err}); delete the folder and rebuild") from err
    version = doc.get("params", {}).get("format_version")
    if version != FORMAT_VERSION:
        log.warning("%s: cache format %s, expected %s; it will be rebuilt", path, version, FORMAT_VERSION)
    return doc


def _info_to_dict(info: DatasetInfo) -> dict:
    return {
        "name": info.name,
        "modalities": list(info.modalities),
        "labels": list(info.labels),
        "regions": {k: list(v) for k, v in info.regions.items()},
        "synthetic": info.synthetic,
    }


def _index_from_doc(doc: dict, root: Path) -> CacheIndex:
    if doc.get("params", {}).get("format_version") != FORMAT_VERSION:
        raise DataError(f"{root / INDEX_NAME}: cache format is not version {FORMAT_VERSION}; rebuild it")
    i = doc["info"]
    info = DatasetInfo(
        name=i["name"],
        modalities=tuple(i["modalities"]),
        labels=tuple(i["labels"]),
        regions={k: tuple(v) for k, v in i["regions"].items()},
        synthetic=bool(i["synthetic"]),
    )
    cases = [
        CachedCase(
            case_id=e["case_id"],
            available=np.asarray(e["available"], dtype=bool),
            target=e["target"],
            report=e["report"],
            geometry=CaseGeometry.from_dict(e["geometry"]),
            paths={k: root / n for k, n in e["files"].items()},
        )
        for e in doc["cases"]
    ]
    ts = doc["params"]["target_spacing"]
    return CacheIndex(info=info, cases=cases, target_spacing=None if ts is None else tuple(ts), root=root)


class ProgressCounter:
    """Context manager yielding an ``advance()`` callable; a rich progress bar titled ``description`` when
    enabled (the caches of the data layer use it)."""

    def __init__(self, enabled: bool, total: int | None, *, description: str = "preprocessing") -> None:
        self.enabled, self.total, self.bar, self.description = enabled, total, None, description

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
