"""Converters from the real datasets' own layouts to the project's shard format."""

from .fashiongen_h5 import extract_fashiongen_h5
from .fashioniq import convert_fashioniq
from .fashionmv import convert_fashionmv

__all__ = ["convert_fashioniq", "convert_fashionmv", "extract_fashiongen_h5"]
