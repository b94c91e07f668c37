"""One way to call a chat model, shared by ``cir caption`` and ``cir build``: requests of text and
images, answered by an in-process transformers model or an OpenAI-compatible server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.lazy import lazy_namespace

if TYPE_CHECKING:
    from .chat import ChatBackend, ChatRequest, Completion, EndpointUnavailable, ImagePart, encode_image
    from .local_model import TransformersChat
    from .openai_http import OpenAIChat

_EXPORTS = {
    "ChatBackend": ".chat",
    "ChatRequest": ".chat",
    "Completion": ".chat",
    "EndpointUnavailable": ".chat",
    "ImagePart": ".chat",
    "OpenAIChat": ".openai_http",
    "TransformersChat": ".local_model",
    "encode_image": ".chat",
}
__all__ = ["ChatBackend", "ChatRequest", "Completion", "EndpointUnavailable", "ImagePart", "OpenAIChat",
           "TransformersChat", "encode_image"]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
