"""Exported embeddings on disk: a folder of numbered parts, each whole or absent.

A part is two files: ``part-NNNNNN.npy`` (float32 ``[M, D]`` vectors, one row per product, or one
per view of a multi-vector product) and ``part-NNNNNN.json`` (per row: the product's index in the
part, its view index; per product: id, raw id, dataset; the products skipped as unreadable). Both
are written atomically, the vectors first, so the JSON is the mark of a finished part: a kill
leaves a part whole or unmarked, and a rerun redoes only the unmarked ones. The ``.npy`` bytes
depend only on the vectors (no time stamp, unlike ``np.savez``), so a resumed export is identical
to an uninterrupted one. ``export.json`` records what was exported (source, part plan, model), so a
rerun into the folder of another export is refused instead of mixed with it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, write_json_atomic

EXPORT_FILE = "export.json"


class ExportRefused(ValueError):
    """An export that cannot go on as asked (another plan or model in the folder, non-finite
    vectors, data that is not in parts): the CLI reports it in one line."""
_PART = re.compile(r"part-(\d{6})\.json")


def part_stem(number: int) -> str:
    return f"part-{number:06d}"


@dataclass
class PartRows:
    """The vectors of one part and what each row is."""

    vectors: np.ndarray  # float32 [M, D]
    product_rows: list[int] = field(default_factory=list)  # per vector: index into ids
    views: list[int] = field(default_factory=list)  # per vector: the view it embeds (0 for one vector per product)
    ids: list[str] = field(default_factory=list)  # per product
    raw_ids: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # products with no readable view
    unreadable_views: int = 0


def write_part(folder: Path, number: int, rows: PartRows) -> None:
    vectors = np.ascontiguousarray(rows.vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(rows.product_rows) or len(rows.views) != len(vectors):
        raise ValueError(f"part {number}: {vectors.shape} vectors for {len(rows.product_rows)} rows")
    stem = part_stem(number)
    atomic_write(folder / f"{stem}.npy", lambda f: np.save(f, vectors, allow_pickle=False), remove_stale=True)
    body = {"part": number, "rows": len(vectors), "products": len(rows.ids), "dim": int(vectors.shape[1]),
            "product_rows": rows.product_rows, "views": rows.views, "ids": rows.ids, "raw_ids": rows.raw_ids,
            "datasets": rows.datasets, "skipped": rows.skipped, "unreadable_views": rows.unreadable_views,
            "sha256": hashlib.sha256(vectors.tobytes()).hexdigest()}
    write_json_atomic(folder / f"{stem}.json", body, remove_stale=True)


def finished_parts(folder: Path) -> set[int]:
    """Parts whose mark (the JSON) and vectors are both there."""
    if not folder.is_dir():
        return set()
    done = set()
    for path in folder.iterdir():
        match = _PART.fullmatch(path.name)
        if match and path.with_suffix(".npy").is_file():
            done.add(int(match.group(1)))
    return done


def read_part(folder: Path, number: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A finished part's vectors and description; a part whose vectors do not match its mark (edited
    or damaged since) is refused naming the file."""
    stem = folder / part_stem(number)
    meta = json.loads(stem.with_suffix(".json").read_text())
    vectors = np.load(stem.with_suffix(".npy"), allow_pickle=False)
    if hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).hexdigest() != meta["sha256"]:
        raise ValueError(f"{stem}.npy does not match {stem}.json (changed since it was written): delete both "
                         "and export again; the rerun redoes only that part")
    return vectors, meta


