"""Shared pieces of the ProCIR tests: views of generated images, the loss by hand, a model."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from PIL import Image

from lightning_modules import ProCIR
from lightning_modules.backbones.qwen import QwenBackbone
from lightning_modules.backbones.qwen_chat import Dialogue


def product_images(n: int, seed: int) -> list[Image.Image]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (rng.choice([96, 160, 200]), rng.choice([128, 180])), tuple(rng.randrange(256)
                                                                                          for _ in range(3)))
        for _ in range(40):
            img.putpixel((rng.randrange(img.width), rng.randrange(img.height)), (255, 255, 255))
        out.append(img)
    return out


def views(backbone: QwenBackbone, n: int, seed: int) -> list:
    return [backbone.image_transform(img) for img in product_images(n, seed)]


def sym_infonce(a: torch.Tensor, b: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """The paper's eq. 5, written out term by term."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    total = 0.0
    for i in range(len(a)):
        total -= math.log(math.exp(a[i] @ b[i] / tau) / sum(math.exp(a[i] @ b[j] / tau) for j in range(len(b))))
        total -= math.log(math.exp(b[i] @ a[i] / tau) / sum(math.exp(b[i] @ a[j] / tau) for j in range(len(a))))
    return torch.tensor(total / (2 * len(a)))


def model(backbone: QwenBackbone, **kw) -> ProCIR:
    return ProCIR(backbone, **kw).eval()


def tokens(backbone: QwenBackbone, seq: Dialogue) -> list[str]:
    return backbone.tokenizer.convert_ids_to_tokens(seq.ids)


