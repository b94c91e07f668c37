"""The frozen caption encoder of LLaVA-caption CIR's targets (C_t)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...backbones.clip import CLIPBackbone


class FrozenTextEncoder(nn.Module):
    """A frozen copy of a CLIP text tower: encodes target captions, never trained."""

    def __init__(self, backbone: CLIPBackbone) -> None:
        super().__init__()
        self.text_model = copy.deepcopy(backbone.model.text_model)
        self.text_projection = copy.deepcopy(backbone.model.text_projection)
        self.tokenizer = backbone.tokenizer
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)  # frozen means eval mode too: no dropout noise in the targets

    @torch.no_grad()
    def forward(self, texts: list[str]) -> torch.Tensor:
        device = self.text_projection.weight.device
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        pooled = self.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        return self.text_projection(pooled)
