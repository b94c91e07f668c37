"""Contrastive losses. All distributed logic lives here (open_clip's pattern): rank and world size
are injected, embeddings are all-gathered *with* gradients, and labels are offset by rank."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from .bank import TargetBank


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks; gradients flow back to every rank's own slice."""
    return torch.cat(dist_fn.all_gather(x), dim=0)


class SymmetricInfoNCE(nn.Module):
    """Symmetric InfoNCE over in-batch negatives: CE(q→d) and CE(d→q), averaged.

    Under DDP each rank scores its local queries against the targets of *all* ranks (and local
    targets against all queries), labels offset by ``rank * batch``; gradients reach the other
    ranks' encoders through the differentiable all-gather, and DDP's gradient averaging makes the
    update equal to that of one process holding the whole global batch.

    Args:
        temperature: initial τ; logits are cos-sim / τ.
        learnable_temperature: learn log(1/τ) (CLIP-style), clamped to ``max_logit_scale``.
        max_logit_scale: upper bound of 1/τ (CLIP: 100).
        rank, world_size: set by the LightningModule in ``setup``; defaults mean one process.
    """

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = True,
                 max_logit_scale: float = 100.0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=learnable_temperature)
        self.max_log_scale = math.log(max_logit_scale)
        self.rank = rank
        self.world_size = world_size

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, query: torch.Tensor, target: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """``gather=False`` scores within the local batch only (evaluation batches can be uneven)."""
        q, d = F.normalize(query, dim=-1), F.normalize(target, dim=-1)
        scale = self.scale()
        n = q.shape[0]
        if gather and self.world_size > 1 and dist.is_available() and dist.is_initialized():
            all_q, all_d = gather_with_grad(q), gather_with_grad(d)
            labels = torch.arange(n, device=q.device) + self.rank * n
            logits_q, logits_d = scale * q @ all_d.T, scale * d @ all_q.T
        else:
            labels = torch.arange(n, device=q.device)
            logits_q = scale * q @ d.T
            logits_d = logits_q.T
        return 0.5 * (F.cross_entropy(logits_q, labels) + F.cross_entropy(logits_d, labels))


class StaticBankLoss(nn.Module):
    """Stage-2 loss: each query against its target and the whole static bank, plus hard negatives.

    ``bank``: InfoNCE over [target, every other bank entry] (or ``sample`` random entries) at
    temperature τ (default 0.02). ``hard``: InfoNCE over [target, the target's precomputed hard
    negatives]: same category, different attributes, most similar first. Returned as a dict with
    the weighted sum under ``loss``.
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

    def forward(self, query: torch.Tensor, target: torch.Tensor, bank: TargetBank,
                target_ids: list[str]) -> dict[str, torch.Tensor]:
        q, t = F.normalize(query, dim=-1), F.normalize(target, dim=-1).to(query.dtype)
        rows = bank.rows(target_ids)
        emb = bank.embeddings.to(q.dtype)
        cols = torch.arange(len(bank), device=q.device)
        if self.sample is not None and self.sample < len(bank):
            cols = torch.randperm(len(bank), device=q.device)[: self.sample]
        positive = (q * t).sum(-1, keepdim=True) / self.temperature
        negatives = (q @ emb[cols].T / self.temperature).masked_fill(cols[None] == rows[:, None], -torch.inf)
        zeros = torch.zeros(len(q), dtype=torch.long, device=q.device)
        out = {"bank": F.cross_entropy(torch.cat([positive, negatives], 1), zeros)}
        hard_idx = bank.hard[rows.clamp(min=0)]
        valid = (hard_idx >= 0) & (rows[:, None] >= 0)
        hard = (q[:, None] * emb[hard_idx.clamp(min=0)]).sum(-1) / self.temperature
        hard = hard.masked_fill(~valid, -torch.inf)
        out["hard"] = F.cross_entropy(torch.cat([positive, hard], 1), zeros)
        out["loss"] = self.bank_weight * out["bank"] + self.hard_weight * out["hard"]
        return out


class HybridNegativesLoss(nn.Module):
    """In-batch + synthetic + augmented negatives (LLaVA-caption CIR, section 3.4), each weighted.

    ``in_batch``: symmetric InfoNCE over the batch (gathered across ranks). ``synthetic``: each
    query against its target and perturbed copies of it ([B, S, d], with a validity mask).
    ``augmented``: each query against its target and cross-combined targets ([B, A, d]). A weight of
    0 switches a term off. All terms share the (learnable) temperature of the in-batch term.
    """

    def __init__(self, in_batch_weight: float = 1.0, synthetic_weight: float = 0.5, augmented_weight: float = 0.5,
                 temperature: float = 0.07, learnable_temperature: bool = True) -> None:
        super().__init__()
        self.in_batch = SymmetricInfoNCE(temperature, learnable_temperature)
        self.weights = {"in_batch": in_batch_weight, "synthetic": synthetic_weight, "augmented": augmented_weight}

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

    def forward(self, query: torch.Tensor, target: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """The in-batch term alone (what evaluation reports, comparable with other families)."""
        return self.in_batch(query, target, gather=gather)

    def terms(self, query: torch.Tensor, target: torch.Tensor,
              synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
              augmented: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every switched-on term and their weighted sum under ``loss``."""
        q, t = F.normalize(query, dim=-1), F.normalize(target, dim=-1)
        out = {"in_batch": self.in_batch(query, target, gather=True)}
        if synthetic is not None and self.weights["synthetic"]:
            out["synthetic"] = self._against(q, t, synthetic)
        if augmented is not None and self.weights["augmented"]:
            out["augmented"] = self._against(q, t, augmented)
        out["loss"] = sum(self.weights[k] * v for k, v in out.items())
        return out
