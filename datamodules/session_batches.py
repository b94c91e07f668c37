"""Session batches as triplet rows: the multi-turn rule every family trains and evaluates by.

A session p0 → p1 → … → pT with one text per turn becomes T rows, turn t (0-based) the single-turn
query (reference p_t, text_t) → target p_{t+1}: exactly a triplet batch (``batching.collate``'s
keys), so a family that only knows triplets trains and evaluates on sessions unchanged. Rows come
session by session, turn by turn, and carry the session structure beside the triplet keys
(``SESSION_ROW_KEYS``), so a family that reads a whole session (ProCIR's session dialogue) can
rebuild it: ``session_index`` (the session's place in the batch), ``turn_index`` (t) and
``session_turns`` (T).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .batching import caption_of, pad_views
from .bucketing import padding_counts
from .session_shards import collate_sessions

SESSION_ROW_KEYS = ("session_index", "turn_index", "session_turns", "session_id")


def is_session_batch(batch: dict[str, Any]) -> bool:
    """A flattened session batch (``flatten_sessions``), as opposed to a triplet or gallery batch."""
    return isinstance(batch, dict) and "session_index" in batch


def flatten_sessions(batch: dict[str, Any], captions: dict[str, str] | None = None) -> dict[str, Any]:
    """``collate_sessions``' lists → one triplet row per turn, padded as ``collate`` pads triplets.

    ``captions`` (a ``cir caption`` sidecar) replaces the products' own captions, as for triplets."""
    rows: dict[str, list[Any]] = {k: [] for k in ("source_images", "target_images", "text", "source_id", "target_id",
                                                  "dataset", "source_caption", "target_caption", "modified_text",
                                                  "meta", *SESSION_ROW_KEYS)}
    if "__key__" in batch:  # the samples' keys, one per row as in a triplet batch
        rows["__key__"] = []
    for s, (products, texts, turns, chain) in enumerate(zip(batch["products"], batch["texts"], batch["turns"],
                                                            batch["chain_meta"], strict=True)):
        for t, (text, turn) in enumerate(zip(texts, turns, strict=True)):
            source, target = chain[t], chain[t + 1]
            rows["source_images"].append(products[t])
            rows["target_images"].append(products[t + 1])
            rows["text"].append(text)
            rows["source_id"].append(turn["source_id"])
            rows["target_id"].append(turn["target_id"])
            rows["dataset"].append(turn["dataset"])
            rows["source_caption"].append(caption_of(source, captions))
            rows["target_caption"].append(caption_of(target, captions))
            rows["modified_text"].append("")
            rows["meta"].append({"triplet": turn, "source": source, "target": target})
            rows["session_index"].append(s)
            rows["turn_index"].append(t)
            rows["session_turns"].append(len(turns))
            rows["session_id"].append(batch["session_id"][s])
            if "__key__" in batch:
                rows["__key__"].append(f"{batch['__key__'][s]}/t{t}")
    out: dict[str, Any] = {}
    for key, values in rows.items():
        if key.endswith("images"):
            out[key], out[key.replace("images", "mask")] = pad_views(values)
        else:
            out[key] = values
    return out


def collate_session_rows(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``SessionExample`` samples → a flattened session batch (the evaluation loader's collation)."""
    return flatten_sessions(collate_sessions(samples))


class SessionRows:
    """Last training stage of a session loader: flatten the worker's collated sessions into rows,
    count their padding (the loader's padding stage saw no image field yet), then ``tag`` them."""

    def __init__(self, tag: Callable[[dict[str, Any]], dict[str, Any]], captions: dict[str, str] | None = None
                 ) -> None:
        self.tag = tag
        self.captions = captions

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        flat = flatten_sessions(batch, self.captions)
        flat["_padding"] = padding_counts(flat)
        # ``wds.map`` copies its input's ``__key__`` onto the output: the rows' keys must be there.
        batch["__key__"] = flat.get("__key__")
        return self.tag(flat)
