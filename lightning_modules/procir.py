"""ProCIR (FashionMV paper): product-level multi-view CIR embedded by a multimodal LLM.

Every embedding is the last hidden state at an ``<emb_all>`` token (no projection head):

- document: ``user: [views]`` → ``assistant: <think>…</think> <emb_all>`` → d
- single-turn query: ``user: [source views] + text`` → ``assistant: <emb_all>`` → q
- two-stage dialogue (MT): turn 1 as a document gives s, turn 2 ``user: text`` →
  ``assistant: <emb_all>`` gives q. Turn 1 is token for token a document, so by causality s is
  the source's gallery embedding.

Losses: L = L_cir(q, d) + λ_d·L_doc(d, t_tgt) + λ_s·L_src(s, t_src), all symmetric InfoNCE at
τ = 0.07; t is a text-only forward ``[caption; <emb_all>]`` of the long or short caption (50/50
per step). L_doc and L_src are the Align mechanism, L_src only with MT. CoT puts the product's
long caption inside ``<think>`` (documents and turn 1) keeping ⌈ρ·n⌉ of its tokens, ρ set each step
by ``callbacks.CoTSchedule``; evaluation never sees a caption.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from .backbones.qwen import PatchedImage, QwenBackbone
from .dialogue import DialogueBuilder, Sequence, keep_tokens
from .losses import SymmetricInfoNCE
from .metrics import RecallAtK
from .multiview import per_view_embeddings
from .retrieval import RetrievalEval, RetrievalModule, load_weights, save_config_hyperparameters

ViewStrategy = Literal["joint", "meanpool", "maxsim"]
CaptionChoice = Literal["mixed", "long", "short"]
SFT_COMMAND = "lightning fit --config experiments/procir_sft_pretrain.yaml"


def backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of a ProCIR or ProCIRSFT checkpoint (loaded weights-only), unprefixed."""
    state = load_weights(path)
    return {k.removeprefix("backbone."): v for k, v in state.get("state_dict", state).items()
            if k.startswith("backbone.")}


