"""Sessions for a shard folder that has none, chained from its own triplets (the multi-turn demo's data).

``add_chained_sessions`` draws disjoint sessions from each split's triplets (``sessions.sample_sessions``:
a triplet whose target is another's source continues it) and writes them beside the triplets as
``{split}-sessions-*.tar`` (``session_shards.write_session``), the chain products' views copied
from the split's gallery; the manifest's split entries gain ``sessions``, ``session_lengths`` and
``shards.sessions``, written last and atomically, so a killed run leaves a folder without sessions
(and is simply run again). ``ChainedSyntheticDataModule`` is the generated dataset with that pass
in ``prepare_data``: the stand-in until the generator writes sessions itself
(``cir data synthetic --sessions``), when the demo's data class becomes ``SyntheticDataModule``.
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
from .synthetic_datamodule import SyntheticDataModule

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


class ChainedSyntheticDataModule(SyntheticDataModule):
    """The generated dataset (``SyntheticDataModule``) with sessions chained from its triplets in
    ``prepare_data`` when its folder has none (``add_chained_sessions``).

    Args:
        session_min_turns, session_max_turns: the turns of a chained session.
        session_seed: seed of the chaining.
        **kwargs: ``SyntheticDataModule``'s and ``ShardDataModule``'s (``train_on``, ``eval_sessions``).
    """

    def __init__(self, session_min_turns: int = 2, session_max_turns: int = 5, session_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters({**self.hparams, "session_min_turns": session_min_turns,
                                   "session_max_turns": session_max_turns, "session_seed": session_seed})

    def prepare_data(self) -> None:
        super().prepare_data()  # generated (or checked) first
        manifest = read_manifest(self.data_dir)
        splits = tuple(s for s in ("train", self.hparams.val_split) if not manifest["splits"][s].get(SESSION_KIND))
        if splits:
            hp = self.hparams
            add_chained_sessions(self.data_dir, splits, hp.session_min_turns, hp.session_max_turns, hp.session_seed)
            self._manifest = None  # read again: it now lists the sessions
