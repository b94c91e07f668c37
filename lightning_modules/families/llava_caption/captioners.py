"""Captioners for the LLaVA-caption CIR family: multimodal LLMs that describe fashion items.

Each captioner has ``describe(images, prompt)`` (one caption per image, image-conditioned) and
``rewrite(texts, prompt)`` (text-only generation, for the modified-text synthesis). ``LlavaCaptioner``
and ``QwenCaptioner`` wrap Hugging Face checkpoints (hub id or a local ``save_pretrained`` folder);
``OracleCaptioner`` returns the generated dataset's own attribute captions, the embedded default.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import torch
from PIL import Image

from ...backbones.qwen import IM_END, QwenBackbone
from ...backbones.qwen_chat import Dialogue, DialogueBuilder
from ...backbones.registry import hub_kwargs, load_error, require_hub_source


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


class _HFChatCaptioner:
    """Shared generation loop: chat template with an image slot, greedy decoding, new tokens only."""

    name = "hf"

    def __init__(self, model: Any, processor: Any, max_new_tokens: int) -> None:
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    def _generate(self, conversations: list[list[dict[str, Any]]], images: list[Image.Image] | None) -> list[str]:
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in conversations]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images is not None:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def describe(self, images: list[Image.Image], prompt: str, metas: list[dict[str, Any]]) -> list[str]:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self._generate([conv] * len(images), images)

    def rewrite(self, texts: list[str], prompt: str, metas: list[dict[str, Any]]) -> list[str]:
        convs = [[{"role": "user", "content": [{"type": "text", "text": f"{t}\n{prompt}"}]}] for t in texts]
        return self._generate(convs, None)


def _quantization(load_in_4bit: bool) -> dict[str, Any]:
    if not load_in_4bit:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("load_in_4bit needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)}


class LlavaCaptioner(_HFChatCaptioner):
    """LLaVA-1.5 (``llava-hf/llava-1.5-13b-hf`` by default), optionally 4-bit with bitsandbytes."""

    name = "llava"

    def __init__(self, name_or_path: str = "llava-hf/llava-1.5-13b-hf", load_in_4bit: bool = False,
                 max_new_tokens: int = 96, device: str | None = None, trust_remote_code: bool = False) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        require_hub_source(name_or_path, "the LLaVA captioner")
        hub = hub_kwargs(name_or_path)
        try:
            processor = AutoProcessor.from_pretrained(name_or_path, backend="pil", trust_remote_code=trust_remote_code,
                                                      **hub)
            model = LlavaForConditionalGeneration.from_pretrained(
                name_or_path, dtype="auto", trust_remote_code=trust_remote_code, **_quantization(load_in_4bit), **hub)
        except OSError as exc:
            raise load_error("the LLaVA captioner", name_or_path, exc) from exc
        if device and not load_in_4bit:
            model = model.to(device)
        processor.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        super().__init__(model, processor, max_new_tokens)


class QwenCaptioner:
    """Qwen3.5 (``Qwen/Qwen3.5-0.8B`` by default) as a second MLLM captioner.

    Built on ``QwenBackbone`` and its chat dialogue builder rather than ``AutoProcessor``: Qwen's
    processor class insists on a video processor, which needs torchvision (not installable beside
    the CPU torch wheel). Prompts are left-padded for batched greedy generation, with an empty
    ``<think>`` block so the model answers directly.
    """

    name = "qwen3.5"

    def __init__(self, name_or_path: str = "Qwen/Qwen3.5-0.8B", max_new_tokens: int = 96, device: str | None = None,
                 trust_remote_code: bool = False) -> None:
        preset = "qwen3.5-0.8b" if name_or_path == "Qwen/Qwen3.5-0.8B" else name_or_path
        self.backbone = QwenBackbone(preset, trust_remote_code=trust_remote_code).eval()
        if device:
            self.backbone.to(device)
        self.dialogue = DialogueBuilder(self.backbone)
        self.max_new_tokens = max_new_tokens

    def _generate(self, seqs: list[Any]) -> list[str]:
        device = next(self.backbone.parameters()).device
        inputs = self.dialogue.batch(seqs, device, left_pad=True)
        inputs.pop("labels")
        tok = self.backbone.tokenizer
        with torch.no_grad():
            out = self.backbone.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                               eos_token_id=tok.convert_tokens_to_ids(IM_END),
                                               pad_token_id=tok.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    def describe(self, images: list[Image.Image], prompt: str, metas: list[dict[str, Any]]) -> list[str]:
        d, transform = self.dialogue, self.backbone.image_transform
        return self._generate([d.generation_prompt(d.user(Dialogue(), [transform(img)], prompt)) for img in images])

    def rewrite(self, texts: list[str], prompt: str, metas: list[dict[str, Any]]) -> list[str]:
        d = self.dialogue
        return self._generate([d.generation_prompt(d.user(Dialogue(), text=f"{t}\n{prompt}")) for t in texts])
