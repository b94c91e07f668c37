"""Collectives of the retrieval code; each works with and without a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a list of picklable objects from every rank (the list itself without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks; gradients flow back to every rank's own slice."""
    return torch.cat(dist_fn.all_gather(x), dim=0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
