"""Rewriting a tar shard member by member, to damage it the way real data gets damaged."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path


def rewrite_shard(shard: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Replace every member's bytes with ``change(name, bytes)``."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            payload = change(info.name, payload)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
