"""Interactive ProCIR queries with a KV cache (the paper proposes it; this implements it).

With the two-stage dialogue, turn 1 (the source product's views) does not depend on the
modification text. ``cache_source`` runs it once and keeps the model's cache: the key/value
states of the full-attention layers and the convolution and recurrent states of the linear-
attention (Gated DeltaNet) layers, plus the next M-RoPE position. ``encode_query(..., cache=...)``
then runs only the turn-2 tokens (the modification text and the assistant's ``<emb_all>``). The
cache is copied per query, so one source serves any number of texts.

Multi-turn sessions (``start_session``, ``extend``, ``encode_session``) come from ``SessionEncoder``
(``session_cache.py``): each turn runs only its own tokens on the previous turn's cache.

    encoder = InteractiveEncoder.from_checkpoint("outputs/procir_sft/checkpoints/last.ckpt", backbone)
    cache = encoder.cache_source(["front.jpg", "back.jpg"])
    q = encoder.encode_query(None, "make it red with long sleeves", cache=cache)
    q1, state = encoder.start_session(["front.jpg", "back.jpg"], "like this but blue")
    q2, state = encoder.extend(state, "with long sleeves")
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...backbones.qwen import QwenBackbone
from ...backbones.qwen_chat import Dialogue
from ...core.checkpoints import submodule_weights
from .model import ProCIR
from .session_cache import SessionEncoder, Source


@dataclass
class SourceCache:
    """Turn 1 of one source product: the model cache, where turn 2's positions start, and s."""

    past_key_values: Any
    next_position: int
    source_embedding: torch.Tensor
    tokens: int


class InteractiveEncoder(SessionEncoder):
    """Query encoding for one user at a time (batch size 1), cached or from scratch; sessions too."""

    def __init__(self, model: ProCIR, max_tokens: int | None = None) -> None:
        if not model.two_stage_dialogue:
            raise ValueError("KV-cached queries need the two-stage dialogue (model.init_args.two_stage_dialogue=true):"
                             " a single-turn query mixes the text into the image turn, so nothing can be cached")
        super().__init__(model, max_tokens)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None, backbone: str = "tiny",
                        device: str = "cpu") -> InteractiveEncoder:
        """A ProCIR (MT) model on ``backbone`` with the weights of a ``ProCIR`` or ``ProCIRSFT``
        checkpoint (loaded weights-only); no checkpoint: the backbone as it is."""
        model = ProCIR(QwenBackbone(backbone), two_stage_dialogue=True, image_text_eval=False)
        if checkpoint is not None:
            model.backbone.load_state_dict(submodule_weights(checkpoint, "backbone."))
        return cls(model.to(device))

    def _run(self, seq: Dialogue, cached: bool = False, **kw: Any) -> Any:
        inputs = self.dialogue.batch([seq], self.device)
        inputs.pop("labels")
        if cached:  # one unpadded sequence after the cached turn: no mask, no images, explicit positions
            inputs = {"input_ids": inputs["input_ids"]}
        return self.backbone(**inputs, **kw), inputs

    @torch.no_grad()
    def cache_source(self, source: Source) -> SourceCache:
        """Turn 1 (``user: [views]`` → ``assistant: <think></think><emb_all>``), computed once."""
        d = self.dialogue
        seq = d.assistant(d.user(Dialogue(), self.views(source)))
        out, inputs = self._run(seq, use_cache=True)
        _, next_position = self.positions(inputs, 0)
        s = F.normalize(out.last_hidden_state[0, seq.emb_positions[0]].float(), dim=-1)
        return SourceCache(out.past_key_values, next_position, s, len(seq.ids))

    @torch.no_grad()
    def encode_query(self, source: Source | None, text: str, cache: SourceCache | None = None) -> torch.Tensor:
        """The L2-normalised query embedding q of ``source`` + ``text``. With ``cache`` (from
        ``cache_source``; ``source`` is then not read) only turn 2 runs; without, the whole
        dialogue does, exactly as in evaluation."""
        if cache is None:
            if source is None:
                raise ValueError("encode_query needs the source views, or the cache of its turn 1")
            return self.model.query_embeddings([self.views(source)], [text])[0]
        d = self.dialogue
        seq = d.assistant(d.user(Dialogue(), text=text), close=False)
        n = len(seq.ids)
        positions = torch.arange(cache.next_position, cache.next_position + n, device=self.device)
        out, _ = self._run(seq, cached=True, position_ids=positions.view(1, 1, n).expand(3, 1, n),
                           past_key_values=copy.deepcopy(cache.past_key_values), use_cache=True)
        return F.normalize(out.last_hidden_state[0, seq.emb_positions[0]].float(), dim=-1)
