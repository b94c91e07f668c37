"""LLaVA-caption CIR's hybrid negatives: in-batch, synthetic and augmented, each weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .infonce import SymmetricInfoNCE


class HybridNegativesLoss(nn.Module):
    """In-batch + synthetic + augmented negatives (LLaVA-caption CIR, section 3.4), each weighted.

    ``in_batch``: symmetric InfoNCE over the batch (gathered across ranks). ``synthetic``: each
    query against its target and perturbed copies of it ([B, S, d], with a validity mask).
    ``augmented``: each query against its target and cross-combined targets ([B, A, d]). A weight of
    0 switches a term off. All terms share the (learnable) temperature of the in-batch term.

    Only the in-batch term talks to other ranks; ``set_distributed`` passes the rank on to it.
    False negatives (``ids``) are masked in the in-batch term, which counts them; the synthetic
    negatives are perturbed copies of the target by design, and the model picks augmented ones
    among rows of other products (``LLaVACaptionCIR.augmented_targets``).
    """

    def __init__(self, in_batch_weight: float = 1.0, synthetic_weight: float = 0.5, augmented_weight: float = 0.5,
                 temperature: float = 0.07, learnable_temperature: bool = True) -> None:
        super().__init__()
        self.in_batch = SymmetricInfoNCE(temperature, learnable_temperature)
        self.weights = {"in_batch": in_batch_weight, "synthetic": synthetic_weight, "augmented": augmented_weight}

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.in_batch.set_distributed(rank, world_size)

    @property
    def temperature(self) -> float:
        return self.in_batch.temperature

    def _against(self, q: torch.Tensor, t: torch.Tensor, negatives: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        neg, valid = negatives
        scale = self.in_batch.scale()
        positive = scale * (q * t).sum(-1, keepdim=True)
        logits = (scale * (q[:, None] * F.normalize(neg, dim=-1)).sum(-1)).masked_fill(~valid, -torch.inf)
        return F.cross_entropy(torch.cat([positive, logits], 1), torch.zeros(len(q), dtype=torch.long,
                                                                              device=q.device))

    def forward(self, query: torch.Tensor, target: torch.Tensor, gather: bool = True,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        """The in-batch term alone (what evaluation reports, comparable with other families)."""
        return self.in_batch(query, target, gather=gather, ids=ids)

    def terms(self, query: torch.Tensor, target: torch.Tensor,
              synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
              augmented: tuple[torch.Tensor, torch.Tensor] | None = None,
              ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every switched-on term and their weighted sum under ``loss``; ``ids``: the rows' product
        keys, for the in-batch term's false-negative masking."""
        q, t = F.normalize(query, dim=-1), F.normalize(target, dim=-1)
        out = {"in_batch": self.in_batch(query, target, gather=True, ids=ids)}
        if synthetic is not None and self.weights["synthetic"]:
            out["synthetic"] = self._against(q, t, synthetic)
        if augmented is not None and self.weights["augmented"]:
            out["augmented"] = self._against(q, t, augmented)
        out["loss"] = sum(self.weights[k] * v for k, v in out.items())
        return out
