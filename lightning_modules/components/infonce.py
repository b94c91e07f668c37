"""Symmetric InfoNCE with in-batch negatives gathered across ranks (open_clip's pattern: every
collective lives in the loss, rank and world size are injected by the module)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..retrieval.distributed import gather_tensor, gather_with_grad, is_distributed
from .false_negatives import CountsMaskedNegatives, false_negative_mask


class SymmetricInfoNCE(CountsMaskedNegatives, nn.Module):
    """Symmetric InfoNCE over in-batch negatives: CE(q→d) and CE(d→q), averaged.

    Under DDP each rank scores its local queries against the targets of *all* ranks (and local
    targets against all queries), labels offset by ``rank * batch``; gradients reach the other
    ranks' encoders through the differentiable all-gather, and DDP's gradient averaging makes the
    update equal to that of one process holding the whole global batch.

    Args:
        temperature: initial τ; logits are cos-sim / τ.
        learnable_temperature: learn log(1/τ) (CLIP-style), clamped to ``max_logit_scale``.
        max_logit_scale: upper bound of 1/τ (CLIP: 100).

    With ``ids`` (each row's product key, ``false_negatives.batch_keys``; gathered like the
    embeddings) a candidate that is the same product as the row's positive is no negative, in both
    directions: a query whose target is d_i is as much a positive of d_i as q_i is.

    Rank and world size are not configuration: the LightningModule hands them over in ``setup``
    through ``set_distributed`` (the ``DistributedLoss`` interface); until then the loss is local.
    """

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = True,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=learnable_temperature)
        self.max_log_scale = math.log(max_logit_scale)
        self.rank, self.world_size = 0, 1

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, query: torch.Tensor, target: torch.Tensor, gather: bool = True,
                ids: torch.Tensor | None = None) -> torch.Tensor:
        """``gather=False`` scores within the local batch only (evaluation batches can be uneven);
        ``ids`` ``[B]``: product keys of the rows' positives (None: no false-negative masking)."""
        q, d = F.normalize(query, dim=-1), F.normalize(target, dim=-1)
        scale = self.scale()
        n = q.shape[0]
        ids = ids.to(q.device) if ids is not None else None  # NCCL gathers device tensors only
        if gather and self.world_size > 1 and is_distributed():
            all_q, all_d = gather_with_grad(q), gather_with_grad(d)
            labels = torch.arange(n, device=q.device) + self.rank * n
            logits_q, logits_d = scale * q @ all_d.T, scale * d @ all_q.T
            all_ids = gather_tensor(ids) if ids is not None else None
        else:
            labels = torch.arange(n, device=q.device)
            logits_q = scale * q @ d.T
            logits_d = logits_q.T
            all_ids = ids
        if ids is not None:
            # Key equality is symmetric, so one mask serves both directions: row i's candidates j in
            # q→d are targets d_j, in d→q queries q_j, and either is i's positive when key_j = key_i.
            mask = false_negative_mask(ids, all_ids, labels)
            negatives = mask.numel() - n
            logits_q = self.mask_false_negatives(logits_q, mask, negatives)
            logits_d = self.mask_false_negatives(logits_d, mask, negatives)
        return 0.5 * (F.cross_entropy(logits_q, labels) + F.cross_entropy(logits_d, labels))
