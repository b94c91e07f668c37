from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.retrieval.gallery_index import GalleryIndex
from lightning_modules.retrieval.search import maxsim
from lightning_modules.retrieval.store import WritableStore

ROOT = Path(__file__).resolve().parents[4]


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Milvus Lite file for the module (each test its own collection): a store held open for
    the whole module keeps its server running between tests."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from lightning_modules.retrieval.milvus import MilvusGallery

    path = str(tmp_path_factory.mktemp("milvus") / "store.db")
    with MilvusGallery(path, "keeper", dim=4):
        yield path


def open_store(uri: str, collection: str, **options):
    from lightning_modules.retrieval.milvus import MilvusGallery

    return MilvusGallery(uri, collection, **options)


def brute_force(q: np.ndarray, g: np.ndarray, ids: list[str], k: int) -> list[list[tuple[str, float]]]:
    s = q @ g.T
    return [[(ids[j], float(row[j])) for j in np.argsort(-row, kind="stable")[:k]] for row in s]


def assert_same_hits(got, want) -> None:
    assert [[pid for pid, _ in row] for row in got] == [[pid for pid, _ in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want],
                               atol=1e-5)


def test_without_the_extra_the_error_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_modules.retrieval.milvus import MilvusGallery

    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(ImportError, match=r"^MilvusGallery needs pymilvus: pip install 'fashion-cir\[milvus\]'$"):
        MilvusGallery("x.db")


def test_a_lite_file_without_milvus_lite_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("pymilvus")
    from lightning_modules.retrieval.milvus import MilvusGallery

    monkeypatch.setitem(sys.modules, "milvus_lite", None)
    with pytest.raises(ImportError, match=r"^a \.db uri needs Milvus Lite: pip install 'fashion-cir\[milvus\]'$"):
        MilvusGallery(str(tmp_path / "x.db"))


def test_search_equals_a_faiss_flat_index_per_dataset_and_brute_force_under_a_category_filter(db: str) -> None:
    rng = np.random.default_rng(0)
    g, q = unit(rng, 600, 32), unit(rng, 20, 32)
    ids = [f"p{i}" for i in range(600)]
    datasets = ["a" if i % 3 else "b" for i in range(600)]
    categories = [("dress", "shirt", "toptee")[i % 5 % 3] for i in range(600)]
    store = open_store(db, "flat", fingerprint={"family": "X"})
    assert isinstance(store, WritableStore)
    for d in ("a", "b"):
        rows = [i for i in range(600) if datasets[i] == d]
        store.upsert(d, [ids[i] for i in rows], g[rows], [{"category": categories[i]} for i in rows])
    assert store.datasets() == ["a", "b"] and (store.count("a"), store.count("b"), store.count("c")) == (400, 200, 0)
    reference = GalleryIndex.build(g, ids, datasets, kind="flat")
    for d in ("a", "b"):
        assert_same_hits(store.search(q, 10, dataset=d), reference.search(q, 10, dataset=d))
        rows = [i for i in range(600) if datasets[i] == d and categories[i] == "shirt"]
        assert_same_hits(store.search(q, 10, dataset=d, where={"category": "shirt"}),
                         brute_force(q, g[rows], [ids[i] for i in rows], 10))
    # Several vectors per query against one per product: the best of them (MaxSim).
    rows = [i for i in range(600) if datasets[i] == "b"]
    pairs = np.stack([q[:10], q[10:]], axis=1)
    want = [[(ids[rows[j]], float(row[j])) for j in np.argsort(-row)[:10]]
            for row in np.maximum(q[:10] @ g[rows].T, q[10:] @ g[rows].T)]
    assert_same_hits(store.search(pairs, 10, dataset="b"), want)
    with pytest.raises(ValueError, match="name one"):
        store.search(q, 10)
    with pytest.raises(KeyError, match="holds"):
        store.search(q, 10, dataset="c")
    with pytest.raises(ValueError, match="filters by category"):
        store.search(q, 10, dataset="a", where={"colour": "red"})
    store.close()


def test_upserts_and_deletes_are_visible_to_the_next_query(db: str) -> None:
    rng = np.random.default_rng(1)
    g, q = unit(rng, 100, 16), unit(rng, 3, 16)
    ids = [f"p{i}" for i in range(100)]
    store = open_store(db, "changes")
    store.upsert("a", ids, g)
    store.upsert("a", ["p7"], q[:1])  # replaced: now the first query's exact match
    assert store.search(q[:1], 1, dataset="a")[0][0] == ("p7", pytest.approx(1.0, abs=1e-5))
    assert store.count("a") == 100
    assert store.delete("a", ["p7", "p8", "p7", "absent"]) == 2
    assert store.count("a") == 98 and store.delete("a", ["p7"]) == 0 and store.delete("b", ["p1"]) == 0
    expected = brute_force(q, np.delete(g, [7, 8], 0), [i for i in ids if i not in ("p7", "p8")], 5)
    assert_same_hits(store.search(q, 5, dataset="a"), expected)
    store.delete("a", ids)
    assert store.datasets() == [] and store.count("a") == 0
    store.close()


