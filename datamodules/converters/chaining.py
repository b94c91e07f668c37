"""Chain a shard folder's triplets into multi-turn sessions, written into that folder.

For each split: the triplets whose source and target are both in the split's gallery form the
source → target graph; ``sessions.count_chains`` counts its chains per dataset and
``sessions.sample_sessions`` draws disjoint sessions of ``min_turns``-``max_turns`` turns, seeded.
Their chain products are copied from the gallery (the same bytes), as ``session_shards`` defines.

Safe to kill and to rerun. The new tars are written in a temporary folder inside the shard folder,
then renamed to names of a new generation (``{split}-sessions-c{N}-NNNNNN.tar``) that the current
manifest does not reference, and only then is ``manifest.json`` replaced (atomically): a kill at
any point leaves the old manifest pointing at the old, whole tars. The tars the new manifest no
longer references (the previous sessions, or a killed run's) are deleted last, and again at the
start of every run, so a rerun replaces the sessions instead of adding to them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import webdataset as wds

from ..atomic import atomic_write, fsync_path
from ..interfaces import ProgressSink
from ..schema import Triplet
from ..session_shards import SESSION_KIND, SessionRecord, write_session
from ..sessions import Session, count_chains, sample_sessions
from ..shards import MANIFEST, ShardSetWriter, read_manifest
from .release_sessions import TurnKey

TEMP_PREFIX = ".sessions-tmp-"
_GENERATION = re.compile(r"-sessions-c(\d+)-\d+\.tar$")
_TRIPLET_FIELDS = {f.name for f in fields(Triplet)}
_VIEW = re.compile(r"^view(\d+)\.(jpg|jpeg|png|webp)$")

Encoded = tuple[dict[str, Any], list[bytes]]


def _raw_samples(folder: Path, names: list[str], progress: ProgressSink | None = None) -> Iterator[dict[str, Any]]:
    """Undecoded samples (member bytes): the views are copied, never decoded and re-encoded."""
    if not names:
        return
    for sample in wds.DataPipeline(wds.SimpleShardList([str(folder / n) for n in names]), wds.tarfile_to_samples()):
        if progress is not None:
            progress.update(1)
        yield sample


def _json(sample: dict[str, Any]) -> dict[str, Any]:
    return json.loads(sample["json"])


def read_triplets(folder: Path, entry: dict[str, Any], progress: ProgressSink | None = None) -> list[Triplet]:
    """A split's triplet records in shard order (query-only ones included)."""
    out = []
    for sample in _raw_samples(folder, entry["shards"].get("triplets", []), progress):
        meta = _json(sample)["triplet"]
        out.append(Triplet(**{k: v for k, v in meta.items() if k in _TRIPLET_FIELDS}))
    return out


def _gallery(folder: Path, entry: dict[str, Any], keep: set[tuple[str, str]] | None,
             progress: ProgressSink | None = None) -> dict[tuple[str, str], Encoded]:
    """(dataset, product id) → (meta, view bytes) for the products in ``keep`` (None: ids only, no bytes)."""
    out: dict[tuple[str, str], Encoded] = {}
    for sample in _raw_samples(folder, entry["shards"].get("gallery", []), progress):
        meta = _json(sample)
        key = (meta["dataset"], meta["product_id"])
        if keep is None:
            out[key] = (meta, [])
        elif key in keep:
            views = sorted((int(m.group(1)), v) for name, v in sample.items() if (m := _VIEW.match(name)))
            out[key] = (meta, [v for _, v in views])
    return out


def _generation(names: list[str]) -> int:
    return max((int(m.group(1)) for n in names if (m := _GENERATION.search(n))), default=0)


def _referenced(manifest: dict[str, Any]) -> set[str]:
    return {n for entry in manifest["splits"].values() for n in entry["shards"].get(SESSION_KIND, [])}


def _clear_unreferenced(folder: Path, manifest: dict[str, Any]) -> None:
    """Session tars the manifest does not name (replaced sessions, a killed run's) and temporary folders."""
    keep = _referenced(manifest)
    for path in folder.glob(f"*-{SESSION_KIND}-*.tar"):
        if path.name not in keep:
            path.unlink()
    for tmp in folder.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _match(usable: list[Triplet], given: list[list[TurnKey]]) -> tuple[list[Session], int]:
    """The given sessions as indexes into ``usable`` (each triplet one turn at most), and how many
    were dropped because a turn is not among the converted triplets (a product without images)."""
    free: dict[TurnKey, list[int]] = defaultdict(list)
    for n, t in enumerate(usable):
        free[(t.dataset, t.source_id, str(t.target_id), t.modification_short)].append(n)
    sessions, dropped = [], 0
    for turns in given:
        if any(len(free.get(k, [])) < turns.count(k) for k in turns):
            dropped += 1
            continue
        sessions.append(Session(turns[0][0], tuple(free[k].pop(0) for k in turns)))
    return sessions, dropped


