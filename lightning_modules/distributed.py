"""Small distributed helpers that work with and without a process group."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a list of picklable objects from every rank (the list itself without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]
