"""Sessions for a shard folder that has none, chained from its own triplets (the multi-turn demo's data).

``add_chained_sessions`` draws disjoint sessions from each split's triplets (``sessions.sample_sessions``:
a triplet whose target is another's source continues it) and writes them beside the triplets as
``{split}-sessions-*.tar`` (``session_shards.write_session``), the chain products' views copied
from the split's gallery; the manifest's split entries gain ``sessions``, ``session_lengths`` and
``shards.sessions``, written last and atomically, so a killed run leaves a folder without sessions
(and is simply run again). The multi-turn demo now trains on the generator's own sessions
(``SyntheticDataModule(sessions=N)``); this pass remains for tests/unit/datamodules/test_session_batches.py,
and ``cir data sessions`` (``converters.chaining``) is the chaining for real data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import webdataset as wds

from .schema import Triplet
from .session_shards import SESSION_KIND, SessionRecord, write_session
from .sessions import sample_sessions
from .shards import ShardSetWriter, read_manifest, shard_urls, write_manifest

log = logging.getLogger(__name__)


def _raw_samples(urls: list[str]) -> Any:
    """Undecoded samples (member bytes): only JSON is parsed, views are copied as they are stored."""
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def add_chained_sessions(data_dir: str | Path, splits: tuple[str, ...] = ("train", "val"), min_turns: int = 2,
                         max_turns: int = 5, seed: int = 0) -> dict[str, dict[int, int]]:
    """Writes each split's chained sessions; returns their lengths per split (turns → sessions).
    A split that already has sessions is rewritten."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    lengths: dict[str, dict[int, int]] = {}
    for split in splits:
        triplets = [Triplet(**json.loads(s["json"])["triplet"])
                    for s in _raw_samples(shard_urls(data_dir, manifest, split, "triplets"))]
        sessions = sample_sessions(triplets, min_turns, max_turns, seed)
        wanted = {(triplets[n].dataset, p) for s in sessions for n in s.turns
                  for p in (triplets[n].source_id, str(triplets[n].target_id))}
        products: dict[tuple[str, str], tuple[dict[str, Any], list[bytes]]] = {}
        for sample in _raw_samples(shard_urls(data_dir, manifest, split, "gallery")):
            meta = json.loads(sample["json"])
            if (meta["dataset"], meta["product_id"]) in wanted:
                views = sorted((int(k[4:-4]), v) for k, v in sample.items() if k.startswith("view") and
                               k.endswith(".jpg"))
                products[(meta["dataset"], meta["product_id"])] = (meta, [v for _, v in views])
        writer = ShardSetWriter(data_dir, split)
        for number, session in enumerate(sessions):
            record = SessionRecord(f"chained-{number:06d}", session.dataset, [triplets[n] for n in session.turns])
            missing = [p for p in record.chain if (record.dataset, p) not in products]
            if missing:
                raise ValueError(f"{data_dir}: split {split!r} chains products {missing} that are not in its gallery; "
                                 "sessions are ranked in the split's gallery, so every chain product must be there")
            write_session(writer, record, [products[(record.dataset, p)] for p in record.chain])
        entry = writer.close()
        split_entry = manifest["splits"][split]
        split_entry["sessions"] = entry.get(SESSION_KIND, 0)
        split_entry["session_lengths"] = entry.get("session_lengths", {})
        split_entry["shards"][SESSION_KIND] = entry["shards"].get(SESSION_KIND, [])
        lengths[split] = {int(k): v for k, v in split_entry["session_lengths"].items()}
        log.info("%s: %d %s sessions chained from its triplets, by turns %s", data_dir, len(sessions), split,
                 lengths[split])
    source = {**manifest["source"], "sessions": {"chained_from": "triplets", "min_turns": min_turns,
                                                 "max_turns": max_turns, "seed": seed}}
    write_manifest(data_dir, manifest["splits"], manifest["datasets"], source)
    return lengths
