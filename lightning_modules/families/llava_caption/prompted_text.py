"""The query text through BLIP-2 sentence-level prompting, the LLaVA-caption paper's third
contribution ("sentence-level prompting with relative captions using ... BLIP-2", after SPRC)."""

from __future__ import annotations

import torch
from torch import nn

from ...backbones.blip2 import Blip2Backbone


class SentencePromptEncoder(nn.Module):
    """Reference views + query text (modification text ⊕ C_r) → a text feature for the fusion head.

    BLIP-2's Q-Former turns the reference views and the text into a sentence-level prompt; the prompt
    followed by the text goes through the Q-Former again, and the feature at the text's first token
    stands in for CLIP's text feature (``backbones.Blip2Backbone.prompted_query``). The views arrive
    preprocessed by the CLIP backbone's processor (a DataModule has one transform); BLIP-2 normalises
    with the same mean and deviation, and a different size is resized to its ViT's.

    Args:
        backbone: BLIP-2 (its ViT, Q-Former and text projection).
        dim: the width the fusion head expects (the CLIP backbone's); a linear map from BLIP-2's
            feature width when they differ. None: BLIP-2's own width.
        freeze_vision: keep BLIP-2's ViT frozen, as SPRC does.
    """

    def __init__(self, backbone: Blip2Backbone, dim: int | None = None, freeze_vision: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = dim or backbone.dim
        self.projection: nn.Module = nn.Identity() if self.dim == backbone.dim else nn.Linear(backbone.dim, self.dim)
        if freeze_vision:
            backbone.model.vision_model.requires_grad_(False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """``[B, V, 3, H, W]`` reference views with their ``[B, V]`` mask and B texts → ``[B, dim]``."""
        return self.projection(self.backbone.prompted_query(images, mask, texts))
