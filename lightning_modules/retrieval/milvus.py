"""A product store in Milvus: a Milvus Lite file on one machine, a Milvus cluster at scale.

The same client code serves both: ``uri`` is a local path ending in ``.db`` (Milvus Lite, in this
process, one process per file) or a server address such as ``http://host:19530`` with a ``token``.

One row per product vector. The primary key is the JSON text of ``[dataset, product_id, view]``:
exact and readable, where an int64 hash of it could make two products collide and silently
overwrite one another (at 10⁸ rows, about one chance in 4,000). Each dataset lives in a partition
of its own (the dataset name, hex-encoded), which lists the datasets without a scan and keeps a
search inside one; its rows also carry ``dataset`` for the filter expressions. ``head`` marks one
row per product, so that products (not vectors) are counted. The model fingerprint, the
multi-vector flag and the format sit in the collection's ``fashion_cir`` property, written in the
same call that creates the collection.

Visibility and durability: collections are created with consistency level ``Strong`` and every
search and query asks for it, so a read sees every write acknowledged before it. A Milvus cluster
acknowledges a write once it is in its write-ahead log. Milvus Lite writes each change to its
log and hands it to the operating system before answering (a killed process loses nothing), but
fsyncs the log only when it rotates it; on a Lite file this store therefore fsyncs the
collection's files after each write, so an operating-system crash loses nothing either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.atomic import fsync_path

from .store import Hit

INSTALL = "pip install 'fashion-cir[milvus]'"
PROPERTY = "fashion_cir"  # the collection property holding the store's own description
FORMAT = 1
FIELD_BYTES = {"pk": 2048, "dataset": 126, "product_id": 1024, "category": 256}  # Milvus limits bytes
METADATA = ("category",)  # the meta keys kept (and filterable with where=)
INDEXES = ("FLAT", "HNSW", "AUTOINDEX")  # FLAT: exact, as faiss's IndexFlatIP; HNSW: approximate
# Rows fetched per wanted product in a multi-vector store, before widening: the list is grown
# (x4) until it holds k distinct products or ends, which makes the candidates exact on FLAT.
CANDIDATE_FACTOR = 4
MAX_LIMIT = 16384  # Milvus's largest top-k
ID_CHUNK = 512  # product ids per filter expression
ROW_BYTES = 16 << 20  # vector bytes per upsert request (gRPC messages stay well under 64 MiB)
# Milvus Lite searches rows not yet flushed by converting them on every call (about 45 ms per 1,000
# 512-dim rows on two cores), and keeps up to 128 MiB of them: a Lite store flushes once this many
# rows have been written since its last flush. A server flushes by itself.
LITE_FLUSH_ROWS = 256
_open_lite: dict[str, int] = {}  # Lite files this process opened -> open stores, to release the file


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError:
        raise ImportError(f"MilvusGallery needs pymilvus: {INSTALL}") from None
    return pymilvus


def quote(value: str) -> str:
    """``value`` as a Milvus string literal. Ids and categories come from users, so a quote or a
    backslash must stay inside the literal; these escapes are the ones Milvus and Milvus Lite share."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(escapes.get(c, c) for c in value) + '"'


def _in(field: str, values: Sequence[str]) -> str:
    return f"{field} in [{', '.join(quote(v) for v in values)}]"