def test_a_reopened_store_sees_every_acknowledged_change(tmp_path: Path, db: str) -> None:
    rng = np.random.default_rng(2)
    g, q = unit(rng, 200, 16), unit(rng, 5, 16)
    ids = [f"p{i}" for i in range(200)]
    uri = str(tmp_path / "reopen.db")
    store = open_store(uri, "gallery", fingerprint={"family": "X", "checkpoint": "sha256:1"})
    store.upsert("a", ids[:150], g[:150], [{"category": "dress"}] * 150)
    store.upsert("b", ids[150:], g[150:])
    store.upsert("a", ["p3"], q[:1], [{"category": "shirt"}])
    store.delete("a", ["p4", "p5"])
    store.close()  # the last store of the file: Milvus Lite lets it go, the next one reads it back
    g[3] = q[0]
    reopened = open_store(uri, "gallery")
    assert reopened.fingerprint == {"family": "X", "checkpoint": "sha256:1"} and reopened.dim == 16
    assert reopened.datasets() == ["a", "b"] and (reopened.count("a"), reopened.count("b")) == (148, 50)
    kept = [i for i in range(150) if i not in (4, 5)]
    assert_same_hits(reopened.search(q, 10, dataset="a"), brute_force(q, g[kept], [ids[i] for i in kept], 10))
    assert reopened.search(q[:1], 1, dataset="a", where={"category": "shirt"})[0][0][0] == "p3"
    reopened.close()


# The writer loads the retrieval folder alone: the lightning_modules package's __init__ imports every
# model family (over 10 s on two busy cores), and the store needs two files of it.
CHILD = """
import sys, types
import numpy as np
retrieval = types.ModuleType("retrieval")
retrieval.__path__ = [sys.argv[2]]
sys.modules["retrieval"] = retrieval
from retrieval.milvus import MilvusGallery
x = np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
store = MilvusGallery(sys.argv[1], "killed")
store.upsert("a", [f"p{i}" for i in range(300)], x)  # flushed (over LITE_FLUSH_ROWS); the rest is in the log
store.delete("a", ["p0"])
store.upsert("a", ["p1"], x[2:3])
print("acknowledged", flush=True)
sys.stdin.read()  # alive until killed
"""


