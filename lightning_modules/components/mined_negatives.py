"""The loss term of offline-mined hard negatives (``cir mine-negatives``): each query against its
target and the K products mined for it, the switch ``model.init_args.mined_negatives``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bank_loss import score_rows
from .false_negatives import CountsMaskedNegatives, false_negative_mask


class MinedNegativesLoss(CountsMaskedNegatives, nn.Module):
    """Cross-entropy of each query over [its target, its mined negatives] at temperature τ, added to
    the family's stage-1 loss with ``weight``. Mined negatives are products the model already
    confuses with the target (filtered for likely duplicates when mined), so they carry more signal
    per product than random in-batch ones; the in-batch term stays as it is.

    Targets may be multi-vector (``[B, K, D]``, SPRC's token sets): an item then scores by its best
    token. A query whose negatives are all missing contributes nothing. With product keys (``ids`` of
    the targets, ``negative_ids`` of the mined products) a mined product that is the target itself
    is masked like a missing one: the miner filters likely duplicates by score, not by identity.
    """

    def __init__(self, temperature: float = 0.05, weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0 or weight < 0:
            raise ValueError(f"model.init_args.mined_negatives: temperature must be > 0 and weight >= 0, got "
                             f"temperature={temperature}, weight={weight}")
        self.temperature = temperature
        self.weight = weight

    def forward(self, query: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor,
                valid: torch.Tensor, ids: torch.Tensor | None = None,
                negative_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``query`` ``[B, D]``, ``target`` ``[B, D]`` (or ``[B, T, D]``), ``negatives`` ``[B, K, D]``
        (or ``[B, K, T, D]``) with ``valid`` ``[B, K]``; ``ids`` ``[B]`` and ``negative_ids``
        ``[B, K]`` product keys (either None: no false-negative masking)."""
        q = F.normalize(query, dim=-1)
        items = F.normalize(torch.cat([target[:, None], negatives.to(target.dtype)], dim=1), dim=-1)
        logits = score_rows(q, items) / self.temperature
        keep = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
        logits = logits.masked_fill(~keep, -torch.inf)
        if ids is not None and negative_ids is not None:
            same = false_negative_mask(ids.to(valid.device), negative_ids.to(valid.device)) & valid
            logits = self.mask_false_negatives(logits, torch.cat([same.new_zeros(len(same), 1), same], 1),
                                               valid.sum())
            valid = valid & ~same  # a row left with no negative contributes nothing, as one with none
        rows = valid.any(dim=1)
        if not bool(rows.any()):
            return query.sum() * 0.0  # keeps the graph (and DDP) whole when a batch has none
        labels = torch.zeros(int(rows.sum()), dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits[rows], labels)
