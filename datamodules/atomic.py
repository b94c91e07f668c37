"""Files written so that a job killed while writing never leaves a damaged one behind.

The bytes go to a temporary file beside the target, are flushed to disk (fsync), and the temporary
file is renamed over the target (atomic on POSIX file systems); the folder entry is synced too. A
kill at any point leaves the old file or the new one, whole. Checkpoints, sidecars, offset
indexes and ``cir build``'s outputs all go through ``atomic_write``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TEMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before its rename; the pid keeps processes that write the same
    file at once (every rank building one offsets index) off each other's temporary files."""
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None], remove_stale: bool = False) -> Path:
    """``write(file)`` lands at ``path`` whole or not at all; streamed, so a checkpoint of many GB is
    never held in memory twice.

    ``remove_stale``: first delete temporary files of ``path`` left by killed jobs. Only for a file
    one process writes (rank 0's checkpoints, ``cir build``); where several may write the same file
    at once, another's temporary file is live, not stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if remove_stale:
        for stale in path.parent.glob(f"{path.name}{TEMP_MARK}*"):
            stale.unlink(missing_ok=True)
    temp = temp_path(path)
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # an error (not a kill) leaves nothing behind either
        raise
    fsync_path(path.parent)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: the names renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, remove_stale: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), remove_stale)


def write_json_atomic(path: Path, value: Any, remove_stale: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(value), remove_stale)
