"""Backbones (CLIP, Qwen3.5 and its chat dialogues, the Qwen-VL embedders, a tiny LLaVA) and their named presets."""

from .blip2 import Blip2Backbone
from .clip import CLIPBackbone, HFImageTransform
from .qwen import PatchedImage, QwenBackbone
from .qwen_chat import Dialogue, DialogueBuilder
from .registry import PRESETS, BackbonePreset, get_preset, preset_names
from .vl_embedder import CARDS, EmbedderCard, VLEmbedderBackbone

__all__ = ["CARDS", "PRESETS", "BackbonePreset", "Blip2Backbone", "CLIPBackbone", "Dialogue", "DialogueBuilder",
           "EmbedderCard", "HFImageTransform", "PatchedImage", "QwenBackbone", "VLEmbedderBackbone", "get_preset",
           "preset_names"]
