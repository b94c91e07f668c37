"""SPRC's three training terms: fused-query and relative-text contrast against target tokens, and the
alignment of the generated sentence-level prompt with the learnable one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...retrieval.search import maxsim


class SPRCLoss(nn.Module):
    """``loss = itc + rtc_weight · rtc + align_weight · align`` (Bai et al., ICLR 2024).

    - ``itc``: cross-entropy of each fused query over the batch's targets, a target scored by its best
      token (max over its query tokens of the dot product), divided by a learnable temperature;
    - ``rtc``: the same for the text-only query (learnable prompt tokens + relative caption);
    - ``align``: mean squared error between the token-mean of the generated prompt and the
      token-mean of the learnable prompt tokens (held fixed: only the generated prompt moves).

    One direction (queries over targets) and in-batch only, as the reference implementation. Its CLI
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

    @property
    def temperature(self) -> float:
        return float(self._temp().detach())

    def _temp(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)

    def contrast(self, query: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``query[i]`` ``[B, D]`` over targets ``[B, K, D]`` (NaN rows: padding), the
        positive being target i."""
        logits = maxsim(query[:, None], targets) / self._temp()
        return F.cross_entropy(logits, torch.arange(len(query), device=query.device))

    def forward(self, query: torch.Tensor, targets: torch.Tensor, relative: torch.Tensor | None = None,
                prompt: torch.Tensor | None = None,
                prompt_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``query`` and ``relative`` ``[B, D]`` and ``targets`` ``[B, K, D]``, all L2-normalised;
        ``prompt`` ``[B, Q, H]`` generated, ``prompt_tokens`` ``[Q, H]`` learnable. A term whose
        weight is 0 needs none of its inputs and is not returned."""
        out = {"itc": self.contrast(query, targets)}
        total = out["itc"]
        if self.rtc_weight:
            if relative is None:
                raise ValueError("SPRCLoss: rtc_weight > 0 needs the relative (text-only) query")
            out["rtc"] = self.contrast(relative, targets)
            total = total + self.rtc_weight * out["rtc"]
        if self.align_weight:
            if prompt is None or prompt_tokens is None:
                raise ValueError("SPRCLoss: align_weight > 0 needs the generated and the learnable prompt")
            fixed = prompt_tokens.detach().mean(0).expand(len(prompt), -1)
            out["align"] = F.mse_loss(prompt.mean(1), fixed.to(prompt.dtype))
            total = total + self.align_weight * out["align"]
        out["loss"] = total
        return out
