"""CLIP image and text encoders (Hugging Face ``CLIPModel``) behind one small interface."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..components.multiview import masked_mean
from .fast_transforms import BACKBONE_KEY, Preprocessing, check_preprocessing, clip_pixels
from .registry import checkpoint_source, get_preset, hub_kwargs, load_error
from .tokenizer import build_word_tokenizer
from .vocabulary import clip_words


class HFImageTransform:
    """PIL image → pixel tensor with a Hugging Face image processor's settings; picklable for workers.

    ``fast`` (the default) decodes a shard's JPEG view at a reduced scale and resizes with torch
    (``fast_transforms``): the same shape, pixels within the tolerance its tests state; ``exact``
    equals the processor within float rounding. Settings ``fast_transforms`` does not reproduce go
    through the processor itself.
    """

    def __init__(self, processor: CLIPImageProcessorPil, preprocessing: Preprocessing = "fast") -> None:
        self.processor = processor
        self.preprocessing = check_preprocessing(preprocessing)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = clip_pixels(img, self.processor, self.preprocessing)
        if pixels is None:
            return self.processor(images=img, return_tensors="pt")["pixel_values"][0]
        return pixels


class CLIPBackbone(nn.Module):
    """CLIP encoders: ``encode_images`` and ``encode_texts`` return projected, unnormalised features.

    Args:
        name_or_path: a preset name (``tiny``, ``clip-vit-b32``), a hub id or a local folder.
        trust_remote_code: passed to ``from_pretrained``; off unless you trust the source.
        preprocessing: how ``image_transform`` turns views into pixels: ``fast`` (the default, for
            training throughput) or ``exact`` (the processor's own values, for reproducing reported numbers).
    """

    def __init__(self, name_or_path: str = "tiny", trust_remote_code: bool = False,
                 preprocessing: Preprocessing = "fast") -> None:
        super().__init__()
        self.name_or_path = name_or_path
        self.preprocessing = check_preprocessing(preprocessing, BACKBONE_KEY)
        preset = get_preset("clip", name_or_path)
        if preset is not None and preset.random_init:
            cfg = preset.config
            self.tokenizer = build_word_tokenizer(clip_words(), model_max_length=cfg["text"]["max_position_embeddings"])
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
                hub = hub_kwargs(source)
                self.model = CLIPModel.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
                self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
                self.processor = CLIPImageProcessorPil.from_pretrained(source, **hub)
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
        return HFImageTransform(self.processor, self.preprocessing)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def encode_view_grid(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, V, 3, H, W]`` views → ``[B, V, D]`` features, every real view through the image
        encoder in one batch; padded slots are zero."""
        b, v = mask.shape
        feats = self.encode_images(images[mask])
        full = feats.new_zeros(b, v, feats.shape[-1])
        full[mask] = feats
        return full

    def encode_products(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, V, 3, H, W]`` views → ``[B, D]`` product features: the mean over the real views."""
        return masked_mean(self.encode_view_grid(images, mask), mask)

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
