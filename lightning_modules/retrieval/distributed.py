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


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. The backward of
    ``torch.distributed.nn.all_gather`` reduces the gradients by their storage: a strided one (an
    einsum's, as SPRC's best-token scores give for ``[B, K, D]`` targets) comes back scrambled."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks; gradients flow back to every rank's own slice."""
    return torch.cat([_ContiguousGrad.apply(part) for part in dist_fn.all_gather(x.contiguous())], dim=0)


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks without gradients (ids, masks); ``x`` itself without a group.
    Every rank must give the same shape, as for ``gather_with_grad``."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
