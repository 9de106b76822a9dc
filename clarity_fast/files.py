"""Durable file writes shared by the cache, the trainer and predict: written in full, fsynced, then renamed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union


def fsync_file(path: Union[str, Path]) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Union[str, Path]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Union[str, Path], write: Callable[[Path], None]) -> None:
    """Replace ``path`` by what ``write(tmp)`` writes into a temporary file beside it, fsynced, in one rename:
    a reader sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """:func:`write_atomic` of a text."""
    write_atomic(path, lambda tmp: tmp.write_text(text))
