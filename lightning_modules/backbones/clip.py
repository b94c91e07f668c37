"""CLIP image and text encoders (Hugging Face ``CLIPModel``) behind one small interface."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedTokenizerBase
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .registry import checkpoint_source, get_preset
from .tokenizer import build_word_tokenizer


class HFImageTransform:
    """PIL image → pixel tensor through a Hugging Face image processor; picklable for workers."""

    def __init__(self, processor: CLIPImageProcessorPil) -> None:
        self.processor = processor

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]


def load_error(what: str, source: str, exc: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return OSError(
        f"could not load {what} from {source!r} ({type(exc).__name__}: {exc}). "
        f"{'HF_HUB_OFFLINE=1 is set, so hub ids resolve only from the local cache. ' if offline else ''}"
        "Give a local folder written with save_pretrained (model, tokenizer and preprocessor), "
        "or a hub id on a machine with network access."
    )


def _tiny_tokenizer(max_length: int) -> PreTrainedTokenizerBase:
    # Imported here: the generated vocabulary is only needed when a tiny model is built.
    from datamodules.synthetic.text import vocabulary

    return build_word_tokenizer(vocabulary(), model_max_length=max_length)


class CLIPBackbone(nn.Module):
    """CLIP encoders: ``encode_images`` and ``encode_texts`` return projected, unnormalised features.

    Args:
        name_or_path: a preset name (``tiny``, ``clip-vit-b32``), a hub id or a local folder.
        trust_remote_code: passed to ``from_pretrained``; off unless you trust the source.
    """

    def __init__(self, name_or_path: str = "tiny", trust_remote_code: bool = False) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        preset = get_preset("clip", name_or_path)
        if preset is not None and preset.random_init:
            cfg = preset.config
            self.tokenizer = _tiny_tokenizer(cfg["text"]["max_position_embeddings"])
            text = dict(cfg["text"], vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                        bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id)
            config = CLIPConfig(text_config=text, vision_config=cfg["vision"], projection_dim=cfg["projection_dim"])
            self.model = CLIPModel(config)
            size = preset.image_size
            self.processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                                   crop_size={"height": size, "width": size})
        else:
            source = checkpoint_source("clip", name_or_path)
            try:
                self.model = CLIPModel.from_pretrained(source, trust_remote_code=trust_remote_code)
                self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
                self.processor = CLIPImageProcessorPil.from_pretrained(source)
            except OSError as exc:
                raise load_error("the CLIP backbone", source, exc) from exc
            self.model.train()  # from_pretrained returns eval mode; this module is built to be trained
        # The losses own the temperature: CLIP's own logit_scale is unused, and an unused trainable
        # parameter leaves DDP's gradient buckets unreduced.
        self.model.logit_scale.requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_transform(self) -> HFImageTransform:
        return HFImageTransform(self.processor)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        return self.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                            attention_mask=tok["attention_mask"].to(device)).pooler_output

    def save_pretrained(self, folder: str | Path) -> None:
        """Model, tokenizer and preprocessor in one folder, loadable with ``CLIPBackbone(folder)``."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.processor.save_pretrained(folder)
