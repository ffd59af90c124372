"""The images of a run as an image collection (``medmodal.data.collections``), whichever way a recipe names them.

Two sources (:func:`image_source`):

* a folder of images or a collection manifest: any mix of 2D and 3D images, formats and spacings, each image its
  own unit of the train/validation split;
* a data set of cases (``data`` section, the phantom by default): every modality of every case is one image
  ``<case>/<modality>``, and cases, not images, are the units of the split, so the modalities of one case never
  straddle it.

Used by the methods that pretrain on unlabelled images of any kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medmodal.data.case import CaseRecord
from medmodal.data.collections import ImageRecord
from medmodal.engine.recipe import DataConfig


def collection_records(records: Sequence[CaseRecord], modalities: Sequence[str]) -> list[ImageRecord]:
    """One :class:`ImageRecord` per (case, modality): ``image_id`` ``<case>/<modality>``, tagged by modality."""
    return [ImageRecord(image_id=f"{r.case_id}/{m}", path=Path(r.images[m]), modality=m)
            for r in records for m in modalities if m in r.images]


def case_of(image_id: str) -> str:
    """The case id of a collection image made by :func:`collection_records`."""
    return image_id.rsplit("/", 1)[0]


def _own_group(image_id: str) -> str:
    return image_id


@dataclass(frozen=True)
class ImageSource:
    """Where a PUMIT run's images come from.

    Attributes:
        images: ``() -> [ImageRecord]`` (lists the images; reads none).
        group: the unit of the train/validation split of an image id (its case, or the image itself).
        cache_dir: the collection cache is ``<cache_dir>/collection``.
        modalities: the modality tags (recorded in ``run.json``).
        synthetic: whether the images are medmodal's phantom.
        description: one line for reports (``"the cases of ..."`` / ``"the collection ..."``).
    """

    images: Callable[[], list[ImageRecord]]
    group: Callable[[str], str]
    cache_dir: Path
    modalities: tuple[str, ...]
    synthetic: bool
    description: str


def image_source(data_cfg: DataConfig, collection: Path | None, *, modality: str | None = None) -> ImageSource:
    """The :class:`ImageSource` of a recipe's ``data`` section and its ``method.collection`` (``modality``: the tag
    of a collection's images that name none, e.g. images directly in its folder).

    Raises:
        DataError / DataErrors: a collection that does not exist or lists no usable image (every problem named).
    """
    from medmodal.data.collections import list_collection
    from medmodal.engine.datamodule import cache_key, cache_root, resolve_source

    if collection is None:
        source = resolve_source(data_cfg)

        def case_images() -> list[ImageRecord]:
            return collection_records(source.records()[1], source.modalities)

        return ImageSource(images=case_images, group=case_of, cache_dir=source.cache_dir,
                           modalities=tuple(source.modalities), synthetic=bool(source.info.synthetic),
                           description=f"every modality of every case of {data_cfg.path or 'the phantom'}")
    path = Path(collection).expanduser().resolve()
    records = list_collection(path, modality=modality)
    cache_dir = data_cfg.cache_dir or cache_root() / "collections" / cache_key(str(path))
    return ImageSource(images=lambda: records, group=_own_group, cache_dir=Path(cache_dir),
                       modalities=tuple(sorted({r.modality for r in records})), synthetic=False,
                       description=f"the collection {path} ({len(records)} images)")
