"""Backbones (CLIP, Qwen3.5 and its chat dialogues, a tiny LLaVA) and their named presets."""

from .clip import CLIPBackbone, HFImageTransform
from .qwen import PatchedImage, QwenBackbone
from .qwen_chat import Dialogue, DialogueBuilder
from .registry import PRESETS, BackbonePreset, get_preset, preset_names

__all__ = ["PRESETS", "BackbonePreset", "CLIPBackbone", "Dialogue", "DialogueBuilder", "HFImageTransform",
           "PatchedImage", "QwenBackbone", "get_preset", "preset_names"]
