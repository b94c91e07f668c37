"""Pooling per-view embeddings into product embeddings (the FashionMV paper's multi-view strategies).

The paper's eq. 15 (MeanPool) scores a query product Q against a document product D as
``cos(mean_i e^Q_i, mean_j e^D_j)``: the mean of the per-view embeddings *as the model produces
them*, then the cosine. ``meanpool`` is exactly that (the mean is L2-normalised here so that a
dot product is the cosine). ``meanpool_normalised`` L2-normalises each view before averaging, an
older convention kept under its own name: it equals ``meanpool`` only when every view has the same
norm (e.g. models whose embeddings are already unit-norm), and otherwise weighs views equally
instead of by their norm. ``maxsim`` is eq. 16.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from datamodules.schema import MAX_VIEWS

PerViewStrategy = Literal["meanpool", "meanpool_normalised", "maxsim"]
PER_VIEW_STRATEGIES: tuple[str, ...] = get_args(PerViewStrategy)


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the view axis of ``[B, V, D]`` features, counting only views where ``mask``."""
    m = mask.unsqueeze(-1)
    # where, not a product with the mask: a padded slot may hold NaN (NaN * 0 is NaN).
    total = torch.where(m, features, features.new_zeros(())).sum(1)
    return total / m.to(features.dtype).sum(1).clamp(min=1.0)


def per_view_embeddings(per_view: torch.Tensor, mask: torch.Tensor, strategy: PerViewStrategy) -> torch.Tensor:
    """Pool ``[B, V, D]`` per-view embeddings (padded views where ``mask`` is False) by ``strategy``.

    - ``meanpool`` (eq. 15): the mean of the real views as given, L2-normalised, ``[B, D]``.
    - ``meanpool_normalised``: the mean of the L2-normalised views, L2-normalised, ``[B, D]``.
    - ``maxsim`` (eq. 16): the L2-normalised views NaN-padded to ``MAX_VIEWS``, ``[B, 5, D]``,
      scored by the best pair (see ``retrieval.search.maxsim``).
    """
    if strategy == "meanpool":
        return F.normalize(masked_mean(per_view.float(), mask), dim=-1)
    e = F.normalize(per_view.float(), dim=-1)
    if strategy == "meanpool_normalised":
        return F.normalize(masked_mean(e, mask), dim=-1)
    if strategy != "maxsim":
        raise ValueError(f"view strategy {strategy!r}: per-view pooling is one of {', '.join(PER_VIEW_STRATEGIES)}")
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
