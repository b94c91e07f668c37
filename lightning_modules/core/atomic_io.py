"""Checkpoints written so that a job killed while saving never leaves a damaged file behind.

Lightning writes a checkpoint by opening the final path and streaming into it: a kill (SIGKILL,
preemption, out of memory) in the middle leaves a truncated ``last.ckpt`` and the previous good one
is gone. Here the file is written beside the target under a temporary name, flushed to disk
(fsync), then renamed over the target (atomic on POSIX file systems), and the folder entry is
synced too; a kill at any point leaves either the old file or the new one, whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_MARK = ".tmp-"


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` lands at ``path`` through a synced temporary file and a rename (see the module
    docstring); streamed, so a checkpoint of many GB is never held in memory twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}{TEMP_MARK}*"):  # left by a job killed while saving
        stale.unlink(missing_ok=True)
    temp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")
    with open(temp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local saves (``trainer.plugins``; every
    experiment has it through ``configs/trainer/default.yaml``). Remote paths (``s3://``...) keep
    Lightning's own writer: their stores replace objects whole anyway."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "file" not in get_filesystem(path).protocol:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))
