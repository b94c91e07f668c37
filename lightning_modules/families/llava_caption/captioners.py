"""Captioners for the LLaVA-caption CIR family: multimodal LLMs that describe fashion items.

Each captioner has ``describe(images, prompt)`` (one caption per image, image-conditioned) and
``rewrite(texts, prompt)`` (text-only generation, for the modified-text synthesis). Models are
called through ``generation`` (the backends ``cir build`` uses too): in process by hub id or
``save_pretrained`` folder (LLaVA, Qwen3.5, any image-text-to-text model), or on an
OpenAI-compatible server. ``OracleCaptioner`` returns the generated dataset's own attribute
captions, the embedded default.
"""

from __future__ import annotations

from typing import Any, Protocol

from PIL import Image

from ...generation import ChatBackend, ChatRequest, Completion, OpenAIChat, TransformersChat, encode_image


class Captioner(Protocol):
    name: str

    def describe(self, images: list[Image.Image], prompt: str, metas: list[dict[str, Any]]) -> list[str]: ...

    def rewrite(self, texts: list[str], prompt: str, metas: list[dict[str, Any]]) -> list[str]: ...


class OracleCaptioner:
    """The generator's attribute captions (and the long modification text) instead of a model."""

    name = "oracle"

    def describe(self, images: list[Image.Image], prompt: str, metas: list[dict[str, Any]]) -> list[str]:
        return [m.get("long_caption") or m.get("short_caption") or "" for m in metas]

    def rewrite(self, texts: list[str], prompt: str, metas: list[dict[str, Any]]) -> list[str]:
        return [m.get("modification_long") or m.get("modification_short") or "" for m in metas]


class CaptionFailed(RuntimeError):
    """Requests the backend answered with errors (a server's 4xx/5xx, an answer it could not give):
    the batch is not written, the finished ones are."""


class ChatCaptioner:
    """Greedy captions from any chat backend: an image then the prompt, or a text then the prompt."""

    def __init__(self, backend: ChatBackend, name: str, max_new_tokens: int = 96) -> None:
        self.backend, self.name, self.max_new_tokens = backend, name, max_new_tokens

    def _ask(self, turns: list[list[Any]]) -> list[str]:
        requests = [ChatRequest(user=turn, max_tokens=self.max_new_tokens, temperature=0.0, tag={"n": i})
                    for i, turn in enumerate(turns)]
        answers: dict[int, Completion] = {}
        self.backend.complete(requests, lambda i, c: answers.__setitem__(i, c))
        failed = [c.error for c in answers.values() if c.error]
        if failed:
            raise CaptionFailed(f"the {self.name} captioner failed on {len(failed)} requests: {failed[0]}")
        return [answers[i].text for i in range(len(turns))]

    def describe(self, images: list[Image.Image], prompt: str, metas: list[dict[str, Any]]) -> list[str]:
        return self._ask([[encode_image(img, lossless=True), prompt] for img in images])

    def rewrite(self, texts: list[str], prompt: str, metas: list[dict[str, Any]]) -> list[str]:
        return self._ask([[f"{t}\n{prompt}"] for t in texts])


def LlavaCaptioner(name_or_path: str = "llava-hf/llava-1.5-13b-hf", load_in_4bit: bool = False,  # noqa: N802
                   max_new_tokens: int = 96, device: str | None = None, batch_size: int = 64) -> ChatCaptioner:
    """LLaVA-1.5 (the paper's 13B by default), optionally 4-bit with bitsandbytes."""
    backend = TransformersChat(name_or_path, batch_size=batch_size, device=device, load_in_4bit=load_in_4bit)
    return ChatCaptioner(backend, "llava", max_new_tokens)


def QwenCaptioner(name_or_path: str = "Qwen/Qwen3.5-0.8B", max_new_tokens: int = 96,  # noqa: N802
                  device: str | None = None, batch_size: int = 64) -> ChatCaptioner:
    """Qwen3.5 (0.8B by default) as a second MLLM captioner."""
    preset = "qwen3.5-0.8b" if name_or_path == "Qwen/Qwen3.5-0.8B" else name_or_path
    return ChatCaptioner(TransformersChat(preset, batch_size=batch_size, device=device), "qwen3.5", max_new_tokens)


def ServedCaptioner(base_url: str, model: str, max_new_tokens: int = 96, concurrency: int = 8,  # noqa: N802
                    api_key_env: str = "OPENAI_API_KEY") -> ChatCaptioner:
    """Any model behind an OpenAI-compatible endpoint (vLLM, SGLang, ``transformers serve``)."""
    return ChatCaptioner(OpenAIChat(base_url, model, api_key_env=api_key_env, concurrency=concurrency), model,
                         max_new_tokens)
