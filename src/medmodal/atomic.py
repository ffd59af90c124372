"""Atomic file writes: the one place medmodal writes a file that must never be seen half-written.

Every writer stages its bytes in a temporary file in the destination's own folder (same file system), flushes it
and moves it over the destination with :func:`os.replace`, so a reader sees the old file or the new one, never a
mixture, and an interrupted write leaves the old file intact and no temporary file behind.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the body succeeds, move it onto ``path``.

    For writers that take a file name (``safetensors.save_file``, ``torch.save``, ``savefig``). The temporary
    name keeps ``path``'s suffix, so writers that pick a format by suffix still work. On failure the temporary
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """Call ``write(f)`` on a binary file staged beside ``path``, then move it onto ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        write(f)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text (the :mod:`csv` module's quoting, ``\\r\\n`` line ends) of a header and rows."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(header))
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path | str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file atomically (quotes, commas and new lines in values are escaped by :mod:`csv`)."""
    return atomic_write_text(path, csv_text(header, rows))


def read_csv(path: Path | str) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line, as dicts of strings."""
    with Path(path).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))
