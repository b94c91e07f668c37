"""ProCIR's image-text retrieval check: gallery products against their own short captions."""

from __future__ import annotations

import torch
from torch import nn

from ...retrieval.recall import RecallAtK


class ImageTextRecall(nn.Module):
    """I2T and T2I Recall@1/5 per evaluation split (``val/i2t_recall_at_1``, ``val/t2i_recall_at_5``...)."""

    def __init__(self, top_k: tuple[int, ...] = (1, 5)) -> None:
        super().__init__()
        self.top_k = top_k
        self.metrics = nn.ModuleDict({f"{split}_{d}": RecallAtK(top_k=top_k)
                                      for split in ("val", "test") for d in ("i2t", "t2i")})

    def update(self, split: str, products: torch.Tensor, captions: torch.Tensor, ids: torch.Tensor,
               datasets: torch.Tensor) -> None:
        i2t, t2i = self.metrics[f"{split}_i2t"], self.metrics[f"{split}_t2i"]
        i2t.update(captions, ids, datasets, gallery=True)
        i2t.update(products, ids, datasets, gallery=False)
        t2i.update(products, ids, datasets, gallery=True)
        t2i.update(captions, ids, datasets, gallery=False)

    def compute(self, split: str) -> dict[str, torch.Tensor]:
        out = {}
        for direction in ("i2t", "t2i"):
            metric = self.metrics[f"{split}_{direction}"]
            if not metric.update_called:
                continue
            values = metric.compute()
            out.update({f"{direction}_recall_at_{k}": values[f"recall_at_{k}"] for k in self.top_k})
            metric.reset()
        return out
