"""One way to call a chat model, shared by ``cir caption`` and ``cir build``: requests of text and
images, answered by an in-process transformers model or an OpenAI-compatible server."""

from .chat import ChatBackend, ChatRequest, Completion, EndpointUnavailable, ImagePart, encode_image
from .local_model import TransformersChat
from .openai_http import OpenAIChat

__all__ = ["ChatBackend", "ChatRequest", "Completion", "EndpointUnavailable", "ImagePart", "OpenAIChat",
           "TransformersChat", "encode_image"]
