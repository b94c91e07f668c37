"""ProCIR (FashionMV paper): product-level multi-view CIR embedded by a multimodal LLM.

Every embedding is the last hidden state at an ``<emb_all>`` token (no projection head); the
dialogues are in ``dialogue.py``. Losses: L = L_cir(q, d) + λ_d·L_doc(d, t_tgt) + λ_s·L_src(s, t_src),
all symmetric InfoNCE at τ = 0.07; t is a text-only forward ``[caption; <emb_all>]`` of the long or
short caption (50/50 per step). L_doc and L_src are the Align mechanism, L_src only with MT. CoT's
keep ratio ρ is set each step by a ``CoTRatioSchedule`` callback (``callbacks.CoTSchedule``).

Multi-turn sessions (a batch of turn rows, ``datamodules.session_batches``) are read as one
dialogue per session (``ProCIRDialogues.session``), one forward each: turn t's q is the
``<emb_all>`` closing its text, with every earlier turn in context; L_cir is taken at every turn's q
against that turn's target document, L_doc at every target, and L_src at every turn's s (with MT:
the ``<emb_all>`` after turn t's reference views, aligned to that reference's caption).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.session_batches import is_session_batch

from ...backbones.qwen import PatchedImage, QwenBackbone
from ...backbones.qwen_chat import Dialogue, DialogueBuilder
from ...components.false_negatives import batch_keys, id_kwargs
from ...components.infonce import SymmetricInfoNCE
from ...components.mined_negatives import MinedNegativesLoss
from ...components.multiview import pool_view_rows
from ...core import Products, RetrievalEval, RetrievalModule, TrainingPair, save_config_hyperparameters
from ...core.adapters import LoraSettings
from ...core.checkpoints import submodule_weights
from .dialogue import ProCIRDialogues, Turn, caption_text, keep_tokens
from .image_text import ImageTextRecall
from .schedule import CoTRatioSchedule

ViewStrategy = Literal["joint", "meanpool", "meanpool_normalised", "maxsim"]
CaptionChoice = Literal["mixed", "long", "short"]
SFT_COMMAND = "lightning fit --config experiments/procir/sft_stage.yaml"


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
            request, the model's own way), ``meanpool`` (eq. 15), ``meanpool_normalised`` or
            ``maxsim`` over one request per view (the paper's baselines for single-image models).
        image_text_eval: also log I2T and T2I Recall@1/5 between gallery products and their short
            captions (``val/i2t_recall_at_1``, ...).
        sft_checkpoint: a ``ProCIRSFT`` checkpoint whose backbone initialises this one.
        seed: seed of the per-step random choices (caption kind, CoT tokens; ``sample_rng``).
        loss, optimizer, scheduler, evaluation, init_checkpoint, skip_bad_steps, grad_cache_chunk, lora,
            mined_negatives: see ``RetrievalModule``; the loss defaults to symmetric InfoNCE with a fixed τ = 0.07.
    """

    def __init__(self, backbone: QwenBackbone, two_stage_dialogue: bool = True, align: bool = True,
                 cot: bool = False, doc_align_weight: float = 0.25, src_align_weight: float = 0.25,
                 align_caption: CaptionChoice = "mixed", view_strategy: ViewStrategy = "joint",
                 image_text_eval: bool = True, sft_checkpoint: str | None = None, seed: int = 0,
                 loss: nn.Module | None = None, optimizer: OptimizerCallable = procir_optimizer,
                 scheduler: LRSchedulerCallable | None = None, evaluation: RetrievalEval | None = None,
                 init_checkpoint: str | None = None, skip_bad_steps: bool = False,
                 grad_cache_chunk: int | None = None,
                 lora: LoraSettings | None = None,
                 mined_negatives: MinedNegativesLoss | None = None) -> None:
        super().__init__(loss=loss or SymmetricInfoNCE(temperature=0.07, learnable_temperature=False),
                         optimizer=optimizer, scheduler=scheduler, evaluation=evaluation,
                         init_checkpoint=init_checkpoint, skip_bad_steps=skip_bad_steps,
                         grad_cache_chunk=grad_cache_chunk, lora=lora,
                         mined_negatives=mined_negatives)
        save_config_hyperparameters(self, ["backbone", "loss", "optimizer", "scheduler"])
        problems = []
        if view_strategy == "maxsim" and self.evaluation.backend == "faiss":
            problems.append("view_strategy=maxsim scores view pairs: set evaluation.backend=torch")
        if min(doc_align_weight, src_align_weight) < 0:
            problems.append("doc_align_weight and src_align_weight must be >= 0")
        if problems:
            raise ValueError("model.init_args: " + "; ".join(problems))
        self.backbone = backbone
        self.backbone_name = backbone.name_or_path
        self.dialogue = DialogueBuilder(backbone)
        self.dialogues = ProCIRDialogues(self.dialogue, two_stage_dialogue)
        self.two_stage_dialogue = two_stage_dialogue
        self.align = align
        self.cot = cot
        self.doc_align_weight = doc_align_weight
        self.src_align_weight = src_align_weight
        self.align_caption = align_caption
        self.view_strategy = view_strategy
        self.sft_checkpoint = sft_checkpoint
        self.sft_init = sft_checkpoint is not None
        self.random_seed = seed
        # ρ(t), set before every training step by a CoTRatioSchedule callback; 1.0 = the whole caption.
        self.cot_keep_ratio = 1.0
        self.image_text = ImageTextRecall() if image_text_eval else None

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
        state = submodule_weights(path, "backbone.")
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if missing or unexpected or not state:
            raise ValueError(f"{path} does not fit this backbone ({self.backbone.name_or_path}): missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}; was it written by ProCIRSFT on the "
                             "same backbone preset?")
        self.sft_checkpoint = None  # once: a resumed run restores from its own checkpoint

    def on_train_start(self) -> None:
        if self.cot and not any(isinstance(cb, CoTRatioSchedule) for cb in self.trainer.callbacks):
            raise ValueError("model.init_args.cot=true needs the callbacks.CoTSchedule callback (progressive caption "
                             "removal); add it under trainer.callbacks, as experiments/procir/ablations/*cot*.yaml do.")

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.cot:
            self.log("train/cot_keep_ratio", self.cot_keep_ratio, batch_size=len(batch["text"]))

    # -- dialogues --------------------------------------------------------------------------------
    def _thought(self, product: dict[str, Any] | None, role: str) -> list[int]:
        """CoT: the subsampled long caption in training, nothing in evaluation or without CoT."""
        if not (self.cot and self.training and product) or self.cot_keep_ratio <= 0:
            return []
        rng = self.sample_rng("cot", role, product.get("dataset"), product.get("product_id"))
        return keep_tokens(self.backbone.text_ids(caption_text(product, "long")), self.cot_keep_ratio, rng)

    def document(self, views: list[PatchedImage], product: dict[str, Any] | None = None) -> Dialogue:
        return self.dialogues.document(views, self._thought(product, "document"))

    def query(self, views: list[PatchedImage], text: str, source: dict[str, Any] | None = None) -> Dialogue:
        return self.dialogues.query(views, text, self._thought(source, "query"))

    def _per_view(self, make: Any, items: list[list[PatchedImage]], *extra: list[Any]) -> list[torch.Tensor]:
        """Embeddings of ``make(views, *extra)`` per product, one tensor per ``<emb_all>``: joint (one
        request with every view), or one request per view, then mean-pooled or kept as multi-vectors
        for MaxSim, NaN-padded to ``MAX_VIEWS`` so batches concatenate."""
        strategy = "joint" if self.training else self.view_strategy
        if strategy == "joint":
            return self.dialogue.embed([make(v, *e) for v, *e in zip(items, *extra, strict=True)], self.device)
        seqs = [make([view], *e) for views, *e in zip(items, *extra, strict=True) for view in views]
        emb = self.dialogue.embed(seqs, self.device)[-1]
        return [pool_view_rows(emb, [len(v) for v in items], strategy)]

    @staticmethod
    def _normalize(x: torch.Tensor) -> torch.Tensor:
        return x if x.ndim == 3 else F.normalize(x.float(), dim=-1)  # multi-vectors are normalised per view

    def _query_turns(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Every ``<emb_all>`` of the query dialogues: [q] single-turn, [s, q] with MT."""
        sources = [m.get("source") if m else None for m in batch.get("meta") or [None] * len(batch["text"])]
        return self._per_view(self.query, batch["source_images"], batch["text"], sources)

    def _session_turns(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per turn row of a session batch, in its order: [q] single-turn, [s, q] with MT, read from
        one forward of each session's whole dialogue (every row of a session precedes the next's)."""
        sessions: dict[int, list[int]] = {}
        for row, s in enumerate(batch["session_index"]):
            sessions.setdefault(s, []).append(row)
        for rows in sessions.values():
            if [batch["turn_index"][r] for r in rows] != list(range(len(rows))):
                raise ValueError(f"session {batch['session_id'][rows[0]]!r}: its turn rows are not turns 0..T-1 in "
                                 "order; build session batches with datamodules.session_batches.flatten_sessions")
        meta = batch.get("meta") or [None] * len(batch["text"])
        seqs, queries = [], []
        for rows in sessions.values():
            turns = [Turn(batch["text"][r], list(batch["source_images"][r])) for r in rows]
            thoughts = [self._thought((meta[r] or {}).get("source"), "query") for r in rows]
            seq, query_index = self.dialogues.session(turns, thoughts)
            seqs.append(seq)
            queries.append([seq.emb_positions[i] for i in query_index])
        inputs = self.dialogue.batch(seqs, self.device)
        inputs.pop("labels")
        hidden = self.backbone(**inputs).last_hidden_state
        # Rows in batch order: dialogue i's turns are rows sessions[i] (their order checked above).
        row_of = torch.tensor([i for i, rows in enumerate(sessions.values()) for _ in rows], device=hidden.device)
        q_pos = torch.tensor([p for qs in queries for p in qs], device=hidden.device)
        order = torch.tensor([r for rows in sessions.values() for r in rows], device=hidden.device)
        q = hidden.new_empty(len(order), hidden.shape[-1])
        q[order] = hidden[row_of, q_pos]
        if not self.two_stage_dialogue:
            return [q]
        # With MT every turn brings its reference, so its s is the <emb_all> just before its q.
        s_pos = torch.tensor([seqs[i].emb_positions[seqs[i].emb_positions.index(p) - 1]
                              for i, qs in enumerate(queries) for p in qs], device=hidden.device)
        s = hidden.new_empty(len(order), hidden.shape[-1])
        s[order] = hidden[row_of, s_pos]
        return [s, q]

    # -- the contract and its hooks ---------------------------------------------------------------
    def encode_query(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._normalize(self._query_turns(batch)[-1])

    def encode_session(self, batch: dict[str, Any]) -> torch.Tensor:
        """Each turn's q with the session so far in context (the joint dialogue); with a per-view
        ``view_strategy`` there is no one dialogue to continue, so turns are single-turn queries."""
        if self.view_strategy != "joint":
            return super().encode_session(batch)
        return self._normalize(self._session_turns(batch)[-1])

    def encode_target(self, products: Products) -> torch.Tensor:
        meta = products.meta or [None] * len(products)
        return self._normalize(self._per_view(self.document, products.images, meta)[-1])

    def query_embeddings(self, views: list[list[PatchedImage]], texts: list[str]) -> torch.Tensor:
        """q for each (source views, modification text), as evaluation computes it."""
        return self._normalize(self._per_view(self.query, views, texts, [None] * len(texts))[-1])

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Caption embeddings t: ``[caption; <emb_all>]``, a text-only forward."""
        out = self.dialogue.embed([self.dialogues.caption(t) for t in texts], self.device)[0]
        return F.normalize(out.float(), dim=-1)

    def embed_pair(self, batch: dict[str, Any]) -> TrainingPair:
        """q and, with MT, turn 1's s from the same forward; then the target documents; with Align,
        the caption embeddings t of the targets (and, with MT, of the sources)."""
        if is_session_batch(batch) and self.grad_cache_chunk:
            raise ValueError("model.init_args.grad_cache_chunk with data.init_args.train_on=sessions: a session's "
                             "turns are one dialogue and cannot be split into chunks; set grad_cache_chunk=null")
        turns = self._session_turns(batch) if is_session_batch(batch) else self._query_turns(batch)
        mt = self.two_stage_dialogue and len(turns) == 2
        extras = {"source": F.normalize(turns[0].float(), dim=-1)} if mt else {}
        target = self.encode_target(Products.targets_of(batch))
        if self.align:
            kind = self._caption_kind()  # one choice per step, as the paper
            extras["target_caption"] = self.embed_texts([caption_text(m["target"], kind) for m in batch["meta"]])
            if mt:
                extras["source_caption"] = self.embed_texts([caption_text(m["source"], kind) for m in batch["meta"]])
        return TrainingPair(self._normalize(turns[-1]), target, extras)

    def _caption_kind(self) -> str:
        if self.align_caption == "mixed":
            return "long" if self.sample_rng("caption_kind").random() < 0.5 else "short"
        return self.align_caption

    def training_terms(self, pair: TrainingPair, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # False negatives: L_cir's and L_doc's positives are target documents and captions, so two rows
        # with the same target product are masked from each other's negatives; L_src pairs turn 1's s
        # with the *source* caption, so there it is the source product that must not repeat.
        targets = batch_keys(batch, "target_id", self.device)
        terms = {"cir": self.loss(pair.query, pair.target, gather=True, **id_kwargs(self.loss, targets))}
        loss = terms["cir"]
        if self.align:
            terms["doc"] = self.loss(pair.target, pair.extras["target_caption"], gather=True,
                                      **id_kwargs(self.loss, targets))
            loss = loss + self.doc_align_weight * terms["doc"]
            if "source" in pair.extras:
                terms["src"] = self.loss(pair.extras["source"], pair.extras["source_caption"], gather=True,
                                         **id_kwargs(self.loss, batch_keys(batch, "source_id", self.device)))
                loss = loss + self.src_align_weight * terms["src"]
        return {"loss": loss, **terms}

    # -- image-text evaluation --------------------------------------------------------------------
    def after_gallery_batch(self, products: Products, embedding: torch.Tensor, split: str,
                            ids: torch.Tensor, datasets: torch.Tensor) -> None:
        if self.image_text is None or embedding.ndim != 2:
            return
        captions = products.captions or [""] * len(products)
        texts = self.embed_texts([(m or {}).get("short_caption") or c for m, c in zip(products.meta, captions,
                                                                                      strict=True)])
        self.image_text.update(split, embedding, texts, ids, datasets)

    def after_evaluation(self, split: str) -> None:
        if self.image_text is None:
            return
        for name, value in self.image_text.compute(split).items():
            self.log(f"{split}/{name}", value, sync_dist=False, add_dataloader_idx=False, rank_zero_only=False)
