"""Qwen chat dialogues as token ids, built turn by turn (ProCIR's dialogues, the Qwen captioner).

Building the ids directly (not through a chat template) keeps what the model needs next to the
ids: where each ``<emb_all>`` sits, which tokens are the assistant's (the SFT labels), which are
image placeholders (``mm_token_type_ids``), and the caption tokens that CoT subsamples. The text
is what Qwen's template writes, with no system prompt:

    <|im_start|>user\\n<|vision_start|><|image_pad|>…<|vision_end|>…{text}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n<emb_all><|im_end|>\\n
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from .qwen import (
    EMB_TOKEN,
    IM_END,
    IM_START,
    IMAGE_PAD,
    THINK,
    THINK_END,
    VISION_END,
    VISION_START,
    PatchedImage,
)


class ChatBackbone(Protocol):
    """What the builder needs of a Qwen-family model (Qwen3.5, and the Qwen2-VL/Qwen3-VL embedders):
    its special-token ids, text tokenisation, placeholder count per image and the vision tower's dtype."""

    tokenizer: PreTrainedTokenizerBase
    token_ids: dict[str, int]

    def text_ids(self, text: str) -> list[int]: ...

    def image_tokens(self, image: PatchedImage) -> int: ...

    @property
    def vision_dtype(self) -> torch.dtype: ...

    def __call__(self, **inputs: Any) -> Any: ...


@dataclass
class Dialogue:
    """One dialogue: token ids, their image flags and training flags, its images and ``<emb_all>``s."""

    ids: list[int] = field(default_factory=list)
    image_flags: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    images: list[PatchedImage] = field(default_factory=list)
    emb_positions: list[int] = field(default_factory=list)


