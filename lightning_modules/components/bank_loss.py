"""Stage-2 loss against the static target bank, with precomputed hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bank import TargetBank
from .false_negatives import CountsMaskedNegatives, false_negative_mask, product_keys


def best_token(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Scores ``[..., K]`` of the tokens of multi-vector items ``[..., K, D]`` → the best one; NaN
    tokens (padding) never count."""
    return scores.masked_fill(items[..., 0].isnan(), -torch.inf).amax(-1)


def score_all(query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Every query ``[B, D]`` against every item ``[M, D]`` (or ``[M, K, D]``, by its best token) → ``[B, M]``."""
    if items.ndim == 2:
        return query @ items.T
    return best_token(torch.einsum("bd,mkd->bmk", query, items.nan_to_num(0.0)), items[None])


def score_rows(query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Each query ``[B, D]`` against its own items ``[B, M, D]`` (or ``[B, M, K, D]``) → ``[B, M]``."""
    if items.ndim == 3:
        return torch.einsum("bd,bmd->bm", query, items)
    return best_token(torch.einsum("bd,bmkd->bmk", query, items.nan_to_num(0.0)), items)


class StaticBankLoss(CountsMaskedNegatives, nn.Module):
    """Stage-2 loss: each query against its target and the whole static bank, plus hard negatives.

    ``bank``: InfoNCE over [target, every other bank entry] (or ``sample`` random entries) at
    temperature τ (default 0.02). ``hard``: InfoNCE over [target, the target's precomputed hard
    negatives]: same category, different attributes, most similar first. Returned as a dict with
    the weighted sum under ``loss``.

    Targets and bank entries may be multi-vector (``[B, K, D]``, ``[N, K, D]``, NaN rows padding): a
    query ``[B, D]`` then scores an entry by its best token, as SPRC does.

    The positive is scored from the batch's target; a bank entry with the target's key (dataset,
    product id) is that same product again, so it is masked from the negatives of both terms.
    """

    def __init__(self, temperature: float = 0.02, bank_weight: float = 1.0, hard_weight: float = 1.0,
                 sample: int | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.bank_weight = bank_weight
        self.hard_weight = hard_weight
        self.sample = sample

    def forward(self, query: torch.Tensor, target: torch.Tensor, bank: TargetBank, target_ids: list[str],
                datasets: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``target_ids`` and ``datasets``: each row's target product (no datasets: the bank's ids alone)."""
        q, t = F.normalize(query, dim=-1), F.normalize(target, dim=-1).to(query.dtype)
        rows = bank.rows(target_ids, datasets)
        keys = product_keys(target_ids, datasets, q.device)
        emb = bank.embeddings.to(q.dtype)
        cols = torch.arange(len(bank), device=q.device)
        if self.sample is not None and self.sample < len(bank):
            cols = torch.randperm(len(bank), device=q.device)[: self.sample]
        positive = score_rows(q, t[:, None]) / self.temperature
        negatives = score_all(q, emb[cols]) / self.temperature
        own = cols[None] == rows[:, None]  # the target's own bank entry: masked, not a duplicate
        negatives = self.mask_false_negatives(negatives, false_negative_mask(keys, bank.keys[cols]),
                                              negatives.numel(), expected=own)
        zeros = torch.zeros(len(q), dtype=torch.long, device=q.device)
        out = {"bank": F.cross_entropy(torch.cat([positive, negatives], 1), zeros)}
        hard_idx = bank.hard[rows.clamp(min=0)]
        valid = (hard_idx >= 0) & (rows[:, None] >= 0)
        hard = score_rows(q, emb[hard_idx.clamp(min=0)]) / self.temperature
        hard = hard.masked_fill(~valid, -torch.inf)
        # Hard negatives are other entries than the target's own, but mined by entry, not by key.
        same = false_negative_mask(keys, bank.keys[hard_idx.clamp(min=0)]) & valid
        hard = self.mask_false_negatives(hard, same, valid.sum())
        out["hard"] = F.cross_entropy(torch.cat([positive, hard], 1), zeros)
        out["loss"] = self.bank_weight * out["bank"] + self.hard_weight * out["hard"]
        return out
