"""One optimisation step of every family, with and without GradCache, through a real Trainer.

Shared by the single-process test and the 2-process gloo test: each builds the same tiny model
twice, runs one SGD step on the same batch plainly and in chunks, and returns the logged loss
terms and the updated parameters.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch import nn

from callbacks import CoTSchedule
from datamodules.batching import collate
from lightning_modules import CLIP4CIR, SPRC, Combiner, LLaVACaptionCIR, MLLMEmbedder, ProCIR, StaticBankLoss
from lightning_modules.backbones import Blip2Backbone, CLIPBackbone, QwenBackbone, VLEmbedderBackbone

CASES = ("clip4cir", "clip4cir_stage2", "llava_caption", "procir", "mllm_embed", "sprc")
WORDS = ["red", "blue", "green", "black", "white", "pink", "grey", "navy"]
SHAPES = ["dress", "shirt", "top", "skirt"]


def build(case: str, chunk: int | None) -> nn.Module:
    torch.manual_seed(0)
    if case.startswith("clip4cir"):
        model = CLIP4CIR(CLIPBackbone("tiny"), Combiner(48), stage2_loss=StaticBankLoss(hard_weight=0.5),
                         grad_cache_chunk=chunk)
    elif case == "llava_caption":
        model = LLaVACaptionCIR(CLIPBackbone("tiny"), synthetic_negatives=2, augmented_negatives=2,
                                grad_cache_chunk=chunk)
    elif case == "procir":
        model = ProCIR(QwenBackbone("tiny"), two_stage_dialogue=True, align=True, cot=True, grad_cache_chunk=chunk)
    elif case == "mllm_embed":
        model = MLLMEmbedder(VLEmbedderBackbone("tiny", family="qwen3-vl-embedding"), grad_cache_chunk=chunk)
    else:
        model = SPRC(Blip2Backbone("tiny"), grad_cache_chunk=chunk)
    # The plain batch and the chunks would draw dropout masks in another order; equality is defined
    # without dropout (that pass 2 replays pass 1's masks is tested on its own).
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):  # its attention dropout is a float, not a module
            module.dropout = 0.0
    model.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.5)
    return model


def _product(rng: random.Random) -> tuple[list[Image.Image], dict[str, Any]]:
    colour, shape = rng.choice(WORDS), rng.choice(SHAPES)
    views = [Image.new("RGB", (rng.choice([48, 64, 80]), rng.choice([64, 96])),
                       tuple(rng.randrange(256) for _ in range(3))) for _ in range(rng.randint(1, 3))]
    pid = f"p{rng.randrange(10**6)}"
    return views, {"product_id": pid, "dataset": "gen", "category": shape, "attributes": {"colour": colour},
                   "short_caption": f"a {colour} {shape}", "long_caption": f"a plain {colour} {shape} with pockets"}


def batch(model: nn.Module, n: int, seed: int) -> dict[str, Any]:
    """``n`` triplets of products with 1-3 views of mixed sizes, preprocessed for ``model``."""
    rng = random.Random(seed)
    transform = model.image_transform()
    examples = []
    for _ in range(n):
        (src, s), (tgt, t) = _product(rng), _product(rng)
        stack = [transform(v) for v in src], [transform(v) for v in tgt]
        stack = tuple(torch.stack(x) if isinstance(x[0], torch.Tensor) else x for x in stack)
        examples.append({"source_images": stack[0], "target_images": stack[1], "text": f"make it {rng.choice(WORDS)}",
                         "source_id": s["product_id"], "target_id": t["product_id"], "dataset": "gen",
                         "source_caption": s["short_caption"], "target_caption": t["short_caption"],
                         "modified_text": "", "meta": {"source": s, "target": t}})
    return collate(examples)


class HalfCaption(CoTSchedule):
    """Keeps half of each CoT caption, so the step draws which words (at step 0 the schedule keeps all)."""

    def keep_ratio_at(self, step: int, total_steps: int) -> float:
        return 0.5


class OneBatch(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.data


def _first(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def step(case: str, chunk: int | None, data: dict[str, Any], strategy: Any = "auto",
         devices: int = 1) -> dict[str, Any]:
    """One optimisation step; the logged loss terms and every parameter afterwards."""
    model = build(case, chunk)
    if case.endswith("stage2"):
        gallery = {"images": data["target_images"], "mask": data["target_mask"],
                   "meta": [m["target"] for m in data["meta"]]}
        model.enter_stage2()
        model.build_bank([gallery], hard_negatives=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
                        callbacks=[HalfCaption()] if case == "procir" else [])
    loader = torch.utils.data.DataLoader(OneBatch(data), batch_size=1, collate_fn=_first)
    trainer.fit(model, train_dataloaders=loader)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    return {"logged": logged, "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(before[k], after[k]) for k in before)


__all__ = ["CASES", "batch", "build", "max_difference", "moved", "step"]
