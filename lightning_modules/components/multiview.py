"""Pooling per-view embeddings into product embeddings (the FashionMV paper's multi-view strategies)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from datamodules.schema import MAX_VIEWS

PerViewStrategy = Literal["meanpool", "maxsim"]


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the view axis of ``[B, V, D]`` features, counting only views where ``mask``."""
    m = mask.unsqueeze(-1).to(features.dtype)
    return (features * m).sum(1) / m.sum(1).clamp(min=1.0)


def per_view_embeddings(per_view: torch.Tensor, mask: torch.Tensor, strategy: PerViewStrategy) -> torch.Tensor:
    """From ``[B, V, D]`` per-view embeddings: ``meanpool`` (the mean of the normalised views,
    ``[B, D]``) or ``maxsim`` (normalised views NaN-padded to ``MAX_VIEWS``, ``[B, 5, D]``, scored by
    the best pair, see ``search.maxsim``)."""
    e = F.normalize(per_view.float(), dim=-1)
    if strategy == "meanpool":
        return F.normalize(masked_mean(e, mask), dim=-1)
    out = e.new_full((e.shape[0], max(MAX_VIEWS, e.shape[1]), e.shape[-1]), torch.nan)
    out[:, : e.shape[1]][mask] = e[mask]
    return out


def pool_view_rows(rows: torch.Tensor, counts: list[int], strategy: PerViewStrategy) -> torch.Tensor:
    """Per-view embeddings computed as one row per view (product by product, view by view; product i
    has ``counts[i]`` views) → ``per_view_embeddings`` of them."""
    mask = torch.tensor([[j < n for j in range(max(counts))] for n in counts], device=rows.device)
    per_view = rows.new_zeros(*mask.shape, rows.shape[-1])
    per_view[mask] = rows
    return per_view_embeddings(per_view, mask, strategy)
