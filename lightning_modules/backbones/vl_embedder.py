"""Open multimodal embedding models used zero-shot: Qwen3-VL-Embedding, GME and RzenEmbed.

Each is a Qwen-family vision-language model whose embedding is the last layer's hidden state at
the final token of a chat-formatted request, L2-normalised. What differs between them is written on
their model cards and in their reference code, and is kept here as an ``EmbedderCard``:

- Qwen3-VL-Embedding (Qwen3-VL): the instruction is the system message (by default "Represent the
  user's input."), the request ends with the assistant turn's opening and that last token is
  pooled; images of 4,096 to 1,843,200 pixels, 16-px patches, mean/std 0.5.
- GME (Qwen2-VL): the task instruction is the system message of queries, documents get "You are a
  helpful assistant."; an ``<|endoftext|>`` after the assistant opening is the pooled token; images
  of 256 to 1,280 merged 28-px tiles (200,704 to 1,003,520 pixels), CLIP's mean/std.
- RzenEmbed (Qwen2-VL): GME's format, but the system message is always "You are a helpful
  assistant." and the instruction is written in front of the user's text.

Requests are built token by token with ``qwen_chat.DialogueBuilder`` (images before text, as the
reference code orders them), right-padded, and run in micro-batches of at most ``max_batch_tokens``
padded tokens, so an 8B model in bf16 stays within a 24 GB GPU whatever the evaluation batch size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .fast_transforms import BACKBONE_KEY, Preprocessing, check_preprocessing
from .qwen import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    Dtype,
    PatchedImage,
    QwenImageTransform,
    load_tokenizer,
)
from .qwen_chat import Dialogue, DialogueBuilder
from .registry import Family, checkpoint_source, get_preset, hub_kwargs, load_error
from .tokenizer import build_word_tokenizer
from .vocabulary import qwen_words

END_OF_TEXT = "<|endoftext|>"
EMBEDDER_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>", END_OF_TEXT)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CIR_QUERY_INSTRUCTION = ("Given the product in the images and a requested change, find the product that "
                         "looks like it after the change.")

Architecture = Literal["qwen3-vl", "qwen2-vl"]
Role = Literal["query", "document"]


@dataclass(frozen=True)
class EmbedderCard:
    """How a model card says to prompt, pool and size images for one embedding model.

    ``instruction_in``: ``system`` (the instruction is the system message) or ``user`` (the system
    message is ``system_text`` and the instruction precedes the user's text). ``pooled_token``: a
    special token appended after the assistant opening whose hidden state is the embedding (none:
    the opening's last token)."""

    architecture: Architecture
    query_instruction: str
    document_instruction: str
    instruction_in: Literal["system", "user"] = "system"
    system_text: str = ""
    pooled_token: str | None = None
    min_pixels: int = 4096
    max_pixels: int = 1_843_200
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)


CARDS: dict[str, EmbedderCard] = {
    "qwen3-vl-embedding": EmbedderCard(
        architecture="qwen3-vl", query_instruction=CIR_QUERY_INSTRUCTION,
        document_instruction="Represent the user's input."),
    "gme": EmbedderCard(
        architecture="qwen2-vl", query_instruction=CIR_QUERY_INSTRUCTION,
        document_instruction="You are a helpful assistant.", pooled_token=END_OF_TEXT,
        min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD),
    "rzenembed": EmbedderCard(
        architecture="qwen2-vl", instruction_in="user", system_text="You are a helpful assistant.",
        query_instruction=CIR_QUERY_INSTRUCTION, document_instruction="Represent the given image.",
        pooled_token=END_OF_TEXT, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD),
}

_ARCHITECTURES: dict[Architecture, tuple[type, type[PreTrainedModel]]] = {
    "qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
}


def card_of(family: Family, name_or_path: str, card: str | None) -> EmbedderCard:
    """The named card, else the preset's, else the family's own (a folder or hub id of that family)."""
    preset = get_preset(family, name_or_path)
    key = card or (preset.card if preset is not None else family)
    if key not in CARDS:
        raise ValueError(f"model.init_args.backbone.init_args.card={key!r} is not a known embedder card: "
                         f"choose one of {sorted(CARDS)}")
    return CARDS[key]


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Word-level tokenizer over the generated data and every card's instructions."""
    cards = " ".join(f"{c.query_instruction} {c.document_instruction} {c.system_text}" for c in CARDS.values())
    words = qwen_words() | {w.lower() for w in re.findall(r"\w+", cards)}
    return build_word_tokenizer(words, extra_special_tokens=EMBEDDER_TOKENS, model_max_length=8192,
                                add_bos_eos=False, single_punctuation=True)


def build_config(architecture: Architecture, cfg: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Any:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in EMBEDDER_TOKENS}
    text = dict(cfg["text"], vocab_size=cfg["text"].get("vocab_size", len(tokenizer)),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=ids[IM_END])
    config_class = _ARCHITECTURES[architecture][0]
    return config_class(text_config=text, vision_config=cfg["vision"], image_token_id=ids[IMAGE_PAD],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids[VISION_START],
                        vision_end_token_id=ids[VISION_END], tie_word_embeddings=True)


class VLEmbedderBackbone(nn.Module):
    """A Qwen2-VL or Qwen3-VL embedding model: requests in, normalised last-token embeddings out.

    Args:
        name_or_path: a preset of ``family`` (``tiny``, ``qwen3-vl-embedding-2b``, ``gme-qwen2-vl-7b``, ...),
            a hub id or a folder written by ``save_pretrained``.
        family: ``qwen3-vl-embedding`` (Qwen3-VL weights) or ``gme`` (Qwen2-VL weights: GME, RzenEmbed).
        card: the prompting recipe (``CARDS``); default: the preset's, else the family's.
        dtype: weights dtype when loading a checkpoint (``auto``: the checkpoint's, bf16 for these).
        max_batch_tokens: padded tokens (rows × longest request) per forward; a batch is split into
            as many forwards as it needs, longest requests together.
        min_pixels, max_pixels: override the card's image size limits.
        trust_remote_code: passed to ``from_pretrained``; off unless you trust the source.
        seed: seed of a random-init preset's weights.
        init_device: where a random-weight preset is built (``cuda`` builds the 8B architecture in
            seconds, where the CPU takes minutes); its dtype is ``dtype`` (``auto``: float32).
        preprocessing: how ``image_transform`` turns views into patches: ``fast`` (the default, for
            training throughput) or ``exact`` (the processor's own values, for reproducing reported numbers).
    """

    def __init__(self, name_or_path: str = "tiny", family: Literal["qwen3-vl-embedding", "gme"] = "qwen3-vl-embedding",
                 card: str | None = None, dtype: Dtype = "auto", max_batch_tokens: int = 16384,
                 min_pixels: int | None = None, max_pixels: int | None = None, trust_remote_code: bool = False,
                 seed: int = 0, init_device: str = "cpu", preprocessing: Preprocessing = "fast") -> None:
        super().__init__()
        if max_batch_tokens < 1:
            raise ValueError(f"model.init_args.backbone.init_args.max_batch_tokens={max_batch_tokens}: must be >= 1")
        self.preprocessing = check_preprocessing(preprocessing, BACKBONE_KEY)
        self.name_or_path = name_or_path
        self.family = family
        self.card = card_of(family, name_or_path, card)
        self.max_batch_tokens = max_batch_tokens
        model_class = _ARCHITECTURES[self.card.architecture][1]
        weights_dtype = getattr(torch, dtype) if dtype != "auto" else None
        preset = get_preset(family, name_or_path)
        if preset is not None and preset.random_init:
            self.tokenizer = tiny_tokenizer()
            vision = preset.config["vision"]
            image = preset.config.get("image", {})
            self.processor = Qwen2VLImageProcessorPil(
                patch_size=vision["patch_size"], merge_size=vision.get("spatial_merge_size", 2),
                temporal_patch_size=vision.get("temporal_patch_size", 2), image_mean=list(self.card.image_mean),
                image_std=list(self.card.image_std))
            limits = (image.get("min_pixels", self.card.min_pixels), image.get("max_pixels", self.card.max_pixels))
            config = build_config(self.card.architecture, preset.config, self.tokenizer)
            with torch.random.fork_rng(devices=[]), torch.device(init_device):
                torch.manual_seed(seed)
                model = model_class._from_config(config, dtype=weights_dtype or torch.float32)
        else:
            source = checkpoint_source(family, name_or_path)
            try:
                hub = hub_kwargs(source)
                # The generation class knows both checkpoint layouts (GME's predates the
                # language_model/visual split); its LM head is dropped below.
                model = model_class.from_pretrained(source, dtype=weights_dtype or "auto",
                                                    trust_remote_code=trust_remote_code, **hub)
                self.tokenizer = load_tokenizer(source, trust_remote_code, **hub)
                self.processor = Qwen2VLImageProcessorPil.from_pretrained(source, **hub)
            except OSError as exc:
                raise load_error(f"the {family} embedder", source, exc) from exc
            limits = (self.card.min_pixels, self.card.max_pixels)
        limits = (min_pixels or limits[0], max_pixels or limits[1])
        self.processor.size = {"shortest_edge": limits[0], "longest_edge": limits[1]}
        self.model = model.model  # the multimodal base model: no LM head is needed to embed
        self.model.train()
        missing = [t for t in EMBEDDER_TOKENS if t not in self.tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"{name_or_path}: its tokenizer lacks {missing}; is it a Qwen2-VL/Qwen3-VL checkpoint?")
        self.token_ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in EMBEDDER_TOKENS}
        self.merge = int(self.model.config.vision_config.spatial_merge_size)
        self.builder = DialogueBuilder(self)

    # -- what DialogueBuilder needs (``qwen_chat.ChatBackbone``) -----------------------------------
    @property
    def vision_dtype(self) -> torch.dtype:
        return self.model.visual.dtype

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def image_tokens(self, image: PatchedImage) -> int:
        return int(image.grid_thw.prod()) // self.merge**2

    def forward(self, **inputs: Any) -> Any:
        inputs.pop("labels", None)
        return self.model(**inputs, use_cache=False)

    # -- embedding ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_transform(self) -> QwenImageTransform:
        return QwenImageTransform(self.processor, self.preprocessing)

    def instruction(self, role: Role, override: str | None = None) -> str:
        if override is not None:
            return override
        return self.card.query_instruction if role == "query" else self.card.document_instruction

    def request(self, images: list[PatchedImage], text: str = "", role: Role = "document",
                instruction: str | None = None) -> Dialogue:
        """One request as the card formats it: system message, user turn (images, then text), the
        assistant opening and the pooled token."""
        instruction = self.instruction(role, instruction)
        b = self.builder
        if self.card.instruction_in == "system":
            seq = b.system(Dialogue(), instruction)
        else:
            seq = b.system(Dialogue(), self.card.system_text)
            # Written straight before the text, as RzenEmbed's reference code does; a space keeps
            # the last word of an instruction without trailing space from merging with the first of the text.
            text = instruction + ("" if not text or instruction[-1:].isspace() else " ") + text
        seq = b.user_parts(seq, [*images, text.strip()])
        return b.assistant_opening(seq, self.card.pooled_token)

    def micro_batches(self, seqs: list[Dialogue]) -> list[list[int]]:
        """Indices of ``seqs`` in forwards of at most ``max_batch_tokens`` padded tokens: longest first,
        so rows of similar length share a forward (a single request longer than the budget runs alone)."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
        groups: list[list[int]] = []
        for i in order:
            # Sorted longest first, so the group's first row sets its padded length.
            if groups and len(seqs[groups[-1][0]].ids) * (len(groups[-1]) + 1) <= self.max_batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def embed(self, seqs: list[Dialogue]) -> torch.Tensor:
        """``[N, D]`` L2-normalised float32 embeddings at each request's last token, in input order."""
        device = next(self.model.parameters()).device
        out: torch.Tensor | None = None
        for group in self.micro_batches(seqs):
            inputs = self.builder.batch([seqs[i] for i in group], device)
            hidden = self(**inputs).last_hidden_state
            last = inputs["attention_mask"].sum(1) - 1  # right padding: the last real token
            emb = F.normalize(hidden[torch.arange(len(group), device=device), last].float(), dim=-1)
            if out is None:
                out = emb.new_empty(len(seqs), emb.shape[-1])
            out[torch.tensor(group, device=device)] = emb
        assert out is not None, "embed() needs at least one request"
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        """Model, tokenizer and image processor in one folder, loadable with ``VLEmbedderBackbone(folder)``."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.processor.save_pretrained(folder)
