"""ProCIR's optional SFT stage: the language-modelling loss on assistant tokens, over two dialogue
types built from the training triplets (FashionMV paper §4.8 and appendix D.3).

1. Caption generation: ``[system: caption prompt]`` ``user: [all views]`` → ``assistant:
   <think>[Image 1] …per-view captions…</think>{"long_caption": …, "short_caption": …}``.
2. CIR triplet generation, three turns: source views → ``<think>source long caption</think>
   <emb_all>``; target views → the same for the target; "Generate modification text…" → ``<think>
   </think>{"views_involved": …, "modification_text_long": …, "modification_text_short": …}``.

Each training triplet contributes a caption dialogue (of its source product) and a triplet
dialogue, each kept with probability ``sample_fraction`` (the paper: 20%). The checkpoint
initialises ``ProCIR`` through its ``sft_checkpoint``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from datamodules.interfaces import RetrievalData

from ...backbones.qwen import PatchedImage, QwenBackbone
from ...backbones.qwen_chat import Dialogue, DialogueBuilder
from ...core import optimizer_config, save_config_hyperparameters
from .model import procir_optimizer
from .prompts import CAPTION_SYSTEM_PROMPT, MODIFICATION_REQUEST


class ProCIRSFT(L.LightningModule):
    """Supervised fine-tuning of the Qwen3.5 backbone before contrastive training.

    Args:
        backbone: the model to fine-tune.
        sample_fraction: probability that each dialogue of each type is used (paper: 0.2); 1.0 in
            validation.
        caption_system_prompt: the system turn of caption dialogues (default: the dataset
            pipeline's stage-1 caption prompt, ``construction/prompts/captions.txt``, which carries
            appendix A.1's instructions; pass the appendix text itself for a verbatim
            reproduction; null for none, which saves ~500 tokens per dialogue on a CPU).
        tasks: ``caption`` and/or ``triplet``.
        max_tokens: dialogues longer than this are skipped and counted (``train/sft_too_long``);
            the paper's context length is 4096.
        seed: seed of the sampling.
    """

    def __init__(self, backbone: QwenBackbone, sample_fraction: float = 0.2,
                 caption_system_prompt: str | None = CAPTION_SYSTEM_PROMPT,
                 tasks: tuple[str, ...] = ("caption", "triplet"), max_tokens: int = 4096, seed: int = 0,
                 optimizer: OptimizerCallable = procir_optimizer, scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        save_config_hyperparameters(self, ["backbone", "optimizer", "scheduler"])
        problems = []
        if not 0 < sample_fraction <= 1:
            problems.append(f"sample_fraction={sample_fraction}: must be in (0, 1]")
        unknown = set(tasks) - {"caption", "triplet"}
        if unknown or not tasks:
            problems.append(f"tasks={list(tasks)}: choose from 'caption', 'triplet'")
        if problems:
            raise ValueError("model.init_args: " + "; ".join(problems))
        self.backbone = backbone
        self.dialogue = DialogueBuilder(backbone)
        self.sample_fraction = sample_fraction
        self.caption_system_prompt = caption_system_prompt
        self.tasks = tuple(tasks)
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)
        self.too_long = 0
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if isinstance(dm, RetrievalData):
            dm.set_image_transform(self.backbone.image_transform)

    # -- dialogues --------------------------------------------------------------------------------
    def caption_dialogue(self, views: list[PatchedImage], product: dict[str, Any]) -> Dialogue:
        d, seq = self.dialogue, Dialogue()
        if self.caption_system_prompt:
            d.system(seq, self.caption_system_prompt)
        d.user(seq, views)
        captions = product.get("view_captions") or []
        thought = "\n".join(c if c.startswith("[Image") else f"[Image {i + 1}] {c}" for i, c in enumerate(captions))
        answer = json.dumps({"long_caption": product.get("long_caption", ""),
                             "short_caption": product.get("short_caption", "")})
        return d.assistant(seq, thought=thought, answer=answer, emb=False, trained=True)

    def triplet_dialogue(self, source_views: list[PatchedImage], target_views: list[PatchedImage],
                         meta: dict[str, Any]) -> Dialogue:
        d, seq = self.dialogue, Dialogue()
        d.assistant(d.user(seq, source_views), thought=meta["source"].get("long_caption", ""), trained=True)
        d.assistant(d.user(seq, target_views), thought=meta["target"].get("long_caption", ""), trained=True)
        t = meta["triplet"]
        answer = json.dumps({"views_involved": t.get("views_involved", []),
                             "modification_text_long": t.get("modification_long", ""),
                             "modification_text_short": t.get("modification_short", "")})
        return d.assistant(d.user(seq, text=MODIFICATION_REQUEST), answer=answer, emb=False, trained=True)

    def dialogues(self, batch: dict[str, Any], fraction: float) -> list[Dialogue]:
        out = []
        for i, meta in enumerate(batch["meta"]):
            if "caption" in self.tasks and self.rng.random() < fraction:
                out.append(self.caption_dialogue(batch["source_images"][i], meta["source"]))
            if "triplet" in self.tasks and meta.get("target") and self.rng.random() < fraction:
                out.append(self.triplet_dialogue(batch["source_images"][i], batch["target_images"][i], meta))
        if not out and batch["meta"]:
            # Never an empty step: under DDP a rank that skipped its step would hang the others.
            # Costs a slight over-sampling (a batch of 5 triplets draws nothing 11% of the time at 20%).
            meta = batch["meta"][0]
            out.append(self.triplet_dialogue(batch["source_images"][0], batch["target_images"][0], meta)
                       if "triplet" in self.tasks and meta.get("target")
                       else self.caption_dialogue(batch["source_images"][0], meta["source"]))
        kept = [s for s in out if len(s.ids) <= self.max_tokens]
        self.too_long += len(out) - len(kept)
        return kept

    # -- steps ------------------------------------------------------------------------------------
    def lm_loss(self, seqs: list[Dialogue]) -> torch.Tensor:
        """Mean next-token cross-entropy over the assistant tokens (labels elsewhere are -100)."""
        inputs = self.dialogue.batch(seqs, self.device)
        return self.backbone.model(**inputs).loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        seqs = self.dialogues(batch, self.sample_fraction)
        self.log("train/sft_too_long", float(self.too_long), batch_size=len(batch["meta"]))
        if not seqs:  # none sampled in this batch: nothing to learn from
            return None
        loss = self.lm_loss(seqs)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(seqs))
        self.log("train/dialogues", float(len(seqs)), batch_size=len(seqs))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if "meta" not in batch or "source_images" not in batch:  # the gallery loader: products, no dialogues
            return
        state = self.rng.getstate()
        seqs = self.dialogues(batch, 1.0)
        self.rng.setstate(state)
        if seqs:
            self.log("val/loss", self.lm_loss(seqs), batch_size=len(seqs), add_dataloader_idx=False)

    def variant_switches(self) -> dict[str, bool | str]:
        return {"sft": True, "tasks": "+".join(self.tasks)}

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return optimizer_config(self, self.optimizer_factory, self.scheduler_factory, params)
