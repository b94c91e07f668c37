"""Backbones (CLIP, Qwen3.5 and its chat dialogues, the Qwen-VL embedders, a tiny LLaVA) and their named presets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.lazy import lazy_namespace

if TYPE_CHECKING:
    from .blip2 import Blip2Backbone
    from .clip import CLIPBackbone, HFImageTransform
    from .qwen import PatchedImage, QwenBackbone
    from .qwen_chat import Dialogue, DialogueBuilder
    from .registry import PRESETS, BackbonePreset, get_preset, preset_names
    from .vl_embedder import CARDS, EmbedderCard, VLEmbedderBackbone

_EXPORTS = {
    "BackbonePreset": ".registry",
    "Blip2Backbone": ".blip2",
    "CARDS": ".vl_embedder",
    "CLIPBackbone": ".clip",
    "Dialogue": ".qwen_chat",
    "DialogueBuilder": ".qwen_chat",
    "EmbedderCard": ".vl_embedder",
    "HFImageTransform": ".clip",
    "PRESETS": ".registry",
    "PatchedImage": ".qwen",
    "QwenBackbone": ".qwen",
    "VLEmbedderBackbone": ".vl_embedder",
    "get_preset": ".registry",
    "preset_names": ".registry",
}
__all__ = ["BackbonePreset", "Blip2Backbone", "CARDS", "CLIPBackbone", "Dialogue", "DialogueBuilder", "EmbedderCard",
           "HFImageTransform", "PRESETS", "PatchedImage", "QwenBackbone", "VLEmbedderBackbone", "get_preset",
           "preset_names"]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
