"""Multi-turn ProCIR sessions with a KV cache: turn t runs only its own tokens.

A session is one continuing dialogue (``ProCIRDialogues.session``): turn 1 shows the start product
and the first text, every later turn closes the previous assistant turn and appends a user turn (the
clicked result's views when the shopper clicked one, then the text) and an assistant ``<emb_all>``,
whose last hidden state is that turn's query q. Attention is causal and the linear-attention
(Gated DeltaNet) recurrence runs left to right, so a ``SessionState`` that holds the model's cache
after turn t-1 (the full-attention layers' keys and values, the linear-attention layers'
convolution and recurrent states) and the next M-RoPE position is all turn t needs: it runs the
increment ``session_turn(Dialogue(), Turn(text, reference, continued=True))`` and nothing before it.

M-RoPE positions are not token indices (an image of h × w merged patches advances the position by
max(h, w), not by h·w), so each increment's positions are computed by ``get_rope_index`` on the
increment alone and shifted by the state's next position: the whole dialogue's positions are
exactly that (tested), because every image is preceded by text and each piece starts where the
previous one's largest position ends.

States are never changed: ``extend`` continues a copy of the cache, so one state serves any
number of next turns (a shopper who retries a turn with another text).

    sessions = SessionEncoder(model)            # a ProCIR, either dialogue
    q1, state = sessions.start_session(["front.jpg", "back.jpg"], "like this but blue")
    q2, state = sessions.extend(state, "with long sleeves")
    q3, state = sessions.extend(state, "and a back zipper", reference=clicked_views)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ...backbones.images import open_upright
from ...backbones.qwen import PatchedImage
from ...backbones.qwen_chat import Dialogue
from .dialogue import Turn
from .model import ProCIR

Source = Sequence[Image.Image | str | Path | PatchedImage]


class SessionTooLong(ValueError):
    """The next turn would take the dialogue past the model's context length."""

    def __init__(self, tokens: int, limit: int, context: int) -> None:
        bound = "its context length" if limit == context else f"a limit below its context length of {context}"
        super().__init__(f"this turn would make the session's dialogue {tokens} tokens long; the model takes at most "
                         f"{limit} ({bound}): start a new session")
        self.tokens, self.limit = tokens, limit


def cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a transformers cache holds (every layer's keys, values, convolution
    and recurrent states), each storage counted once."""
    seen: set[int] = set()
    total = 0
    stack: list[Any] = list(getattr(cache, "layers", [cache]))
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            ptr = item.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
    return total


@dataclass(frozen=True)
class SessionState:
    """A session after its last turn: the model cache (never modified), where the next turn's
    M-RoPE positions start, the dialogue's token count, the turns so far and the cache's bytes."""

    past_key_values: Any
    next_position: int
    tokens: int
    turns: int
    nbytes: int


class SessionEncoder:
    """Sessions of one shopper at a time (batch size 1), cached turn by turn or recomputed whole.

    Views are embedded jointly (every view of a reference in one user turn), the model's own way;
    ``max_tokens`` (default: the model's context length) bounds a session's dialogue."""

    def __init__(self, model: ProCIR, max_tokens: int | None = None) -> None:
        self.model = model.eval()
        self.backbone = model.backbone
        self.dialogue = model.dialogue
        self.dialogues = model.dialogues
        self.context_length = int(self.backbone.model.config.text_config.max_position_embeddings)
        self.max_tokens = min(max_tokens or self.context_length, self.context_length)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def views(self, source: Source) -> list[PatchedImage]:
        """``source``'s views as patches; files are read upright (their EXIF orientation applied),
        images given as PIL images are taken as they are."""
        transform = self.backbone.image_transform
        out = []
        for v in source:
            if isinstance(v, PatchedImage):
                out.append(v)
            else:
                out.append(transform(open_upright(v) if isinstance(v, str | Path) else v))
        return out

    def _inputs(self, seq: Dialogue) -> dict[str, Any]:
        inputs = self.dialogue.batch([seq], self.device)
        inputs.pop("labels")
        return inputs

    def positions(self, inputs: dict[str, Any], start: int) -> tuple[torch.Tensor, int]:
        """M-RoPE positions ``[3, 1, n]`` of one unpadded piece of dialogue that starts at
        position ``start``, and where the piece after it starts."""
        pos, _ = self.backbone.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"))
        return pos + start, start + int(pos.max()) + 1

    def turn(self, text: str, reference: Source | None = None, continued: bool = True) -> Dialogue:
        """The tokens one turn runs: ``continued`` (after a cached turn) starts by closing it."""
        views = self.views(reference) if reference else None
        return self.dialogues.session_turn(Dialogue(), Turn(text, views, continued=continued))

    @torch.no_grad()
    def start_session(self, views: Source, text: str) -> tuple[torch.Tensor, SessionState]:
        """Turn 1 (token for token the single-turn query of ``views`` + ``text``): its q and state."""
        if not views:
            raise ValueError("a session starts from a product: give the views of its reference")
        return self._forward_turn(self.turn(text, views, continued=False), None)

    @torch.no_grad()
    def extend(self, state: SessionState, text: str, reference: Source | None = None
               ) -> tuple[torch.Tensor, SessionState]:
        """The next turn's q and state; ``reference`` is a clicked result's views (else the turn is
        text only). ``state`` itself is left as it was."""
        return self._forward_turn(self.turn(text, reference), state)

    def _forward_turn(self, seq: Dialogue, state: SessionState | None) -> tuple[torch.Tensor, SessionState]:
        tokens = (state.tokens if state else 0) + len(seq.ids)
        if tokens > self.max_tokens:
            raise SessionTooLong(tokens, self.max_tokens, self.context_length)
        inputs = self._inputs(seq)
        positions, next_position = self.positions(inputs, state.next_position if state else 0)
        past = None
        if state is not None:
            # One unpadded sequence after the cache: the causal mask follows from the cache's length.
            inputs.pop("attention_mask")
            past = copy.deepcopy(state.past_key_values)
        out = self.backbone(**inputs, position_ids=positions, past_key_values=past, use_cache=True)
        q = F.normalize(out.last_hidden_state[0, seq.emb_positions[-1]].float(), dim=-1)
        cache = out.past_key_values
        return q, SessionState(cache, next_position, tokens, (state.turns if state else 0) + 1, cache_bytes(cache))

    @torch.no_grad()
    def encode_session(self, turns: Sequence[Turn]) -> torch.Tensor:
        """The full recompute: one forward of the whole dialogue (``ProCIRDialogues.session``), every
        turn's q as a row ``[T, D]``. A turn's ``reference`` may hold images or files as well as patches."""
        seq, queries = self.dialogues.session([Turn(t.text, self.views(t.reference) if t.reference else None)
                                               for t in turns])
        if len(seq.ids) > self.max_tokens:
            raise SessionTooLong(len(seq.ids), self.max_tokens, self.context_length)
        hidden = self.backbone(**self._inputs(seq)).last_hidden_state[0]
        return F.normalize(hidden[[seq.emb_positions[i] for i in queries]].float(), dim=-1)