def procir_optimizer(params: Any) -> torch.optim.Optimizer:
    """The paper's optimizer: AdamW, lr 1e-5, weight decay 0.01."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)


class ProCIR(RetrievalModule):
    """ProCIR's contrastive stage; the mechanisms are switches (the paper's 8 variants).

    Args:
        backbone: the Qwen3.5 model.
        two_stage_dialogue: MT, the query in two turns (else the single-turn baseline).
        align: caption alignment, L_doc (and L_src with MT).
        cot: chain-of-thought with progressive caption removal (needs ``callbacks.CoTSchedule``).
        doc_align_weight, src_align_weight: λ_d and λ_s.
        align_caption: which caption t is built from: ``mixed`` (long or short, 50/50 each step).
        view_strategy: how evaluation embeds multi-view products: ``joint`` (all views in one
            request, the model's own way), ``meanpool`` or ``maxsim`` over one request per view
            (the paper's baselines for single-image models).
        image_text_eval: also log I2T and T2I Recall@1/5 between gallery products and their short
            captions (``val/i2t_recall_at_1``, ...).
        sft_checkpoint: a ``ProCIRSFT`` checkpoint whose backbone initialises this one.
        seed: seed of the per-step random choices (caption kind, CoT tokens).
        loss, optimizer, scheduler, evaluation, init_checkpoint, skip_bad_steps: see
            ``RetrievalModule``; the loss defaults to symmetric InfoNCE with a fixed τ = 0.07.
    """

    def __init__(self, backbone: QwenBackbone, two_stage_dialogue: bool = True, align: bool = True,
                 cot: bool = False, doc_align_weight: float = 0.25, src_align_weight: float = 0.25,
                 align_caption: CaptionChoice = "mixed", view_strategy: ViewStrategy = "joint",
                 image_text_eval: bool = True, sft_checkpoint: str | None = None, seed: int = 0,
                 loss: nn.Module | None = None, optimizer: OptimizerCallable = procir_optimizer,
                 scheduler: LRSchedulerCallable | None = None, evaluation: RetrievalEval | None = None,
                 init_checkpoint: str | None = None, skip_bad_steps: bool = False) -> None:
        super().__init__(loss=loss or SymmetricInfoNCE(temperature=0.07, learnable_temperature=False),
                         optimizer=optimizer, scheduler=scheduler, evaluation=evaluation,
                         init_checkpoint=init_checkpoint, skip_bad_steps=skip_bad_steps)
        save_config_hyperparameters(self, ["backbone", "loss", "optimizer", "scheduler"])
        problems = []
        if view_strategy == "maxsim" and self.evaluation.backend == "faiss":
            problems.append("view_strategy=maxsim scores view pairs: set evaluation.backend=torch")
        if min(doc_align_weight, src_align_weight) < 0:
            problems.append("doc_align_weight and src_align_weight must be >= 0")
        if problems:
            raise ValueError("model.init_args: " + "; ".join(problems))
        self.backbone = backbone
        self.dialogue = DialogueBuilder(backbone)
        self.two_stage_dialogue = two_stage_dialogue
        self.align = align
        self.cot = cot
        self.doc_align_weight = doc_align_weight
        self.src_align_weight = src_align_weight
        self.align_caption = align_caption
        self.view_strategy = view_strategy
        self.image_text_eval = image_text_eval
        self.sft_checkpoint = sft_checkpoint
        self.sft_init = sft_checkpoint is not None
        self.rng = random.Random(seed)
        # ρ(t), set before every training step by callbacks.CoTSchedule; 1.0 = the whole caption.
        self.cot_keep_ratio = 1.0
        self.image_text = nn.ModuleDict({f"{split}_{d}": RecallAtK(top_k=(1, 5))
                                         for split in ("val", "test") for d in ("i2t", "t2i")})
        self._gallery_emb: torch.Tensor | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def image_transform(self) -> Any:
        return self.backbone.image_transform

    def variant_switches(self) -> dict[str, bool | str]:
        return {"mt": self.two_stage_dialogue, "align": self.align, "cot": self.cot, "sft": self.sft_init,
                "views": self.view_strategy}

    def setup(self, stage: str) -> None:
        if self.sft_checkpoint:
            self._load_sft_checkpoint()
        super().setup(stage)

    def _load_sft_checkpoint(self) -> None:
        path = Path(self.sft_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.init_args.sft_checkpoint={self.sft_checkpoint} does not exist. The SFT stage writes it: "
                f"run `{SFT_COMMAND}` first (or drop sft_checkpoint to start from the pretrained backbone)."
            )
        state = backbone_weights(path)
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if missing or unexpected or not state:
            raise ValueError(f"{path} does not fit this backbone ({self.backbone.name_or_path}): missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}; was it written by ProCIRSFT on the "
                             "same backbone preset?")
        self.sft_checkpoint = None  # once: a resumed run restores from its own checkpoint

    # -- dialogues --------------------------------------------------------------------------------
    def _thought(self, product: dict[str, Any] | None) -> list[int]:
        """CoT: the subsampled long caption in training, nothing in evaluation or without CoT."""
        if not (self.cot and self.training and product) or self.cot_keep_ratio <= 0:
            return []
        ids = self.backbone.text_ids(product.get("long_caption") or product.get("short_caption") or "")
        return keep_tokens(ids, self.cot_keep_ratio, self.rng)

    def document(self, views: list[PatchedImage], product: dict[str, Any] | None = None) -> Sequence:
        d = self.dialogue
        return d.assistant(d.user(Sequence(), views), thought=self._thought(product), close=False)

    def query(self, views: list[PatchedImage], text: str, source: dict[str, Any] | None = None) -> Sequence:
        d = self.dialogue
        if self.two_stage_dialogue:
            seq = d.assistant(d.user(Sequence(), views), thought=self._thought(source))
            return d.assistant(d.user(seq, text=text), close=False)
        return d.assistant(d.user(Sequence(), views, text), close=False)

    def _per_view(self, make: Any, items: list[list[PatchedImage]], *extra: list[Any]) -> list[torch.Tensor]:
        """Embeddings of ``make(views, *extra)`` per product, one tensor per ``<emb_all>``: joint (one
        request with every view), or one request per view, then mean-pooled or kept as multi-vectors
        for MaxSim, NaN-padded to ``MAX_VIEWS`` so batches concatenate."""
        strategy = "joint" if self.training else self.view_strategy
        if strategy == "joint":
            out = self.dialogue.embed([make(v, *e) for v, *e in zip(items, *extra, strict=True)], self.device)
            return out
        seqs = [make([view], *e) for views, *e in zip(items, *extra, strict=True) for view in views]
        emb = self.dialogue.embed(seqs, self.device)[-1]
        mask = torch.tensor([[j < len(v) for j in range(max(map(len, items)))] for v in items], device=emb.device)
        per_view = emb.new_zeros(*mask.shape, emb.shape[-1])
        per_view[mask] = emb  # row-major: product by product, view by view, as seqs were made
        return [per_view_embeddings(per_view, mask, strategy)]

    @staticmethod
    def _normalize(x: torch.Tensor) -> torch.Tensor:
        return x if x.ndim == 3 else F.normalize(x.float(), dim=-1)  # multi-vectors are normalised per view

    # -- the RetrievalModule interface ------------------------------------------------------------
    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        sources = [m.get("source") if m else None for m in batch.get("meta") or [None] * len(batch["text"])]
        out = self._per_view(self.query, batch["source_images"], batch["text"], sources)
        if self.two_stage_dialogue and len(out) == 2:
            batch["source_embedding"] = out[0]  # s, for L_src
        return self._normalize(out[-1])

    def query_embeddings(self, views: list[list[PatchedImage]], texts: list[str]) -> torch.Tensor:
        """q for each (source views, modification text), as evaluation computes it."""
        return self._normalize(self._per_view(self.query, views, texts, [None] * len(texts))[-1])

    def encode_target(self, images: list[list[PatchedImage]], mask: torch.Tensor | None = None,
                      captions: list[str] | None = None, products: list[dict[str, Any]] | None = None) -> torch.Tensor:
        out = self._per_view(self.document, images, products or [None] * len(images))
        return self._normalize(out[-1])

    def embed_targets(self, batch: dict[str, Any], gallery: bool) -> torch.Tensor:
        if gallery:
            emb = self.encode_target(batch["images"], products=batch.get("meta"))
            self._gallery_emb = emb
            return emb
        products = [m.get("target") for m in batch["meta"]] if "meta" in batch else None
        return self.encode_target(batch["target_images"], products=products)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Caption embeddings t: ``[caption; <emb_all>]``, a text-only forward."""
        return F.normalize(self.dialogue.embed([self.dialogue.text_embedding(t) for t in texts], self.device)[0]
                           .float(), dim=-1)

    def _caption_kind(self) -> str:
        if self.align_caption == "mixed":
            return "long" if self.rng.random() < 0.5 else "short"
        return self.align_caption

    def training_loss(self, query: torch.Tensor, target: torch.Tensor,
                      batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms = {"cir": self.loss(query, target, gather=True)}
        loss = terms["cir"]
        if self.align:
            kind = self._caption_kind()  # one choice per step, as the paper
            field = f"{kind}_caption"
            texts = [m["target"].get(field) or m["target"]["short_caption"] for m in batch["meta"]]
            with_src = self.two_stage_dialogue and "source_embedding" in batch
            if with_src:
                texts += [m["source"].get(field) or m["source"]["short_caption"] for m in batch["meta"]]
            t = self.embed_texts(texts)
            n = target.shape[0]
            terms["doc"] = self.loss(target, t[:n], gather=True)
            loss = loss + self.doc_align_weight * terms["doc"]
            if with_src:
                terms["src"] = self.loss(F.normalize(batch["source_embedding"].float(), dim=-1), t[n:], gather=True)
                loss = loss + self.src_align_weight * terms["src"]
        return {"loss": loss, **terms}

    def on_train_start(self) -> None:
        from callbacks.cot_schedule import CoTSchedule

        if self.cot and not any(isinstance(cb, CoTSchedule) for cb in self.trainer.callbacks):
            raise ValueError("model.init_args.cot=true needs the callbacks.CoTSchedule callback (progressive caption "
                             "removal); add it under trainer.callbacks, as experiments/procir/*cot*.yaml do.")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.cot:
            self.log("train/cot_keep_ratio", self.cot_keep_ratio, batch_size=len(batch["text"]))
        return super().training_step(batch, batch_idx)

    # -- image-text evaluation --------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        super()._eval_step(batch, stage)
        emb = self._gallery_emb
        if "images" in batch and self.image_text_eval and emb is not None and emb.ndim == 2:
            texts = self.embed_texts([m.get("short_caption") or c for m, c in zip(batch["meta"], batch["caption"],
                                                                                   strict=True)])
            ids, ds = self._ids(batch["product_id"]), self._dataset_index(batch["dataset"])
            self.image_text[f"{stage}_i2t"].update(texts, ids, ds, gallery=True)
            self.image_text[f"{stage}_i2t"].update(emb, ids, ds, gallery=False)
            self.image_text[f"{stage}_t2i"].update(emb, ids, ds, gallery=True)
            self.image_text[f"{stage}_t2i"].update(texts, ids, ds, gallery=False)
        self._gallery_emb = None

    def _log_recall(self, stage: str) -> None:
        super()._log_recall(stage)
        for direction in ("i2t", "t2i"):
            metric = self.image_text[f"{stage}_{direction}"]
            if not metric.update_called:
                continue
            values = metric.compute()
            for k in (1, 5):
                self.log(f"{stage}/{direction}_recall_at_{k}", values[f"recall_at_{k}"], sync_dist=False,
                         add_dataloader_idx=False, rank_zero_only=False)
            metric.reset()