def _checked(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, got {type(value).__name__}: {value!r}")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValueError(f"{field} {value!r} is not valid Unicode (a lone surrogate)") from None
    if size > FIELD_BYTES[field] or (field in ("dataset", "product_id") and not size):
        raise ValueError(f"{field} {value[:60]!r} has {size} UTF-8 bytes; 1 to {FIELD_BYTES[field]} fit")
    return value


def _key(dataset: str, product_id: str, view: int) -> str:
    return json.dumps([dataset, product_id, view], ensure_ascii=False)


def _partition(dataset: str) -> str:
    return "ds_" + _checked(dataset, "dataset").encode().hex()


def _absent(rows: np.ndarray) -> np.ndarray:
    """Padding views: all zero (the store protocol) or NaN (``search.maxsim``'s convention)."""
    return ~rows.any(-1) | np.isnan(rows).any(-1)


class MilvusGallery:
    """``WritableStore`` over one Milvus collection (see the module docstring).

    ``dim``, ``multi_vector`` and ``index`` matter when the collection is created (on the first
    upsert when ``dim`` is None); on an existing one a ``dim``, ``multi_vector`` or ``fingerprint``
    that differs from what it records is refused in one line. ``fingerprint`` None opens any store
    and reports its fingerprint in ``self.fingerprint`` for the caller to check."""

    def __init__(self, uri: str, collection: str = "fashion_cir", token: str | None = None, *,
                 dim: int | None = None, fingerprint: dict[str, str] | None = None,
                 multi_vector: bool | None = None, index: str = "FLAT", timeout: float | None = None) -> None:
        pymilvus = _pymilvus()
        if index not in INDEXES:
            raise ValueError(f"index {index!r} is not one of {', '.join(INDEXES)}")
        self.uri, self.collection, self.timeout = uri, collection, timeout
        self.label = f"collection {collection!r} at {uri}"
        self.lite = uri.endswith(".db")
        if self.lite:
            try:
                import milvus_lite  # noqa: F401
            except ImportError:
                raise ImportError(f"a .db uri needs Milvus Lite: {INSTALL}") from None
            self.uri = uri = os.path.abspath(uri)
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = pymilvus.MilvusClient(uri=uri, token=token or "", timeout=timeout)
        except Exception as e:
            hint = (" (Milvus Lite serves a file to one process at a time: is another one using it?)"
                    if self.lite else "")
            raise ConnectionError(f"cannot open Milvus at {uri}: {getattr(e, 'message', None) or e}{hint}") from None
        if self.lite:
            _open_lite[uri] = _open_lite.get(uri, 0) + 1
        self.dim, self.multi_vector, self.index = dim, bool(multi_vector), index
        self._unflushed, self._closed = 0, False
        self.fingerprint, self._asked = fingerprint, multi_vector
        try:
            self._open_or_create(dim)
        except BaseException:
            self.close()  # a refused store must not keep the Lite file open
            raise

    # ---- opening and creating

    def _open_or_create(self, dim: int | None) -> None:
        """Opens the collection, or creates it once ``dim`` is known (until then ``self.dim`` is None)."""
        if self.client.has_collection(self.collection):
            self._open_existing(dim, self.fingerprint, self._asked)
        elif dim is not None:
            self._create(dim)

    def _open_existing(self, dim: int | None, fingerprint: dict[str, str] | None,
                       multi_vector: bool | None) -> None:
        info = self.client.describe_collection(self.collection)
        raw = (info.get("properties") or {}).get(PROPERTY)
        if raw is None:
            raise ValueError(f"{self.label} was not written by MilvusGallery: name another collection")
        recorded = json.loads(raw)
        vector = next(f for f in info["fields"] if f["name"] == "vector")
        self.dim = int(vector["params"]["dim"])
        if dim is not None and dim != self.dim:
            raise ValueError(f"{self.label} holds {self.dim}-dim vectors but this model gives {dim}-dim ones: "
                             "name another collection or rebuild it")
        self.multi_vector = bool(recorded["multi_vector"])
        if multi_vector is not None and multi_vector != self.multi_vector:
            kinds = {True: "multi-vector", False: "single-vector"}
            raise ValueError(f"{self.label} is a {kinds[self.multi_vector]} store, asked for "
                             f"{kinds[multi_vector]}: name another collection")
        stored = recorded.get("fingerprint")
        if fingerprint is not None:
            if stored is None:
                raise ValueError(f"{self.label} records no model fingerprint, so nothing says which model "
                                 "embedded it: rebuild it or name another collection")
            differ = [f"{key} {stored.get(key)!r} (store) vs {fingerprint.get(key)!r} (this model)"
                      for key in sorted(set(stored) | set(fingerprint)) if stored.get(key) != fingerprint.get(key)]
            if differ:
                raise ValueError(f"{self.label} was built by another model: {'; '.join(differ)}. Query it with "
                                 "that model, or rebuild it or name another collection")
        self.fingerprint = stored
        self.index = self.client.describe_index(self.collection, "vector").get("index_type", self.index)
        if self.client.get_load_state(self.collection)["state"].name != "Loaded":
            self.client.load_collection(self.collection)  # a released collection answers nothing

    def _create(self, dim: int) -> None:
        pymilvus = _pymilvus()
        data_type = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", data_type.VARCHAR, is_primary=True, max_length=FIELD_BYTES["pk"])
        for name in ("dataset", "product_id", "category"):
            schema.add_field(name, data_type.VARCHAR, max_length=FIELD_BYTES[name])
        schema.add_field("view", data_type.INT32)
        schema.add_field("head", data_type.BOOL)
        schema.add_field("vector", data_type.FLOAT_VECTOR, dim=dim)
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type=self.index, metric_type="IP",
                         params={"M": 32, "efConstruction": 200} if self.index == "HNSW" else {})
        record = {"format": FORMAT, "multi_vector": self.multi_vector, "fingerprint": self.fingerprint}
        self.client.create_collection(self.collection, schema=schema, index_params=params,
                                      consistency_level="Strong", properties={PROPERTY: json.dumps(record)})
        self.dim = dim

    def close(self) -> None:
        """Closes the client; the last store of a Lite file in this process releases the file."""
        if self._closed:
            return
        self._closed = True
        self.client.close()
        if self.lite and _open_lite.get(self.uri):
            _open_lite[self.uri] -= 1
            if not _open_lite[self.uri]:
                del _open_lite[self.uri]
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.uri)

    def __enter__(self) -> MilvusGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading

    def _partitions(self) -> dict[str, str]:
        if self.dim is None:
            self._open_or_create(None)  # another client may have created it since
            if self.dim is None:
                return {}
        names = self.client.list_partitions(self.collection)
        return {bytes.fromhex(p[3:]).decode(): p for p in names if p.startswith("ds_")}

    def _query(self, dataset: str, expr: str, fields: list[str], limit: int | None = None) -> list[dict]:
        extra = {"limit": limit} if limit is not None else {}
        return self.client.query(self.collection, filter=f"dataset == {quote(dataset)} and {expr}",
                                 output_fields=fields, partition_names=[_partition(dataset)],
                                 consistency_level="Strong", timeout=self.timeout, **extra)

    def _rows(self, partition: str) -> int:
        """Milvus Lite's live row count of a partition: deleted and replaced rows left out, and
        cheaper than its count(*), which reads every row. A server's may still count deleted rows
        until it compacts, so a server is asked with count(*)."""
        return int(self.client.get_partition_stats(self.collection, partition)["row_count"])

    def datasets(self) -> list[str]:
        """Datasets with at least one product (an emptied one keeps its partition but is not listed)."""
        partitions = self._partitions()
        if self.lite:
            return sorted(d for d, p in partitions.items() if self._rows(p))
        return sorted(d for d in partitions if self._query(d, "head == true", ["product_id"], limit=1))

    def count(self, dataset: str) -> int:
        partitions = self._partitions()
        if dataset not in partitions:
            return 0
        if self.lite and not self.multi_vector:
            return self._rows(partitions[dataset])
        return int(self._query(dataset, "head == true", ["count(*)"])[0]["count(*)"])

    def search(self, queries: Any, k: int, dataset: str | None = None,
               where: Mapping[str, str] | None = None) -> list[list[Hit]]:
        """Top-``k`` products per query (see ``ProductStore.search``). A single-vector query on a
        single-vector store is one Milvus search; otherwise each query vector's list is searched
        for ``k`` distinct products (``CANDIDATE_FACTOR``), and their union is re-ranked exactly by
        MaxSim over the candidates' stored view vectors."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim not in (2, 3) or q.shape[-1] != self.dim:
            raise ValueError(f"queries of shape {tuple(q.shape)} for {self.label}, which holds {self.dim}-dim "
                             "vectors: give [Q, D] or [Q, V, D] from the model that built it")
        partitions = self._partitions()
        if dataset is None:
            held = self.datasets()
            if len(held) != 1:
                raise ValueError(f"{self.label} holds datasets {held}: name one with dataset=")
            dataset = held[0]
        if dataset not in partitions:
            raise KeyError(f"no gallery for dataset {dataset!r}; {self.label} holds {self.datasets()}")
        expr = f"dataset == {quote(dataset)}"
        for key, value in sorted((where or {}).items()):
            if key not in METADATA:
                raise ValueError(f"where: {key!r} is not kept by MilvusGallery; it filters by {', '.join(METADATA)}")
            expr += f" and {key} == {quote(_checked(value, key))}"
        if q.ndim == 2 and not self.multi_vector:
            return [[(h["entity"]["product_id"], float(h["distance"])) for h in hits]
                    for hits in self._search_rows(q, k, dataset, expr)]
        qv = q[:, None] if q.ndim == 2 else q
        present = ~_absent(qv)
        owner = np.nonzero(present)[0]
        lists = self._distinct_products(qv[present], k, dataset, expr)
        candidates: list[set[str]] = [set() for _ in range(len(qv))]
        for i, products in zip(owner.tolist(), lists, strict=True):
            candidates[i].update(products)
        views = self._view_vectors(dataset, sorted(set().union(*candidates)))
        out = []
        for i, ids in enumerate(candidates):
            # Exact MaxSim: the best pair of a query view and a stored view of the product.
            scored = [(pid, float((qv[i][present[i]] @ views[pid].T).max())) for pid in ids if pid in views]
            out.append(sorted(scored, key=lambda hit: (-hit[1], hit[0]))[:k])
        return out

    def _search_rows(self, rows: np.ndarray, limit: int, dataset: str, expr: str) -> list[list[dict]]:
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.index == "HNSW":
            params["params"] = {"ef": max(limit, 128)}
        out: list[list[dict]] = []
        for start in range(0, len(rows), 256):
            out += self.client.search(self.collection, data=rows[start:start + 256].tolist(), filter=expr,
                                      limit=min(limit, MAX_LIMIT), output_fields=["product_id"],
                                      search_params=params, partition_names=[_partition(dataset)],
                                      consistency_level="Strong", timeout=self.timeout)
        return out

    def _distinct_products(self, rows: np.ndarray, k: int, dataset: str, expr: str) -> list[list[str]]:
        """The first ``k`` distinct products of each row's ranked list of stored vectors. Every
        product missing from a list scores at most its last row there, so on a FLAT index these
        are each row's exact top-``k`` products by the best of their views."""
        limit = k * (CANDIDATE_FACTOR if self.multi_vector else 1)
        todo, out = list(range(len(rows))), [[] for _ in range(len(rows))]
        while todo:
            results = self._search_rows(rows[todo], limit, dataset, expr)
            again = []
            for r, hits in zip(todo, results, strict=True):
                products = list(dict.fromkeys(h["entity"]["product_id"] for h in hits))
                out[r] = products[:k]
                if len(products) < k and len(hits) == limit < MAX_LIMIT:
                    again.append(r)  # a full list of too few products: widen it
            todo, limit = again, min(limit * 4, MAX_LIMIT)
        return out

    def _view_vectors(self, dataset: str, ids: list[str]) -> dict[str, np.ndarray]:
        """Each product's stored view vectors ``[views, D]``."""
        rows: dict[str, list[Any]] = {}
        for start in range(0, len(ids), ID_CHUNK):
            for row in self._query(dataset, _in("product_id", ids[start:start + ID_CHUNK]), ["product_id", "vector"]):
                rows.setdefault(row["product_id"], []).append(row["vector"])
        return {pid: np.asarray(v, dtype=np.float32) for pid, v in rows.items()}

    # ---- writing

    def upsert(self, dataset: str, ids: Sequence[str], vectors: Any,
               meta: Sequence[Mapping[str, str]] | None = None) -> None:
        """Adds the products, replacing any of the same ``(dataset, id)`` with all their views
        (the views a product no longer has are removed after the new ones are written, so a kill
        in between leaves the product searchable)."""
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 3 and not self.multi_vector:
            raise ValueError(f"[N, V, D] vectors for {self.label}, a single-vector store: create it with "
                             "multi_vector=True")
        v = v[:, None] if v.ndim == 2 else v
        if v.ndim != 3 or len(v) != len(ids) or (self.dim is not None and v.shape[-1] != self.dim):
            raise ValueError(f"{len(ids)} ids and vectors of shape {tuple(np.shape(vectors))} for {self.label} "
                             f"({self.dim}-dim): give [N, D] or [N, V, D] from the model that built it")
        ids = [_checked(pid, "product_id") for pid in ids]
        if len(set(ids)) != len(ids):
            raise ValueError("upsert: an id appears twice in one call; give each product once")
        meta = list(meta) if meta is not None else [{}] * len(ids)
        if len(meta) != len(ids):
            raise ValueError(f"upsert: {len(meta)} meta entries for {len(ids)} ids")
        present = ~_absent(v)
        bad = [pid for pid, p, vec in zip(ids, present, v, strict=True) if not p.any() or not np.isfinite(vec[p]).all()]
        if bad:
            raise ValueError(f"upsert: product {bad[0]!r} has no vector or a non-finite one ({len(bad)} such)")
        rows, kept = [], {}
        for pid, p, vec, m in zip(ids, present, v, meta, strict=True):
            unknown = set(m) - set(METADATA)
            if unknown:
                raise ValueError(f"upsert: meta keys {sorted(unknown)} are not kept by MilvusGallery "
                                 f"(it keeps {', '.join(METADATA)})")
            category = _checked(m.get("category", ""), "category")
            views = np.nonzero(p)[0].tolist()
            kept.setdefault(tuple(views), []).append(pid)
            for n, view in enumerate(views):
                pk = _key(dataset, pid, view)
                if len(pk.encode()) > FIELD_BYTES["pk"]:
                    raise ValueError(f"upsert: dataset and id {pid[:60]!r} are too long together for the key")
                rows.append({"pk": pk, "dataset": dataset, "product_id": pid, "category": category, "view": view,
                             "head": n == 0, "vector": vec[view]})
        if self.dim is None:
            self._open_or_create(v.shape[-1])
        partition = self._ensure_partition(dataset)
        batch = max(1, ROW_BYTES // (4 * v.shape[-1]))
        for start in range(0, len(rows), batch):
            self.client.upsert(self.collection, rows[start:start + batch], partition_name=partition,
                               timeout=self.timeout)
        if self.multi_vector:
            for views, group in kept.items():
                for start in range(0, len(group), ID_CHUNK):
                    expr = (f"dataset == {quote(dataset)} and {_in('product_id', group[start:start + ID_CHUNK])} "
                            f"and view not in [{', '.join(map(str, views))}]")
                    self.client.delete(self.collection, filter=expr, partition_name=partition, timeout=self.timeout)
        self._settle(len(rows))

    def delete(self, dataset: str, ids: Sequence[str]) -> int:
        if dataset not in self._partitions() or not ids:
            return 0
        ids = list(dict.fromkeys(_checked(pid, "product_id") for pid in ids))
        partition, found = _partition(dataset), 0
        for start in range(0, len(ids), ID_CHUNK):
            chunk = ids[start:start + ID_CHUNK]
            if self.multi_vector:  # the views a product has are not known here: match its rows by id
                expr = f"dataset == {quote(dataset)} and {_in('product_id', chunk)}"
                found += len(self._query(dataset, f"{_in('product_id', chunk)} and head == true", ["product_id"]))
            else:  # by primary key: no scan (Milvus Lite reads every row for any other filter)
                expr = _in("pk", [_key(dataset, pid, 0) for pid in chunk])
                found += len(self.client.query(self.collection, filter=expr, output_fields=["pk"],
                                               partition_names=[partition], consistency_level="Strong",
                                               timeout=self.timeout))
            self.client.delete(self.collection, filter=expr, partition_name=partition, timeout=self.timeout)
        self._settle(found)
        return found

    def _ensure_partition(self, dataset: str) -> str:
        name = _partition(dataset)
        if not self.client.has_partition(self.collection, name):
            try:
                self.client.create_partition(self.collection, name)
            except Exception:
                if not self.client.has_partition(self.collection, name):  # not another writer's, just made
                    raise
            # A partition made in a loaded collection is loaded with it (Milvus Lite has no
            # partition-level load at all).
        return name

    def _settle(self, rows: int) -> None:
        """After a write to a Lite file: flush every ``LITE_FLUSH_ROWS`` rows, then fsync the
        collection's files and folders (its log included), which Milvus Lite leaves in the page
        cache. Files its background compaction removes meanwhile are skipped. A server persists
        its own writes."""
        if not self.lite:
            return
        self._unflushed += rows
        if self._unflushed >= LITE_FLUSH_ROWS:
            self.client.flush(self.collection)
            self._unflushed = 0
        root = Path(self.uri) / "collections" / self.collection
        paths = [root.parent] + [Path(folder) / name for folder, _, files in os.walk(root) for name in [*files, "."]]
        for path in paths:
            try:
                fsync_path(path)
            except FileNotFoundError:
                continue