def _chain_split(folder: Path, tmp: Path, split: str, entry: dict[str, Any], min_turns: int, max_turns: int,
                 seed: int, maxcount: int, given: list[list[TurnKey]] | None = None,
                 progress: ProgressSink | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(report, new shard entry or None) for one split; the tars land in ``tmp``. ``given``: write
    these sessions (a release's) instead of drawing them."""
    if progress is not None:  # the triplets once, the gallery twice (its ids, then the chain products)
        progress.expect(entry.get("triplets", 0) + 2 * entry.get("products", 0))
    triplets = read_triplets(folder, entry, progress)
    in_gallery = _gallery(folder, entry, None, progress)
    usable = [t for t in triplets if t.target_id is not None and (t.dataset, t.source_id) in in_gallery
              and (t.dataset, t.target_id) in in_gallery]
    by_dataset: dict[str, list[Triplet]] = defaultdict(list)
    for t in usable:
        by_dataset[t.dataset].append(t)
    chains = {ds: dict(sorted(count_chains(ts, max_turns).items())) for ds, ts in sorted(by_dataset.items())}
    if given is None:
        sessions, dropped = sample_sessions(usable, min_turns, max_turns, seed), 0
    else:
        sessions, dropped = _match(usable, given)
    records = [SessionRecord(f"chain{n:06d}", s.dataset, [usable[i] for i in s.turns]) for n, s in enumerate(sessions)]
    lengths: dict[str, Counter[int]] = defaultdict(Counter)
    for r in records:
        lengths[r.dataset][len(r.turns)] += 1
    report = {"triplets": len(triplets), "usable": len(usable), "chains": chains, "given": given is not None,
              "dropped": dropped,
              "sessions": {ds: dict(sorted(c.items())) for ds, c in sorted(lengths.items())}}
    if not records:
        return report, None
    needed = {(r.dataset, p) for r in records for p in r.chain}
    products = _gallery(folder, entry, needed, progress)
    writer = ShardSetWriter(tmp, split, maxcount=maxcount)
    for r in records:
        write_session(writer, r, [products[(r.dataset, p)] for p in r.chain])
    return report, writer.close()


def chain_folder(folder: str | Path, min_turns: int = 2, max_turns: int = 5, seed: int = 0, maxcount: int = 500,
                 given: dict[str, list[list[TurnKey]]] | None = None,
                 progress: ProgressSink | None = None) -> dict[str, dict[str, Any]]:
    """Write sessions for every split of ``folder`` (replacing earlier ones) and update its manifest;
    returns per split the triplets read, the usable ones, the chains per dataset (turns → count)
    and the sessions written per dataset (turns → count). ``given``: per split, sessions to write
    as they are (``release_sessions.given_sessions``) instead of drawing them. ``progress`` counts
    the samples read. One writer per folder at a time: another run's temporary folder is removed."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"--min-turns {min_turns} --max-turns {max_turns}: need 1 <= min-turns <= max-turns")
    _clear_unreferenced(folder, manifest)
    generation = _generation(sorted(_referenced(manifest))) + 1
    tmp = folder / f"{TEMP_PREFIX}{os.getpid()}"
    tmp.mkdir()
    reports: dict[str, dict[str, Any]] = {}
    new_entries: dict[str, dict[str, Any] | None] = {}
    for split, entry in manifest["splits"].items():
        reports[split], new_entries[split] = _chain_split(folder, tmp, split, entry, min_turns, max_turns, seed,
                                                          maxcount, (given or {}).get(split), progress)
    splits = {}
    for split, entry in manifest["splits"].items():
        kept = {k: v for k, v in entry.items() if k not in (SESSION_KIND, "session_lengths")}
        kept["shards"] = {k: v for k, v in entry["shards"].items() if k != SESSION_KIND}
        new = new_entries[split]
        if new is not None:
            names = []
            for name in new["shards"][SESSION_KIND]:
                final = name.replace(f"{split}-{SESSION_KIND}-", f"{split}-{SESSION_KIND}-c{generation}-", 1)
                fd = os.open(tmp / name, os.O_RDONLY)
                try:
                    os.fsync(fd)  # whole on disk before a manifest can name it
                finally:
                    os.close(fd)
                os.replace(tmp / name, folder / final)
                names.append(final)
            kept.update({SESSION_KIND: new[SESSION_KIND], "session_lengths": new["session_lengths"]})
            kept["shards"][SESSION_KIND] = names
        splits[split] = kept
    fsync_path(folder)
    how = {"chained": True, "min_turns": min_turns, "max_turns": max_turns, "seed": seed}
    if given:
        how = {"chained": True, "given": sorted(given)}  # the release's own sessions, as it drew them
    source = {**manifest.get("source", {}), "sessions": how}
    updated = {**manifest, "splits": splits, "source": source}
    text = json.dumps(updated, indent=2)
    atomic_write(folder / MANIFEST, lambda f: f.write(text.encode("utf-8")))
    _clear_unreferenced(folder, updated)
    return reports


def chain_table(reports: dict[str, dict[str, Any]], min_turns: int = 2, max_turns: int = 5) -> str:
    """Chains found and sessions written, per split and dataset and number of turns."""
    turns, written = range(1, max_turns + 1), range(min_turns, max_turns + 1)
    head = ["split", "dataset", *(f"chains/{k}" for k in turns), *(f"sessions/{k}" for k in written), "sessions"]
    rows = [head]
    for split, r in reports.items():
        for ds in sorted(set(r["chains"]) | set(r["sessions"])):
            c, s = r["chains"].get(ds, {}), r["sessions"].get(ds, {})
            rows.append([split, ds, *(str(c.get(k, 0)) for k in turns), *(str(s.get(k, 0)) for k in written),
                         str(sum(s.values()))])
        if not r["chains"]:
            rows.append([split, "(no chainable triplets)", *[""] * (len(head) - 2)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() for row in rows)
