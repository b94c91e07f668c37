"""SPRC's three training terms: fused-query and relative-text contrast against target tokens, and the
alignment of the generated sentence-level prompt with the learnable one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...components.false_negatives import CountsMaskedNegatives, false_negative_mask
from ...retrieval.distributed import gather_tensor, gather_with_grad, is_distributed
from ...retrieval.search import maxsim


class SPRCLoss(CountsMaskedNegatives, nn.Module):
    """``loss = itc + rtc_weight · rtc + align_weight · align`` (Bai et al., ICLR 2024).

    - ``itc``: cross-entropy of each fused query over the batch's targets, a target scored by its best
      token (max over its query tokens of the dot product), divided by a learnable temperature;
    - ``rtc``: the same for the text-only query (learnable prompt tokens + relative caption);
    - ``align``: mean squared error between the token-mean of the generated prompt and the
      token-mean of the learnable prompt tokens (held fixed: only the generated prompt moves).

    One direction (queries over targets), as the reference implementation. Its in-batch negatives are
    gathered across ranks like ``SymmetricInfoNCE``'s: each rank scores its queries against the
    targets of all ranks (with gradient), labels offset by ``rank * batch``, so a 2×B run computes the
    loss and gradients of a 1×2B one; rank and world size come from the module
    (``set_distributed``). With ``ids`` a target that is the same product as a row's own is masked
    from its negatives (``components.false_negatives``). Its CLI
    defaults are ``rtc_weight = align_weight = 0.4`` (the CIRR script weights the terms); its FashionIQ
    script sums the three terms unweighted, i.e. both weights 1.0.

    Args:
        temperature: initial temperature (0.07); logits are similarities / temperature.
        learnable_temperature: train the temperature itself (SPRC), clamped to [0.001, 0.5] as BLIP-2's
            pre-training clamps it, so a run can never divide by zero or a negative number.
        rtc_weight: weight of ``rtc``; 0 skips its text pass (and the prompt tokens stop training).
        align_weight: weight of ``align``; 0 skips it.
    """

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = True, rtc_weight: float = 0.4,
                 align_weight: float = 0.4) -> None:
        super().__init__()
        problems = [f"temperature={temperature}: must be > 0"] if temperature <= 0 else []
        problems += [f"{k}={v}: must be >= 0" for k, v in (("rtc_weight", rtc_weight), ("align_weight", align_weight))
                     if v < 0]
        if problems:
            raise ValueError("model.init_args.loss.init_args: " + "; ".join(problems))
        self.temp = nn.Parameter(torch.tensor(float(temperature)), requires_grad=learnable_temperature)
        self.rtc_weight = rtc_weight
        self.align_weight = align_weight
        self.rank, self.world_size = 0, 1

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def temperature(self) -> float:
        return float(self._temp().detach())

    def _temp(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)

    def gathered(self, targets: torch.Tensor, ids: torch.Tensor | None,
                 gather: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The candidates of this rank's rows: every rank's targets and keys when distributed (else
        the local ones), this rank's labels into them, and the false-negative mask (None without ids)."""
        n = len(targets)
        ids = ids.to(targets.device) if ids is not None else None  # NCCL gathers device tensors only
        labels = torch.arange(n, device=targets.device)
        if gather and self.world_size > 1 and is_distributed():
            targets, labels = gather_with_grad(targets), labels + self.rank * n
            all_ids = gather_tensor(ids) if ids is not None else None
        else:
            all_ids = ids
        mask = false_negative_mask(ids, all_ids, labels) if ids is not None else None
        return targets, labels, mask

    def contrast(self, query: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of ``query[i]`` ``[B, D]`` over targets ``[N, K, D]`` (NaN rows: padding), the
        positive being target ``labels[i]`` (default i), entries of ``mask`` ``[B, N]`` no negatives."""
        logits = maxsim(query[:, None], targets) / self._temp()
        if mask is not None:
            logits = self.mask_false_negatives(logits, mask, mask.numel() - len(query))
        labels = labels if labels is not None else torch.arange(len(query), device=query.device)
        return F.cross_entropy(logits, labels)

    def forward(self, query: torch.Tensor, targets: torch.Tensor, relative: torch.Tensor | None = None,
                prompt: torch.Tensor | None = None, prompt_tokens: torch.Tensor | None = None,
                ids: torch.Tensor | None = None, gather: bool = True) -> dict[str, torch.Tensor]:
        """``query`` and ``relative`` ``[B, D]`` and ``targets`` ``[B, K, D]``, all L2-normalised;
        ``prompt`` ``[B, Q, H]`` generated, ``prompt_tokens`` ``[Q, H]`` learnable; ``ids`` ``[B]`` the
        targets' product keys (None: no false-negative masking). A term whose weight is 0 needs none
        of its inputs and is not returned."""
        candidates, labels, mask = self.gathered(targets, ids, gather)
        out = {"itc": self.contrast(query, candidates, labels, mask)}
        total = out["itc"]
        if self.rtc_weight:
            if relative is None:
                raise ValueError("SPRCLoss: rtc_weight > 0 needs the relative (text-only) query")
            out["rtc"] = self.contrast(relative, candidates, labels, mask)
            total = total + self.rtc_weight * out["rtc"]
        if self.align_weight:
            if prompt is None or prompt_tokens is None:
                raise ValueError("SPRCLoss: align_weight > 0 needs the generated and the learnable prompt")
            fixed = prompt_tokens.detach().mean(0).expand(len(prompt), -1)
            out["align"] = F.mse_loss(prompt.mean(1), fixed.to(prompt.dtype))
            total = total + self.align_weight * out["align"]
        out["loss"] = total
        return out
