"""Fusion heads: reference-image features + modification-text features → query embedding."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class SizedFusion(Protocol):
    """A fusion head built for one feature width, which must match the backbone's."""

    dim: int


def check_fusion_width(fusion: nn.Module, backbone_dim: int, backbone_name: str) -> None:
    if isinstance(fusion, SizedFusion) and fusion.dim != backbone_dim:
        raise ValueError(f"model.init_args.fusion.init_args.dim={fusion.dim} but the backbone {backbone_name!r} "
                         f"embeds in {backbone_dim} dimensions: set the fusion dim to {backbone_dim}.")


class SumFusion(nn.Module):
    """CLIP4Cir's parameter-free baseline: the sum of the L2-normalised features, renormalised."""

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)


class Combiner(nn.Module):
    """The CLIP4Cir Combiner (Baldrati et al.).

    Both features are projected (``projection_ratio`` × dim), concatenated and mapped through a
    hidden layer (``hidden_ratio`` × dim) back to dim; a learned sigmoid weight λ mixes the raw
    inputs as a residual, λ·text + (1-λ)·image, so training starts near a plain mix of the two.

    Args:
        dim: feature dimension of the backbone's image and text embeddings.
        projection_ratio: projection width as a multiple of ``dim`` (CLIP4Cir: 4).
        hidden_ratio: hidden width as a multiple of ``dim`` (CLIP4Cir: 8).
        dropout: dropout after the projections and the hidden layer (CLIP4Cir: 0.5).
    """

    def __init__(self, dim: int, projection_ratio: int = 4, hidden_ratio: int = 8, dropout: float = 0.5) -> None:
        super().__init__()
        self.dim = dim
        proj, hidden = dim * projection_ratio, dim * hidden_ratio
        self.text_projection = nn.Linear(dim, proj)
        self.image_projection = nn.Linear(dim, proj)
        self.combiner = nn.Linear(2 * proj, hidden)
        self.output = nn.Linear(hidden, dim)
        self.mixing = nn.Sequential(nn.Linear(2 * proj, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, 1), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout)

    def mixing_weight(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.mixing(self._joint(image, text))

    def _joint(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        t = self.dropout(F.relu(self.text_projection(text)))
        i = self.dropout(F.relu(self.image_projection(image)))
        return torch.cat([t, i], dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        joint = self._joint(image, text)
        lam = self.mixing(joint)
        combined = self.output(self.dropout(F.relu(self.combiner(joint))))
        return F.normalize(combined + lam * text + (1 - lam) * image, dim=-1)


class TransformerFusion(nn.Module):
    """A small transformer over the [image, text] feature pair (the LLaVA-caption CIR query encoder).

    The two features get a learned type embedding, pass ``layers`` pre-norm encoder layers, are
    mean-pooled and projected; the projection starts at zero and is added to the normalised sum,
    so training starts from ``SumFusion`` and learns what to add.
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion dim {dim} must be divisible by heads {heads}")
        self.dim = dim
        self.type_embedding = nn.Parameter(torch.zeros(2, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.output = nn.Linear(dim, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([F.normalize(image, dim=-1), F.normalize(text, dim=-1)], dim=1) + self.type_embedding
        pooled = self.encoder(tokens).mean(1)
        return F.normalize(tokens.sum(1) - self.type_embedding.sum(0) + self.output(pooled), dim=-1)
