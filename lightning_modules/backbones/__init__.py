"""Backbones and their named presets."""

from .clip import CLIPBackbone
from .registry import PRESETS, BackbonePreset, get_preset, preset_names

__all__ = ["PRESETS", "BackbonePreset", "CLIPBackbone", "get_preset", "preset_names"]
