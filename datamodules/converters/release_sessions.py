"""Multi-turn sessions in the FashionMV release layout, as ``cir build --chain`` writes them.

``DATA_DIR/{split}_sessions.jsonl``: one session per line, ``{"session_id", "dataset", "turns":
[triplet row, …]}``, each turn a row of ``{split}_triplets.jsonl`` as it is there (``source_id``,
``target_id``, ``dataset``, the texts), turn t's ``target_id`` turn t+1's ``source_id``. They are
chained from the split's triplets (``sessions.sample_sessions``, seeded), so each triplet row is a
turn of at most one session. ``cir data fashionmv --sessions`` writes exactly these sessions as
session shards where a release has them (``given_sessions``), instead of drawing its own.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..schema import safe_key
from ..sessions import count_chains, sample_sessions
from .common import read_jsonl

# The turn key a converted triplet and a release row share: dataset, shard-safe ids, short text.
TurnKey = tuple[str, str, str, str]  # dataset, source id, target id, short modification text


@dataclass(frozen=True)
class _Row:
    source_id: str
    target_id: str | None
    dataset: str


def sessions_file(data_dir: Path, split: str) -> Path:
    return data_dir / f"{split}_sessions.jsonl"


def chain_release(data_dir: str | Path, splits: tuple[str, ...] = ("train", "val"), min_turns: int = 2,
                  max_turns: int = 5, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Write ``{split}_sessions.jsonl`` beside each split's triplets (atomically, replacing an earlier
    one); returns per split the chains found (turns → count) and the sessions written (turns → count)."""
    data_dir = Path(data_dir)
    report = {}
    for split in splits:
        rows = read_jsonl(data_dir / f"{split}_triplets.jsonl")
        keyed = [_Row(str(r["source_id"]), str(r["target_id"]) if r.get("target_id") is not None else None,
                      str(r["dataset"])) for r in rows]
        sessions = sample_sessions(keyed, min_turns, max_turns, seed)
        lines = [json.dumps({"session_id": f"s{n:06d}", "dataset": s.dataset, "turns": [rows[i] for i in s.turns]},
                            sort_keys=True) + "\n" for n, s in enumerate(sessions)]
        write_text_atomic(sessions_file(data_dir, split), "".join(lines), remove_stale=True)
        report[split] = {"chains": dict(sorted(count_chains(keyed, max_turns).items())),
                         "sessions": dict(sorted(Counter(len(s) for s in sessions).items()))}
    return report


def remove_release_sessions(data_dir: str | Path, splits: tuple[str, ...] = ("train", "val")) -> None:
    """A release rewritten without ``--chain``: sessions of its earlier triplets would no longer match."""
    for split in splits:
        sessions_file(Path(data_dir), split).unlink(missing_ok=True)


def given_sessions(data_dir: str | Path, split: str) -> list[list[TurnKey]] | None:
    """A release's sessions of ``split`` as turn keys (None: the release has none for it)."""
    path = sessions_file(Path(data_dir), split)
    if not path.is_file():
        return None
    out = []
    for n, row in enumerate(read_jsonl(path)):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{path} line {n + 1}: needs 'turns', a list of triplet rows")
        out.append([(str(t["dataset"]), safe_key(str(t["source_id"])), safe_key(str(t["target_id"])),
                     str(t["modification_text_short"])) for t in turns])
    return out
