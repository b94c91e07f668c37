"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``) as an embedding backbone, with its image processing.

Images go through ``Qwen2VLImageProcessorPil`` one view at a time (aspect ratio kept, pixel count
clamped to [128², 512²]): a view becomes a ``PatchedImage`` (its flattened patches and its
``(t, h, w)`` patch grid), so products with views of different sizes batch without resizing them
to one shape. Dialogues are tokenised by ``backbones.qwen_chat``; this module only runs
them and exposes the last hidden layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .fast_transforms import BACKBONE_KEY, Preprocessing, check_preprocessing, qwen_patches
from .kernels import warn_if_slow
from .registry import checkpoint_source, get_preset, hub_kwargs, load_error
from .tokenizer import build_word_tokenizer
from .vocabulary import qwen_words

EMB_TOKEN = "<emb_all>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
THINK, THINK_END = "<think>", "</think>"
CHAT_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>", THINK, THINK_END, EMB_TOKEN)
MIN_PIXELS, MAX_PIXELS = 128 * 128, 512 * 512
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class PatchedImage:
    """One processed view: ``pixel_values`` ``[patches, C·T·P·P]`` and ``grid_thw`` ``[3]``."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor


class QwenImageTransform:
    """PIL view → ``PatchedImage`` with Qwen's image processor settings; picklable for DataLoader workers.

    ``fast`` (the default) decodes a shard's JPEG view at a reduced scale, resizes with torch and
    patchifies the uint8 image (``fast_transforms``): the same ``grid_thw`` and shapes, pixels within
    the tolerance its tests state; ``exact`` equals the processor within float rounding.
    """

    def __init__(self, processor: Qwen2VLImageProcessorPil, preprocessing: Preprocessing = "fast") -> None:
        self.processor = processor
        self.preprocessing = check_preprocessing(preprocessing)

    def __call__(self, img: Image.Image) -> PatchedImage:
        img = img if img.mode == "RGB" else img.convert("RGB")  # alpha dropped, not composited, as before
        out = qwen_patches(img, self.processor, self.preprocessing)
        if out is not None:
            return PatchedImage(*out)
        processed = self.processor(images=img, return_tensors="pt")
        return PatchedImage(processed["pixel_values"], processed["image_grid_thw"][0])


def image_processor(patch_size: int, merge_size: int, temporal_patch_size: int) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
                                    patch_size=patch_size, merge_size=merge_size,
                                    temporal_patch_size=temporal_patch_size)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    return build_word_tokenizer(qwen_words(), extra_special_tokens=CHAT_TOKENS, model_max_length=4096,
                                add_bos_eos=False, single_punctuation=True)


def build_config(cfg: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Qwen3_5Config:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_PAD, "<|video_pad|>", VISION_START, VISION_END)}
    text = dict(cfg["text"])
    text.setdefault("vocab_size", len(tokenizer))
    text.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END))
    return Qwen3_5Config(text_config=text, vision_config=cfg["vision"], image_token_id=ids[IMAGE_PAD],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids[VISION_START],
                         vision_end_token_id=ids[VISION_END], tie_word_embeddings=cfg.get("tie_word_embeddings", True))


def load_tokenizer(source: str, trust_remote_code: bool = False, **hub: Any) -> PreTrainedTokenizerBase:
    """The folder's tokenizer. A saved word-level tokenizer (tiny models) is loaded as itself:
    AutoTokenizer would pick the Qwen3.5 BPE class from config.json and drop its vocabulary."""
    config = Path(source) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in GENERIC_TOKENIZERS:
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)


def _dtype(dtype: Dtype) -> torch.dtype | str:
    return "auto" if dtype == "auto" else getattr(torch, dtype)


class QwenBackbone(nn.Module):
    """Qwen3.5 multimodal LLM: dialogues in, last-layer hidden states out.

    Args:
        name_or_path: a preset name (``tiny``, ``qwen3.5-0.8b``, ``qwen3.5-0.8b-random``), a hub id
            or a local folder written by ``save_pretrained``.
        dtype: weights dtype when loading a checkpoint (``auto``: the checkpoint's, bf16 for
            Qwen3.5). Training on a GPU uses the Trainer's ``bf16-mixed`` on top.
        trust_remote_code: passed to ``from_pretrained``; off unless you trust the source.
        gradient_checkpointing: recompute activations in backward (real sizes on small GPUs).
        seed: seed of a random-init preset's weights.
        min_pixels, max_pixels: the range a view is resized into (default: the paper's 128² to 512²);
            fewer pixels, fewer image tokens (a view takes pixels / 32² of them).
        preprocessing: how ``image_transform`` turns views into patches: ``fast`` (the default, for
            training throughput; 1-2 uint8 levels off the processor) or ``exact`` (the processor's own
            values, for reproducing reported numbers).
    """

    def __init__(self, name_or_path: str = "tiny", dtype: Dtype = "auto", trust_remote_code: bool = False,
                 gradient_checkpointing: bool = False, seed: int = 0, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, preprocessing: Preprocessing = "fast") -> None:
        super().__init__()
        self.name_or_path = name_or_path
        self.preprocessing = check_preprocessing(preprocessing, BACKBONE_KEY)
        preset = get_preset("qwen3.5", name_or_path)
        if preset is not None and preset.random_init:
            self.tokenizer = tiny_tokenizer()
            vision = preset.config["vision"]
            self.processor = image_processor(vision["patch_size"], vision["spatial_merge_size"],
                                             vision["temporal_patch_size"])
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.model = Qwen3_5ForConditionalGeneration(build_config(preset.config, self.tokenizer))
        else:
            source = checkpoint_source("qwen3.5", name_or_path)
            try:
                hub = hub_kwargs(source)
                self.model = Qwen3_5ForConditionalGeneration.from_pretrained(
                    source, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, **hub)
                self.tokenizer = load_tokenizer(source, trust_remote_code, **hub)
                self.processor = Qwen2VLImageProcessorPil.from_pretrained(source, **hub)
            except OSError as exc:
                raise load_error("the Qwen3.5 backbone", source, exc) from exc
            self.model.train()
        if min_pixels > max_pixels:
            raise ValueError(f"model.init_args.backbone.init_args: min_pixels={min_pixels} > max_pixels={max_pixels}")
        # The configured pixel range (the paper's by default), whatever the checkpoint's processor says.
        self.processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self._add_chat_tokens()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.token_ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS}
        self.merge = int(self.model.config.vision_config.spatial_merge_size)

    def _add_chat_tokens(self) -> None:
        """``<emb_all>`` (and, for a tokenizer without Qwen's chat tokens, those) added as special
        tokens; the embedding matrix grows only if a new id falls outside it (Qwen's matrix is
        padded beyond the tokenizer, and shrinking it would drop rows)."""
        missing = [t for t in CHAT_TOKENS if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                              replace_extra_special_tokens=False)
        rows = self.model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=True)

    @property
    def dim(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_transform(self) -> QwenImageTransform:
        return QwenImageTransform(self.processor, self.preprocessing)

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.model.model.visual.dtype

    def image_tokens(self, image: PatchedImage) -> int:
        """Placeholder tokens one view takes in the sequence (its patches after spatial merging)."""
        return int(math.prod(image.grid_thw.tolist())) // self.merge**2

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, use_cache: bool = False) -> Any:
        """The base model's output: ``last_hidden_state`` (after the final norm) and the cache."""
        warn_if_slow(input_ids.device, self.model)  # once per process, on a GPU without the fast kernels
        return self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                                mm_token_type_ids=mm_token_type_ids, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=use_cache)

    def save_pretrained(self, folder: str | Path) -> None:
        """Model, tokenizer and image processor in one folder, loadable with ``QwenBackbone(folder)``."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.processor.save_pretrained(folder)
