"""The data a model's encoders take: a batch of products, whichever batch they come from.

A gallery batch holds products (``images``, ``mask``, ``caption``, ``meta``); a triplet batch holds
its targets under ``target_*`` and ``meta[i]["target"]``. ``Products`` gives every family's
``encode_target`` one signature for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Products:
    """Product views (``[B, V, 3, H, W]`` tensors with a ``[B, V]`` mask, or per-view patch grids for
    Qwen), their captions when the data has them, and their metadata records."""

    images: Any
    mask: torch.Tensor | None = None
    captions: list[str] | None = None
    meta: list[dict[str, Any] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def gallery_of(cls, batch: dict[str, Any]) -> Products:
        return cls(batch["images"], batch.get("mask"), batch.get("caption"), list(batch.get("meta") or []))

    @classmethod
    def targets_of(cls, batch: dict[str, Any]) -> Products:
        meta = [m.get("target") if m else None for m in batch.get("meta") or []]
        return cls(batch["target_images"], batch.get("target_mask"), batch.get("target_caption"), meta)


@dataclass
class TrainingPair:
    """One training forward: query and target embeddings, plus what a family computed on the way
    that its loss terms need (ProCIR's source embedding s of the two-stage dialogue)."""

    query: torch.Tensor
    target: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
