"""The cache of a prepared image collection: memory-mapped ``.npy`` arrays and an index, rebuilt per changed image.

Layout of ``cache_dir``::

    collection.json   index: parameters and one entry per image (written last, atomically)
    <hash>.npy        (C, X, Y, Z) array of one image (float16 or float32, in [0, 1]; C = 1 grey, 3 RGB),
                      memory-mapped on read

Every file is written through :func:`medmodal.atomic.atomic_write`. An image is prepared again
(:func:`~medmodal.data.collections.prepare_image`) only when its source changed (path + size + modification time of
the file, or of every file of a DICOM series folder) or its spacing override or intensity mapping changed; a cache
built with other parameters is rebuilt; images that left the collection leave the cache.

Format versions: 1 stored ``(X, Y, Z)`` grey arrays (colour pictures were refused); 2 stores ``(C, X, Y, Z)`` and
keeps colour. A version-1 cache is rebuilt by :func:`build_collection_cache` and refused by
:meth:`CollectionIndex.load`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmodal.atomic import atomic_write
from medmodal.data.cache import ProgressCounter
from medmodal.data.case import DataError
from medmodal.data.collections import (
    DEFAULT_PERCENTILES,
    INDEX_NAME,
    MAX_DA,
    ImageRecord,
    prepare_image,
    read_collection_image,
    to_channels,
)
from medmodal.data.io import DataErrors

__all__ = ["CachedImage", "CollectionIndex", "build_collection_cache"]

#: 2: ``(C, X, Y, Z)`` arrays, colour kept (1: ``(X, Y, Z)`` grey only).
FORMAT_VERSION = 2
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedImage:
    """One prepared image in a collection cache (cheap to pickle: the array is opened on demand).

    Attributes:
        image_id, source, modality, dataset: from the :class:`ImageRecord`.
        path: the ``.npy`` file, ``(C, X, Y, Z)``.
        shape: the spatial shape ``(X, Y, Z)``; spacing: ``(s_x, s_y, s_z)`` mm; spatial_dims: 2 or 3; da: degree
            of anisotropy.
        channels: 1 (grey) or 3 (RGB: a colour picture).
    """

    image_id: str
    source: Path
    modality: str
    dataset: str
    path: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    spatial_dims: int
    da: int
    channels: int = 1

    def data(self) -> np.ndarray:
        """The ``(C, X, Y, Z)`` read-only memory map (float16 or float32, as cached)."""
        try:
            return np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"{self.path}: cannot memory-map the cached image of {self.source} ({err}); rebuild "
                            "the cache") from err

    def array(self) -> np.ndarray:
        """The grey ``(X, Y, Z)`` image: the memory map of a grey image's one channel (no copy); a colour image's
        BT.601 luma (:func:`~medmodal.data.collections.to_channels`), computed as float32. :meth:`data` holds
        every channel."""
        data = self.data()
        return data[0] if self.channels == 1 else to_channels(data, 1)[0]


@dataclass
class CollectionIndex:
    """The images of one collection cache. Build with :func:`build_collection_cache`, reopen with :meth:`load`."""

    images: list[CachedImage]
    root: Path
    params: dict = field(default_factory=dict)

    @classmethod
    def load(cls, cache_dir: Path | str) -> CollectionIndex:
        """Open the cache in ``cache_dir``; :class:`DataError` when it is missing, corrupt or of another version."""
        root = Path(cache_dir)
        doc = _read_index(root)
        if doc is None:
            raise DataError(f"{root / INDEX_NAME}: no collection cache here; build it with build_collection_cache()")
        if doc.get("params", {}).get("format_version") != FORMAT_VERSION:
            raise DataError(f"{root / INDEX_NAME}: collection cache format is not version {FORMAT_VERSION}; rebuild "
                            "it")
        return _index(doc, root)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[CachedImage]:
        return iter(self.images)


def build_collection_cache(
    records: Iterable[ImageRecord],
    cache_dir: Path | str,
    *,
    natural: Collection[str] = (),
    dtype: str = "float16",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    max_da: int = MAX_DA,
    skip_bad: bool = False,
    progress: bool = False,
) -> CollectionIndex:
    """Prepare every image (:func:`prepare_image`) into ``cache_dir``, reusing those whose source is unchanged.

    Args:
        records: the images (:func:`list_collection`).
        cache_dir: the cache folder (created). A cache built with other ``dtype``, ``percentiles`` or ``max_da``
            is rebuilt in place.
        natural: datasets of 8-bit natural pictures, mapped by ``/ 255`` instead of the percentiles.
        dtype: ``"float16"`` (half the disk and page cache; 2^-11 relative precision in [0, 1]) or ``"float32"``.
        percentiles: the intensity percentiles mapped to 0 and 1.
        max_da: the DA of a 2D image and the DA clip.
        skip_bad: leave out images that cannot be prepared (logged as warnings) instead of raising.
        progress: show a rich progress bar.

    Returns:
        The :class:`CollectionIndex`, images in the order of ``records``.

    Raises:
        DataErrors: every image that could not be read or prepared (unless ``skip_bad``); the index of the good
            ones is written first, so the next build reuses them.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    params = {"format_version": FORMAT_VERSION, "dtype": dtype, "percentiles": [float(p) for p in percentiles],
              "max_da": int(max_da)}
    old = _read_index(root)
    previous = {e["source"]: e for e in old["images"]} if old is not None else {}
    reusable = previous
    if old is not None and old.get("params") != params:
        log.warning("collection cache %s was built with %s; rebuilding it with %s", root, old.get("params"), params)
        reusable = {}
    records = list(records)
    entries: list[dict] = []
    problems: list[tuple[str | None, Path | None, str]] = []
    seen: set[str] = set()
    with ProgressCounter(progress, len(records), description="preparing images") as advance:
        for record in records:
            advance()
            source = str(record.path.resolve())
            if source in seen:
                problems.append((record.image_id, record.path, f"{record.path}: is listed twice; list each image "
                                                               "once"))
                continue
            seen.add(source)
            is_natural = record.dataset in natural
            key = _source_key(record, is_natural)
            entry = reusable.get(source)
            if entry is not None and entry["key"] == key and (root / entry["file"]).is_file():
                entries.append({**entry, "image_id": record.image_id, "modality": record.modality,
                                "dataset": record.dataset})
                continue
            (root / INDEX_NAME).unlink(missing_ok=True)  # never leave an index describing arrays being rewritten
            try:
                prepared = prepare_image(read_collection_image(record.path), spacing=record.spacing, natural=is_natural,
                                         percentiles=percentiles, max_da=max_da)
            except DataError as err:
                problems.append((record.image_id, record.path, str(err)))
                continue
            file = hashlib.blake2b(source.encode(), digest_size=10).hexdigest() + ".npy"
            data = prepared.array.astype(dtype)
            atomic_write(root / file, lambda f, data=data: np.save(f, data))
            entries.append({"image_id": record.image_id, "source": source, "key": key, "modality": record.modality,
                            "dataset": record.dataset, "file": file, "shape": list(prepared.shape),
                            "channels": prepared.channels, "spacing": list(prepared.spacing),
                            "spatial_dims": prepared.spatial_dims, "da": prepared.da})
    doc = {"params": params, "images": entries}
    atomic_write(root / INDEX_NAME, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    kept = {e["file"] for e in entries}
    for e in previous.values():  # images that left the collection (or failed now) leave the cache
        if e["file"] not in kept:
            (root / e["file"]).unlink(missing_ok=True)
    if problems and not skip_bad:
        raise DataErrors(problems, where=f"{root}: collection cache")
    for _, _, message in problems:
        log.warning("left out: %s", message)
    return _index(doc, root)


def _source_key(record: ImageRecord, natural: bool) -> str:
    """Path + size + mtime of the image file (or of every file of a series folder) and how it is prepared."""
    h = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in record.path.iterdir() if p.is_file()) if record.path.is_dir() else [record.path]
    for p in files:
        st = p.stat()
        h.update(repr((str(p.resolve()), st.st_size, st.st_mtime_ns)).encode())
    h.update(repr((record.spacing, natural)).encode())
    return h.hexdigest()


def _read_index(root: Path) -> dict | None:
    path = root / INDEX_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: corrupt collection index ({err}); delete the folder and rebuild") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: is not a collection index; delete the folder and rebuild")
    return doc


def _index(doc: dict, root: Path) -> CollectionIndex:
    images = [
        CachedImage(image_id=e["image_id"], source=Path(e["source"]), modality=e["modality"], dataset=e["dataset"],
                    path=root / e["file"], shape=tuple(int(s) for s in e["shape"]),
                    spacing=tuple(float(s) for s in e["spacing"]), spatial_dims=int(e["spatial_dims"]),
                    da=int(e["da"]), channels=int(e["channels"]))
        for e in doc["images"]
    ]
    return CollectionIndex(images=images, root=root, params=dict(doc["params"]))
