"""Durable file writes: a reader sees the old file or the new one, never half of one, and once the call returns the
new one survives a crash (its bytes and the directory entry that names it are on disk)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to disk (not atomic: for files in a directory published later)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_durably(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a synced temporary file beside it, renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_synced(tmp, text)
    os.replace(tmp, path)
    fsync_dir(path.parent)
