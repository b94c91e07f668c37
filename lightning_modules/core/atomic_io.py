"""Checkpoints written so that a job killed while saving never leaves a damaged file behind.

Lightning writes a checkpoint by opening the final path and streaming into it: a kill (SIGKILL,
preemption, out of memory) in the middle leaves a truncated ``last.ckpt`` and the previous good one
is gone. Here it goes through ``datamodules.atomic.atomic_write`` (temporary file, fsync, rename).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local saves (``trainer.plugins``; every
    experiment has it through ``configs/trainer/default.yaml``). Remote paths (``s3://``...) keep
    Lightning's own writer: their stores replace objects whole anyway."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "file" not in get_filesystem(path).protocol:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        # Only rank 0 saves: a temporary file of last.ckpt beside it is a killed save's leftover.
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f), remove_stale=True)
