"""A saved gallery index that changes while it is served: the index as a read-only base, plus a
change log in its folder.

``MutableGallery.open(folder)`` loads the ``GalleryIndex`` saved there and replays ``changes.log``
on top of it. Each ``upsert`` or ``delete`` appends one record to the log and fsyncs it before it
returns, then applies it in memory: added or replaced products live in a small exact overlay,
removed or replaced base products are hidden from the base's results (which are fetched deeper by
as many as are hidden, so ``k`` stays full on an exact base). ``compact()`` folds everything into a
new base (``GalleryIndex.save``, itself kill-safe) and starts a new log.

The log's format is in ``change_log.py`` (no pickles; framed, checksummed records). Its first record (the
header, written whole by an atomic rename) names the base it applies to by the faiss files the
base's ``gallery_index.json`` lists (every save names them afresh). A kill mid-append leaves a torn
last record: it is found by its length or checksum, dropped on load and cut off the file, and every
record before it is kept. A kill during ``compact()`` leaves either the old base with its log, or
the new base with the old log, whose header then names another base: that log is already in the
new base (its last record says a compaction began) and is replaced by an empty one. Replaying
changes is idempotent in any case (each one sets or removes whole products), so nothing is ever
lost or counted twice.

One writer per folder: writes are serialised by a lock, and searches see each change whole.
``open(folder, read_only=True)`` is for readers beside a live writer (``cir search query`` next to
``cir serve``): it replays what the log holds now and writes nothing: a torn tail is left for the
writer (it may be a record being appended), and a log of another base is not set aside.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from datamodules.atomic import atomic_write

from .change_log import LOG, MAGIC, as_f32, encode_record, read_log
from .gallery_index import GalleryIndex
from .overlay import Overlay, base_id, build_options, is_multi_vector, vectors_of
from .store import Hit


class MutableGallery:
    """``WritableStore`` over a saved ``GalleryIndex`` and its change log (see the module's doc)."""

    def __init__(self, folder: str | Path, base: GalleryIndex, base_name: str) -> None:
        self.folder, self.base, self.base_name = Path(folder), base, base_name
        self.log_path = self.folder / LOG
        self.dim: int | None = next((ix.d for ix in base.indexes.values()), None)
        self.notes: list[str] = []  # what opening found and did, for the caller to show
        self.pending = 0  # changes in the log, not yet in the base
        self._overlay: dict[str, Overlay] = {}
        self._hidden: dict[str, set[str]] = {}  # base ids removed or replaced
        self._meta: dict[str, dict[str, dict[str, str]]] = {}
        self._index_base()
        self._fd: int | None = None
        self.read_only = False
        self._state = threading.RLock()  # searches and in-memory changes
        self._writer = threading.Lock()  # one change (log, then memory) at a time

    @property
    def fingerprint(self) -> dict[str, str] | None:
        return self.base.fingerprint

    def _index_base(self) -> None:
        self._base_ids = {d: set(ids) for d, ids in self.base.ids.items()}

    @classmethod
    def open(cls, folder: str | Path, base: GalleryIndex | None = None, read_only: bool = False) -> MutableGallery:
        """The index in ``folder`` (``base``: it, already loaded) with its change log replayed. An
        index of several vectors per product is refused: the overlay holds one per product.
        ``read_only``: replay without writing anything (see the module's doc); changes are refused."""
        folder = Path(folder)
        base = base if base is not None else GalleryIndex.load(folder)
        if is_multi_vector(base):
            raise ValueError(f"{folder} holds several vectors per product (a multi-vector index); MutableGallery "
                             "adds one per product")
        out = cls(folder, base, base_id(folder))
        out.read_only = read_only
        if out.log_path.is_file():
            out._replay()
        return out

    # -- reading -----------------------------------------------------------------------------
    def datasets(self) -> list[str]:
        with self._state:
            return sorted(d for d in set(self.base.ids) | set(self._overlay) if self._count(d))

    def _count(self, dataset: str) -> int:
        ov = self._overlay.get(dataset)
        return (len(self.base.ids.get(dataset, ())) - len(self._hidden.get(dataset, ()))
                + (len(ov.ids) if ov else 0))

    def count(self, dataset: str) -> int:
        with self._state:
            return self._count(dataset)

    def ids(self, dataset: str) -> list[str]:
        """The dataset's products: the base's in its order, then the added ones."""
        with self._state:
            hidden = self._hidden.get(dataset, set())
            ov = self._overlay.get(dataset)
            return [i for i in self.base.ids.get(dataset, []) if i not in hidden] + (list(ov.ids) if ov else [])

    def contains(self, dataset: str, pid: str) -> bool:
        with self._state:
            ov = self._overlay.get(dataset)
            return (ov is not None and pid in ov.rows) or (
                pid in self._base_ids.get(dataset, ()) and pid not in self._hidden.get(dataset, ()))

    def meta(self, dataset: str, pid: str) -> dict[str, str]:
        with self._state:
            return dict(self._meta.get(dataset, {}).get(pid, {}))

    def search(self, queries: Any, k: int, dataset: str | None = None,
               where: Mapping[str, str] | None = None) -> list[list[Hit]]:
        q = as_f32(queries)
        if q.ndim != 2:
            raise ValueError(f"queries of shape {tuple(q.shape)}: this store holds one vector per product ([Q, D])")
        with self._state:
            dataset = self._dataset_of(dataset)
            hidden = self._hidden.get(dataset, set())
            kept = self._meta.get(dataset, {})

            def ok(pid: str) -> bool:
                return where is None or all(kept.get(pid, {}).get(key) == v for key, v in where.items())

            base: list[list[Hit]] = [[] for _ in q]
            n_base = len(self.base.ids.get(dataset, ()))
            if n_base:
                deep = n_base if where else min(n_base, k + len(hidden))  # as many more as may be filtered out
                base = [[h for h in row if h[0] not in hidden and ok(h[0])]
                        for row in self.base.search(q, deep, dataset=dataset)]
            ov = self._overlay.get(dataset)
            added = ov.search(q, len(ov.ids) if where else k) if ov else [[] for _ in q]
            return [sorted(b + [h for h in a if ok(h[0])], key=lambda h: -h[1])[:k]
                    for b, a in zip(base, added, strict=True)]

    def _dataset_of(self, dataset: str | None) -> str:
        held = [d for d in set(self.base.ids) | set(self._overlay) if self._count(d)]
        if dataset is None:
            if len(held) != 1:
                raise ValueError(f"this index holds datasets {sorted(held)}: name one with dataset=")
            return held[0]
        if dataset not in held:
            raise KeyError(f"no gallery for dataset {dataset!r}; the index holds {sorted(held)}")
        return dataset

    # -- writing -----------------------------------------------------------------------------
    def upsert(self, dataset: str, ids: Sequence[str], vectors: Any,
               meta: Sequence[Mapping[str, str]] | None = None) -> None:
        ids = [str(i) for i in ids]
        v = as_f32(vectors)
        if v.ndim != 2 or len(v) != len(ids):
            raise ValueError(f"{len(ids)} ids and vectors of shape {tuple(v.shape)}: give one [D] row per id")
        if self.dim is not None and v.shape[1] != self.dim:
            raise ValueError(f"vectors of {v.shape[1]} dimensions; this index holds {self.dim}")
        if not np.isfinite(v).all():
            raise ValueError("vectors hold NaN or infinite values")
        if meta is not None and len(meta) != len(ids):
            raise ValueError(f"{len(ids)} ids and {len(meta)} metadata records differ")
        if not dataset or not ids:
            raise ValueError("name the dataset and at least one product id")
        head = {"op": "upsert", "dataset": dataset, "ids": ids, "shape": list(v.shape),
                "meta": [{str(k): str(x) for k, x in m.items()} for m in meta] if meta is not None else None}
        with self._writer:
            self._append(encode_record(head, v))
            with self._state:
                self._apply(head, v)

    def delete(self, dataset: str, ids: Sequence[str]) -> int:
        with self._writer:
            present = list(dict.fromkeys(str(i) for i in ids if self.contains(dataset, str(i))))
            if present:
                head = {"op": "delete", "dataset": dataset, "ids": present}
                self._append(encode_record(head))
                with self._state:
                    self._apply(head, None)
            return len(present)

    def _apply(self, head: Mapping[str, Any], vectors: np.ndarray | None) -> None:
        dataset, op = head["dataset"], head["op"]
        kept = self._meta.setdefault(dataset, {})
        for n, pid in enumerate(head["ids"]):
            if pid in self._base_ids.get(dataset, ()):
                self._hidden.setdefault(dataset, set()).add(pid)
            kept.pop(pid, None)
            if op == "upsert":
                if self.dim is None:
                    self.dim = vectors.shape[1]
                self._overlay.setdefault(dataset, Overlay(self.dim)).put(pid, vectors[n])
                if head.get("meta") and head["meta"][n]:
                    kept[pid] = dict(head["meta"][n])
            elif dataset in self._overlay:
                self._overlay[dataset].remove(pid)
        self.pending += 1

    def _append(self, record: bytes) -> None:
        """``record`` on disk (fsynced) at the log's end, or not at all."""
        if self.read_only:
            raise PermissionError(f"{self.folder} was opened read-only: its changes come from the process that "
                                  "writes them (cir serve)")
        if self._fd is None:
            if not self.log_path.is_file():
                self._write_header(self._all_meta())
            self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except BaseException:
            # A failed write (a full disk) must not leave half a record for the next one to follow.
            try:
                os.ftruncate(self._fd, size)
                os.fsync(self._fd)
            except OSError:
                os.close(self._fd)
                self._fd = None
            raise

    def _write_header(self, meta: Mapping[str, Any]) -> None:
        header = {"op": "header", "format": 1, "base": self.base_name, "dim": self.dim, "meta": meta}

        def write(f: BinaryIO) -> None:
            f.write(MAGIC + encode_record(header))

        atomic_write(self.log_path, write, remove_stale=True)

    def _all_meta(self) -> dict[str, dict[str, dict[str, str]]]:
        return {d: dict(m) for d, m in self._meta.items() if m}

    def close(self) -> None:
        with self._writer:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- loading and compaction ------------------------------------------------------------
    def _replay(self) -> None:
        records, whole = read_log(self.log_path)
        if self.read_only:
            self._replay_read_only(records)
            return
        if whole < self.log_path.stat().st_size:
            self.notes.append(f"{self.log_path}: dropped a torn last record ({self.log_path.stat().st_size - whole} "
                              "bytes of a write cut off by a kill); every change before it is kept")
            with open(self.log_path, "r+b") as f:
                f.truncate(whole)
                os.fsync(f.fileno())
        header = records[0][0]
        if header.get("base") != self.base_name:
            self._supersede(records)
            return
        if self.dim is None and header.get("dim"):
            self.dim = int(header["dim"])
        self._meta = {d: {p: dict(m) for p, m in ms.items()} for d, ms in (header.get("meta") or {}).items()}
        for head, vectors in records[1:]:
            if head.get("op") in ("upsert", "delete"):
                self._apply(head, vectors)

    def _replay_read_only(self, records: list[tuple[dict[str, Any], np.ndarray | None]]) -> None:
        """The changes a writer would replay, applied in memory only."""
        header, changes = records[0][0], records[1:]
        if header.get("base") != self.base_name:
            marks = [n for n, (h, _) in enumerate(records) if h.get("op") == "compacting"]
            if not marks:
                self.notes.append(f"{self.log_path} was written for another base than the index there now: "
                                  "its changes are not applied")
                return
            changes = records[marks[-1] + 1:]  # the rest are in this base already (see _supersede)
        else:
            self._meta = {d: {p: dict(m) for p, m in ms.items()} for d, ms in (header.get("meta") or {}).items()}
        if self.dim is None and header.get("dim"):
            self.dim = int(header["dim"])
        for head, vectors in changes:
            if head.get("op") in ("upsert", "delete"):
                self._apply(head, vectors)

    def _supersede(self, records: list[tuple[dict[str, Any], np.ndarray | None]]) -> None:
        """The log was written for an earlier base. After a compaction killed before it replaced
        the log, that base's changes are all in the current one; after a rebuild of the index by
        other means they are not, and the old log is kept aside. The metadata of products still
        there is carried over."""
        meta: dict[str, dict[str, dict[str, str]]] = {}
        for d, ms in (records[0][0].get("meta") or {}).items():
            meta[d] = {p: dict(m) for p, m in ms.items()}
        for head, _ in records[1:]:
            if head.get("op") not in ("upsert", "delete"):
                continue
            kept = meta.setdefault(head["dataset"], {})
            for n, pid in enumerate(head["ids"]):
                kept.pop(pid, None)
                if head["op"] == "upsert" and head.get("meta") and head["meta"][n]:
                    kept[pid] = dict(head["meta"][n])
        self._meta = {d: {p: m for p, m in ms.items() if p in self._base_ids.get(d, ())} for d, ms in meta.items()}
        marks = [n for n, (h, _) in enumerate(records) if h.get("op") == "compacting"]
        # Writes wait while a compaction runs, so the changes after its mark came once it was over:
        # when it saved the new base but could not start a new log, they are in no base and are
        # replayed (and logged again below); the changes before the mark are in the new base.
        after = [(h, v) for h, v in records[marks[-1] + 1:] if h.get("op") in ("upsert", "delete")] if marks else []
        changes = sum(1 for h, _ in records[1:] if h.get("op") in ("upsert", "delete"))
        if not marks and changes:
            aside = self.folder / f"changes-superseded-{time.strftime('%Y%m%d-%H%M%S')}.log"
            os.replace(self.log_path, aside)
            self.notes.append(f"{self.log_path} was written for another base than the index there now (rebuilt "
                              f"since?): its {changes} changes are not replayed; kept as {aside.name}")
        self._write_header(self._all_meta())
        for head, vectors in after:
            self._apply(head, vectors)
            self._append(encode_record(head, vectors))

    def compact(self) -> None:
        """Everything into a new base; the log starts again. Searches go on meanwhile; writes wait."""
        if self.read_only:
            raise PermissionError(f"{self.folder} was opened read-only: compaction belongs to the process that "
                                  "writes its changes (cir serve)")
        with self._writer:
            with self._state:
                rows = []
                for dataset in sorted(set(self.base.ids) | set(self._overlay)):
                    hidden = self._hidden.get(dataset, set())
                    if dataset in self.base.indexes:
                        vecs = vectors_of(self.base, dataset)
                        rows += [(dataset, pid, vecs[n]) for n, pid in enumerate(self.base.ids[dataset])
                                 if pid not in hidden]
                    if dataset in self._overlay:
                        ov = self._overlay[dataset]
                        rows += [(dataset, pid, ov.vectors[n].copy()) for n, pid in enumerate(ov.ids)]
                options = build_options(self.base)
            if self.log_path.is_file():
                self._append(encode_record({"op": "compacting", "dataset": "", "ids": []}))
            if rows:
                args = (np.stack([r[2] for r in rows]), [r[1] for r in rows], [r[0] for r in rows])
                try:
                    new = GalleryIndex.build(*args, kind=self.base.kind, fingerprint=self.base.fingerprint, **options)
                except ValueError as exc:  # a dataset now too small to train the base's kind (a new one, deletes)
                    self.notes.append(f"compaction: {exc}; the new base is exact (flat) instead of {self.base.kind}")
                    new = GalleryIndex.build(*args, kind="flat", fingerprint=self.base.fingerprint,
                                             store_vectors=bool(options.get("store_vectors")))
            else:
                new = GalleryIndex(self.base.kind, self.base.fingerprint)
            new.save(self.folder)
            new = GalleryIndex.load(self.folder)  # as saved: on-disk lists and mapped vectors stay on disk
            with self._state:  # the new base holds exactly what base + overlay held
                self.base, self.base_name = new, base_id(self.folder)
                self._overlay, self._hidden, self.pending = {}, {}, 0
                self._index_base()
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
            # If this is cut off, the next write starts a log for the new base: nothing is missing.
            self._write_header(self._all_meta())
