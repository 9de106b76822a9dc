"""Durable file writes shared by the cache, the trainer and predict: written in full, fsynced, then renamed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def fsync_file(path: Union[str, Path]) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Union[str, Path]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Replace ``path`` by ``text`` in one rename: a reader sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
