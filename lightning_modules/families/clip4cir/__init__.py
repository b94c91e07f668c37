"""CLIP4CIR: CLIP encoders and a fusion head, trained in one or two stages."""

from .model import CLIP4CIR

__all__ = ["CLIP4CIR"]
