"""Chat generation with an in-process transformers model (CPU or GPU), batched.

Qwen3.5 runs through ``QwenBackbone`` and its dialogue builder: Qwen's ``AutoProcessor`` insists
on a video processor, which needs torchvision (not installable beside the CPU torch wheel). Every
other image-text-to-text model (Qwen3-VL, LLaVA, ...) runs through its own processor and chat
template. Each batch is seeded from its requests' tags, so a rerun of the same batch samples the
same answers.
"""

from __future__ import annotations

import importlib.util
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..backbones.qwen import IM_END, QwenBackbone
from ..backbones.qwen_chat import Dialogue, DialogueBuilder
from ..backbones.registry import get_preset, hub_kwargs, load_error, require_hub_source
from .chat import ChatRequest, Completion, ImagePart, OnResult


def _model_type(name_or_path: str, trust_remote_code: bool) -> str:
    if get_preset("qwen3.5", name_or_path) is not None:
        return "qwen3_5"
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        return str(json.loads(config.read_text()).get("model_type", ""))
    from transformers import AutoConfig

    require_hub_source(name_or_path, "the chat model")
    try:
        cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs(name_or_path))
    except OSError as exc:
        raise load_error("the chat model", name_or_path, exc) from exc
    return str(cfg.model_type)


def _quantization(load_in_4bit: bool) -> dict[str, Any]:
    if not load_in_4bit:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("load_in_4bit needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)}


class _QwenRunner:
    def __init__(self, name_or_path: str, device: str | None, trust_remote_code: bool) -> None:
        self.backbone = QwenBackbone(name_or_path, trust_remote_code=trust_remote_code).eval()
        if device:
            self.backbone.to(device)
        self.dialogue = DialogueBuilder(self.backbone)
        self.transform = self.backbone.image_transform

    def generate(self, batch: Sequence[ChatRequest], sample: bool, temperature: float,
                 max_tokens: int) -> list[tuple[str, int, int]]:
        d, tok = self.dialogue, self.backbone.tokenizer
        seqs = []
        for r in batch:
            seq = Dialogue()
            if r.system:
                d.system(seq, r.system)
            parts = [self.transform(p.pil()) if isinstance(p, ImagePart) else p for p in r.user]
            seqs.append(d.generation_prompt(d.user_parts(seq, parts)))
        device = next(self.backbone.parameters()).device
        inputs = d.batch(seqs, device, left_pad=True)
        inputs.pop("labels")
        eos = tok.convert_tokens_to_ids(IM_END)
        with torch.no_grad():
            out = self.backbone.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=sample,
                                               temperature=temperature if sample else None,
                                               eos_token_id=eos, pad_token_id=tok.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        used = [int((row != tok.pad_token_id).sum()) for row in new]
        return [(t.strip(), len(s.ids), u) for t, s, u in zip(texts, seqs, used, strict=True)]


class _ProcessorRunner:
    """Any model with a chat template and ``AutoModelForImageTextToText`` (LLaVA, Qwen3-VL, ...)."""

    def __init__(self, name_or_path: str, device: str | None, trust_remote_code: bool, load_in_4bit: bool) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        require_hub_source(name_or_path, "the chat model")
        hub = hub_kwargs(name_or_path)
        try:
            self.processor = AutoProcessor.from_pretrained(name_or_path, backend="pil",
                                                           trust_remote_code=trust_remote_code, **hub)
            self.model = AutoModelForImageTextToText.from_pretrained(
                name_or_path, dtype="auto", trust_remote_code=trust_remote_code, **_quantization(load_in_4bit), **hub)
        except OSError as exc:
            raise load_error("the chat model", name_or_path, exc) from exc
        if device and not load_in_4bit:
            self.model = self.model.to(device)
        self.model.eval()
        self.processor.tokenizer.padding_side = "left"  # decoder-only generation pads on the left

    def generate(self, batch: Sequence[ChatRequest], sample: bool, temperature: float,
                 max_tokens: int) -> list[tuple[str, int, int]]:
        texts, images = [], []
        for r in batch:
            content = [{"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p} for p in r.user]
            conv = [{"role": "user", "content": content}]
            if r.system:
                conv.insert(0, {"role": "system", "content": [{"type": "text", "text": r.system}]})
            texts.append(self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))
            images += [p.pil() for p in r.images]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=sample,
                                      temperature=temperature if sample else None)
        new = out[:, inputs["input_ids"].shape[1]:]
        pad = self.processor.tokenizer.pad_token_id
        decoded = self.processor.batch_decode(new, skip_special_tokens=True)
        prompt = inputs["attention_mask"].sum(dim=1).tolist()
        return [(t.strip(), int(p), int((row != pad).sum())) for t, p, row in zip(decoded, prompt, new, strict=True)]


class TransformersChat:
    """A hub id, a local ``save_pretrained`` folder or a Qwen3.5 preset name (``tiny`` for tests)."""

    def __init__(self, name_or_path: str, batch_size: int = 4, device: str | None = None,
                 load_in_4bit: bool = False, trust_remote_code: bool = False) -> None:
        self.name = name_or_path
        self.batch_size = batch_size
        if _model_type(name_or_path, trust_remote_code).startswith("qwen3_5"):
            self.runner: _QwenRunner | _ProcessorRunner = _QwenRunner(name_or_path, device, trust_remote_code)
        else:
            self.runner = _ProcessorRunner(name_or_path, device, trust_remote_code, load_in_4bit)

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            # One generate call shares sampling settings: the batch's largest budget and first temperature.
            temperature = batch[0].temperature
            max_tokens = max(r.max_tokens for r in batch)
            with torch.random.fork_rng():
                torch.manual_seed(zlib.crc32(json.dumps([r.tag for r in batch], sort_keys=True).encode()))
                answers = self.runner.generate(batch, temperature > 0, temperature, max_tokens)
            for i, (text, prompt_tokens, completion_tokens) in enumerate(answers):
                on_result(start + i, Completion(text, prompt_tokens, completion_tokens))

    def close(self) -> None:
        del self.runner