class DialogueBuilder:
    """Appends chat turns to ``Dialogue``s and batches them for a ``ChatBackbone``."""

    def __init__(self, backbone: ChatBackbone) -> None:
        self.backbone = backbone
        self.ids = backbone.token_ids
        self._cache: dict[str, list[int]] = {}

    def _text_ids(self, text: str) -> list[int]:
        if text not in self._cache:  # only the fixed pieces ("user\n", "\n\n"), which recur in every dialogue
            self._cache[text] = self.backbone.text_ids(text)
        return self._cache[text]

    def _add(self, seq: Dialogue, ids: list[int], trained: bool, image: bool = False) -> None:
        seq.ids += ids
        seq.image_flags += [int(image)] * len(ids)
        seq.trained += [trained] * len(ids)

    def _special(self, seq: Dialogue, token: str, trained: bool) -> None:
        if token == EMB_TOKEN:
            seq.emb_positions.append(len(seq.ids))
        self._add(seq, [self.ids[token]], trained)

    def system(self, seq: Dialogue, text: str) -> Dialogue:
        self._special(seq, IM_START, False)
        self._add(seq, self._text_ids("system\n") + self.backbone.text_ids(text.strip()), False)
        self._special(seq, IM_END, False)
        self._add(seq, self._text_ids("\n"), False)
        return seq

    def user(self, seq: Dialogue, images: list[PatchedImage] = (), text: str = "") -> Dialogue:
        """A user turn: the images, then the text. Qwen's chat template trims a message's content,
        so the text loses its trailing whitespace, and its leading whitespace when no image precedes
        it (the ids then equal the template's: tested in test_procir_parity.py)."""
        text = text.rstrip() if images else text.strip()
        self._special(seq, IM_START, False)
        self._add(seq, self._text_ids("user\n"), False)
        for img in images:
            self._special(seq, VISION_START, False)
            self._add(seq, [self.ids[IMAGE_PAD]] * self.backbone.image_tokens(img), False, image=True)
            self._special(seq, VISION_END, False)
            seq.images.append(img)
        if text:
            self._add(seq, self.backbone.text_ids(text), False)
        self._special(seq, IM_END, False)
        self._add(seq, self._text_ids("\n"), False)
        return seq

    def user_parts(self, seq: Dialogue, parts: list[PatchedImage | str]) -> Dialogue:
        """A user turn of interleaved text and images in their order (labelled multi-image requests,
        e.g. ``[Image 1]`` before each view)."""
        self._special(seq, IM_START, False)
        self._add(seq, self._text_ids("user\n"), False)
        for part in parts:
            if isinstance(part, str):
                if part:
                    self._add(seq, self.backbone.text_ids(part), False)
                continue
            self._special(seq, VISION_START, False)
            self._add(seq, [self.ids[IMAGE_PAD]] * self.backbone.image_tokens(part), False, image=True)
            self._special(seq, VISION_END, False)
            seq.images.append(part)
        self._special(seq, IM_END, False)
        self._add(seq, self._text_ids("\n"), False)
        return seq

    def assistant(self, seq: Dialogue, thought: list[int] | str = (), answer: str = "", emb: bool = True,
                  close: bool = True, trained: bool = False) -> Dialogue:
        """``<think>`` block (empty, or ``thought`` as text or token ids), then ``answer`` and/or
        ``<emb_all>``. ``close=False`` stops right after ``<emb_all>``: nothing after it can change
        its hidden state, so a document or the last query turn needs no more tokens."""
        self._special(seq, IM_START, False)
        self._add(seq, self._text_ids("assistant\n"), False)
        self._special(seq, THINK, trained)
        thought_ids = self.backbone.text_ids(thought) if isinstance(thought, str) else list(thought)
        if thought_ids:
            self._add(seq, self._text_ids("\n") + thought_ids + self._text_ids("\n"), trained)
        else:
            self._add(seq, self._text_ids("\n\n"), trained)
        self._special(seq, THINK_END, trained)
        self._add(seq, self._text_ids("\n\n"), trained)
        if answer:
            self._add(seq, self.backbone.text_ids(answer), trained)
        if emb:
            self._special(seq, EMB_TOKEN, trained)
        if close:
            self._special(seq, IM_END, trained)
            self._add(seq, self._text_ids("\n"), False)
        return seq

    def assistant_opening(self, seq: Dialogue, then: str | None = None) -> Dialogue:
        """``<|im_start|>assistant\n`` with no think block (Qwen2-VL/Qwen3-VL templates), then optionally
        one special token: embedders read the last token's hidden state (GME's ``<|endoftext|>``)."""
        self._special(seq, IM_START, False)
        self._add(seq, self._text_ids("assistant\n"), False)
        if then:
            self._add(seq, [self.ids[then]], False)
        return seq

    def generation_prompt(self, seq: Dialogue) -> Dialogue:
        """The assistant turn's opening with an empty think block: generation answers directly."""
        return self.assistant(seq, emb=False, close=False)

    def text_embedding(self, text: str) -> Dialogue:
        """Caption alignment's text-only forward: ``[T_cap; <emb_all>]``, nothing else."""
        seq = Dialogue()
        self._add(seq, self.backbone.text_ids(text), False)
        self._special(seq, EMB_TOKEN, False)
        return seq

    def batch(self, seqs: list[Dialogue], device: torch.device | str, left_pad: bool = False) -> dict[str, Any]:
        """Right-padded tensors. Right padding keeps every real token's hidden state equal to an
        unpadded forward: attention is causal and the linear-attention recurrence runs left to
        right, so padding after a sequence cannot reach it. ``left_pad`` is for generation, which
        appends to the end of every row."""
        length = max(len(s.ids) for s in seqs)
        pad = self.backbone.tokenizer.pad_token_id or 0
        n = len(seqs)
        ids = torch.full((n, length), pad, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        flags = torch.zeros(n, length, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            k = len(s.ids)
            cols = slice(length - k, length) if left_pad else slice(0, k)
            ids[i, cols] = torch.tensor(s.ids)
            mask[i, cols] = 1
            flags[i, cols] = torch.tensor(s.image_flags)
            trained = torch.tensor(s.trained, dtype=torch.bool)
            labels[i, cols] = torch.where(trained, ids[i, cols], torch.full_like(ids[i, cols], -100))
        out: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                               "mm_token_type_ids": flags.to(device), "labels": labels.to(device)}
        images = [img for s in seqs for img in s.images]
        if images:
            # In the vision tower's dtype: a checkpoint loaded in bf16 takes bf16 pixels.
            out["pixel_values"] = torch.cat([img.pixel_values for img in images]).to(
                device, self.backbone.vision_dtype)
            out["image_grid_thw"] = torch.stack([img.grid_thw for img in images]).to(device)
        return out

    def embed(self, seqs: list[Dialogue], device: torch.device | str) -> list[torch.Tensor]:
        """Hidden states at each sequence's ``<emb_all>`` positions: one ``[B, D]`` tensor per
        ``<emb_all>`` index (all sequences must have the same number)."""
        counts = {len(s.emb_positions) for s in seqs}
        if len(counts) != 1:
            raise ValueError(f"sequences with different <emb_all> counts {sorted(counts)} cannot be embedded together")
        inputs = self.batch(seqs, device)
        inputs.pop("labels")
        hidden = self.backbone(**inputs).last_hidden_state
        rows = torch.arange(len(seqs), device=hidden.device)
        return [hidden[rows, torch.tensor([s.emb_positions[j] for s in seqs], device=hidden.device)]
                for j in range(counts.pop())]
