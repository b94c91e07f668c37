"""Open multimodal embedding models (Qwen3-VL-Embedding, GME, RzenEmbed) as zero-shot CIR baselines."""

from .model import MLLMEmbedder

__all__ = ["MLLMEmbedder"]
