"""Backbones and their named presets."""

from .clip import CLIPBackbone
from .qwen import QwenBackbone
from .registry import PRESETS, BackbonePreset, get_preset, preset_names

__all__ = ["PRESETS", "BackbonePreset", "CLIPBackbone", "QwenBackbone", "get_preset", "preset_names"]