@dataclass
class Export:
    """A whole export, concatenated: vectors with their product row and view, per-product ids."""

    vectors: np.ndarray
    product_rows: np.ndarray  # int64 [M]
    views: np.ndarray  # int64 [M]
    ids: list[str]
    raw_ids: list[str]
    datasets: list[str]
    skipped: list[dict[str, str]]
    unreadable_views: int
    plan: dict[str, Any]

    @property
    def multi_vector(self) -> bool:
        return bool(len(self.views)) and bool((self.views > 0).any())

    def per_product(self) -> np.ndarray:
        """``[N, D]`` for single-vector exports; ``[N, V, D]`` (zero rows for absent views) otherwise."""
        if not self.multi_vector:
            return self.vectors
        out = np.zeros((len(self.ids), int(self.views.max()) + 1, self.vectors.shape[1]), dtype=np.float32)
        out[self.product_rows, self.views] = self.vectors
        return out


def read_export(folder: str | Path) -> Export:
    """Every part of a finished export, in part order. An export with parts missing (still running,
    or killed) is refused naming how many and the command that finishes it."""
    folder = Path(folder)
    plan_path = folder / EXPORT_FILE
    if not plan_path.is_file():
        raise FileNotFoundError(f"{folder}: no {EXPORT_FILE}; write an export with `lightning predict ... "
                                "--trainer.callbacks+=callbacks.EmbeddingWriter` (see docs/serving/indexes.md)")
    plan = json.loads(plan_path.read_text())
    expected = set(range(int(plan["parts"])))
    missing = sorted(expected - finished_parts(folder))
    if missing:
        raise ValueError(f"{folder}: {len(missing)} of {len(expected)} parts are not written yet (e.g. part "
                         f"{missing[0]}): run the same `lightning predict` command again; it redoes only those")
    vectors, rows, views, ids, raw, datasets, skipped, unreadable = [], [], [], [], [], [], [], 0
    for number in sorted(expected):
        part, meta = read_part(folder, number)
        vectors.append(part)
        rows += [len(ids) + r for r in meta["product_rows"]]
        views += meta["views"]
        ids += meta["ids"]
        raw += meta["raw_ids"]
        datasets += meta["datasets"]
        skipped += meta["skipped"]
        unreadable += meta["unreadable_views"]
    if not ids:
        raise ValueError(f"{folder}: the export holds no product: all {len(skipped)} were skipped as unreadable "
                         f"(listed with their reasons in {folder}/part-*.json); fix the photos and export again")
    dims = {v.shape[1] for v in vectors if len(v)}
    if len(dims) > 1:
        raise ValueError(f"{folder}: parts of dimensions {sorted(dims)}: written by different models; export again "
                         "into an empty folder")
    dim = dims.pop() if dims else 0
    stacked = np.concatenate([v.reshape(-1, dim) for v in vectors]) if vectors else np.zeros((0, dim), np.float32)
    return Export(stacked, np.asarray(rows, dtype=np.int64), np.asarray(views, dtype=np.int64), ids, raw, datasets,
                  skipped, unreadable, plan)


def checkpoint_stamp(ckpt: str | Path | None, seed: str | None = None) -> str:
    """How a checkpoint is named in a fingerprint (``cir.models.model_fingerprint``): ``sha256:`` and
    the first 16 hex digits of its bytes (read in 1 MiB blocks), wherever the file lies; without one,
    ``untrained (seed N)``."""
    if not ckpt:
        return f"untrained (seed {seed})"
    h = hashlib.sha256()
    with Path(ckpt).open("rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return f"sha256:{h.hexdigest()[:16]}"


def plan_digest(keys: Iterable[str]) -> str:
    """A digest of what is exported, in order (product keys or shard names), so a rerun over a
    changed source is caught."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode())
        h.update(b"\0")
    return h.hexdigest()


def check_plan(folder: Path, plan: dict[str, Any], compared: Sequence[str]) -> str | None:
    """None when ``folder`` holds no export or one of the same ``plan`` (on the ``compared`` keys);
    else one line naming the difference."""
    path = folder / EXPORT_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    for key in compared:
        if recorded.get(key) != plan.get(key):
            return (f"{folder} holds an export with {key}={recorded.get(key)!r}, this run has {plan.get(key)!r}: "
                    "export into a new folder (or delete this one)")
    return None