def test_a_writer_killed_right_after_its_acknowledgement_loses_nothing(tmp_path: Path, db: str) -> None:
    uri = str(tmp_path / "killed.db")
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(ROOT / "lightning_modules/retrieval")],
                             stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "acknowledged"
        with pytest.raises(ConnectionError, match="one process at a time") as refused:
            open_store(uri, "killed")  # Milvus Lite's lock: the writer still holds the file
        assert "\n" not in str(refused.value)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    x = np.random.default_rng(3).standard_normal((300, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = open_store(uri, "killed")
    assert store.count("a") == 299
    hits = store.search(x[2:3], 3, dataset="a")[0]
    assert {pid for pid, _ in hits[:2]} == {"p1", "p2"} and hits[0][1] == pytest.approx(hits[1][1], rel=1e-5)
    assert "p0" not in {pid for pid, _ in store.search(x[:1], 299, dataset="a")[0]}
    store.close()


def brute_maxsim(q: np.ndarray, views: dict[str, np.ndarray], k: int) -> list[list[tuple[str, float]]]:
    """Reference: ``search.maxsim`` over NaN-padded [products, V, D] tensors."""
    names = sorted(views)
    width = max(len(v) for v in views.values())
    g = torch.full((len(names), width, q.shape[-1]), torch.nan)
    for n, name in enumerate(names):
        g[n, : len(views[name])] = torch.from_numpy(views[name])
    qt = torch.from_numpy(q if q.ndim == 3 else q[:, None]).clone()
    qt[~qt.any(-1)] = torch.nan
    scores = maxsim(qt, g).numpy()
    return [[(names[j], float(row[j])) for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def test_maxsim_over_view_rows_equals_brute_force_maxsim(db: str) -> None:
    rng = np.random.default_rng(4)
    n, width, dim = 120, 4, 16
    g = unit(rng, n, width, dim)
    absent = rng.random((n, width)) < 0.35
    absent[absent.all(1), 0] = False  # every product keeps a view
    g[absent] = 0.0
    ids = [f"m{i}" for i in range(n)]
    store = open_store(db, "maxsim", multi_vector=True)
    store.upsert("a", ids, g)
    # Fewer views now than before: the old rows must go. Views 0 and 2 of m0, only view 3 of m1.
    g[0] = 0.0
    g[0, [0, 2]] = unit(rng, 2, dim)
    g[1] = 0.0
    g[1, 3] = unit(rng, dim)
    store.upsert("a", ids[:2], g[:2])
    views = {pid: g[i][g[i].any(-1)] for i, pid in enumerate(ids)}
    q1 = unit(rng, 10, dim)
    q3 = unit(rng, 10, 3, dim)
    q3[::4, 1] = 0.0  # a query view left out
    assert store.count("a") == n
    assert_same_hits(store.search(q1, 10, dataset="a"), brute_maxsim(q1, views, 10))
    assert_same_hits(store.search(q3, 10, dataset="a"), brute_maxsim(q3, views, 10))
    assert store.delete("a", ["m0", "m5", "absent"]) == 2 and store.count("a") == n - 2
    del views["m0"], views["m5"]
    assert_same_hits(store.search(q3, 10, dataset="a"), brute_maxsim(q3, views, 10))
    # Near-duplicate views: the first k * CANDIDATE_FACTOR rows name only k / 2 products, so the
    # list must be widened to find k.
    base = unit(rng, 30, 1, dim)
    dup = base + 0.01 * rng.standard_normal((30, 8, dim)).astype(np.float32)
    dup /= np.linalg.norm(dup, axis=-1, keepdims=True)
    store.upsert("dup", [f"d{i}" for i in range(30)], dup)
    q = base[:3, 0]
    assert_same_hits(store.search(q, 10, dataset="dup"),
                     brute_maxsim(q, {f"d{i}": dup[i] for i in range(30)}, 10))
    store.close()


def test_a_dimension_model_or_kind_mismatch_is_refused_in_one_line(db: str) -> None:
    store = open_store(db, "fingerprinted", dim=8, fingerprint={"family": "A", "checkpoint": "sha256:1"})
    store.upsert("a", ["p"], np.eye(8, dtype=np.float32)[:1])
    store.close()
    refusals = {
        "holds 8-dim vectors but this model gives 16-dim": {"dim": 16},
        "checkpoint 'sha256:1' \\(store\\) vs 'sha256:2' \\(this model\\)":
            {"fingerprint": {"family": "A", "checkpoint": "sha256:2"}},
        "is a single-vector store, asked for multi-vector": {"multi_vector": True},
    }
    for message, options in refusals.items():
        with pytest.raises(ValueError, match=message) as refused:
            open_store(db, "fingerprinted", **options)
        assert "\n" not in str(refused.value)
    unrecorded = open_store(db, "unrecorded", dim=8)
    unrecorded.close()
    with pytest.raises(ValueError, match="records no model fingerprint"):
        open_store(db, "unrecorded", fingerprint={"family": "A"})
    store = open_store(db, "fingerprinted", fingerprint={"family": "A", "checkpoint": "sha256:1"})
    for bad in (lambda: store.search(np.ones((1, 16), np.float32), 1, dataset="a"),
                lambda: store.upsert("a", ["q"], np.ones((1, 16), np.float32)),
                lambda: store.upsert("a", ["q"], np.ones((1, 2, 8), np.float32)),
                lambda: store.upsert("a", ["q"], np.ones((1, 8), np.float32), [{"colour": "red"}])):
        with pytest.raises(ValueError) as refused:
            bad()
        assert "\n" not in str(refused.value)
    assert store.count("a") == 1
    store.close()


@pytest.mark.parametrize("multi_vector", [False, True], ids=["single", "multi"])
def test_ids_and_categories_with_quotes_and_backslashes_round_trip(db: str, multi_vector: bool) -> None:
    awkward = ['say "hi"', "back\\slash", "it's", 'tail\\', '"', "new\nline\ttab", "ünï 🧥",
               'x" or product_id != "', "x\\\" or dataset != \\\"a"]
    rng = np.random.default_rng(5)
    g = unit(rng, len(awkward) + 1, 8)
    ids = [*awkward, "x"]
    store = open_store(db, f"quoting_{multi_vector}", multi_vector=multi_vector)
    store.upsert("a\"b\\", ids, g, [{"category": c} for c in [*awkward, "plain"]])
    assert store.datasets() == ["a\"b\\"]
    for i, pid in enumerate(ids):
        assert store.search(g[i : i + 1], 1)[0][0][0] == pid
        category = awkward[i] if i < len(awkward) else "plain"
        assert [h[0] for h in store.search(g[:1], 10, where={"category": category})[0]] == [pid]
    assert store.delete("a\"b\\", ['x" or product_id != "']) == 1  # that id only, not an injected filter
    assert store.count("a\"b\\") == len(ids) - 1
    assert {h[0] for h in store.search(g[:1], 20)[0]} == set(ids) - {'x" or product_id != "'}
    store.close()
