"""Run a function in N CPU processes joined by a gloo process group (DDP tests without a GPU)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from support.ports import free_port


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], out: dict, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` processes; returns each rank's result, rank order."""
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_entry, args=(world, free_port(), fn, out, args), nprocs=world, join=True)
    return [out[r] for r in range(world)]
