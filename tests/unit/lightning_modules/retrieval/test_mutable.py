"""MutableGallery: a saved index plus a change log, checked against a brute-force search over the
same final set of products, across reloads, a kill mid-record, and kills around compaction."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import lightning_modules.retrieval.mutable as mutable
from lightning_modules.retrieval import GalleryIndex
from lightning_modules.retrieval.mutable import LOG, MutableGallery, read_log
from lightning_modules.retrieval.store import WritableStore

DIM = 16
FINGERPRINT = {"family": "Test", "checkpoint": "sha256:0"}


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Reference:
    """The products a store should hold, searched by brute force."""

    def __init__(self) -> None:
        self.products: dict[tuple[str, str], np.ndarray] = {}

    def upsert(self, dataset: str, ids: list[str], vectors: np.ndarray) -> None:
        self.products.update({(dataset, i): v for i, v in zip(ids, vectors, strict=True)})

    def delete(self, dataset: str, ids: list[str]) -> int:
        return sum(self.products.pop((dataset, i), None) is not None for i in ids)

    def search(self, q: np.ndarray, k: int, dataset: str) -> list[list[str]]:
        ids = [i for d, i in self.products if d == dataset]
        m = np.stack([self.products[(dataset, i)] for i in ids])
        scores = q @ m.T
        return [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def base_folder(tmp_path: Path, rng: np.random.Generator, kind: str = "flat") -> tuple[Path, Reference]:
    ref = Reference()
    ids = [f"p{i}" for i in range(60)]
    datasets = ["a" if i % 3 else "b" for i in range(60)]
    vectors = unit(rng, 60)
    GalleryIndex.build(vectors, ids, datasets, kind=kind, fingerprint=FINGERPRINT).save(tmp_path / "idx")
    for d in ("a", "b"):
        rows = [n for n, x in enumerate(datasets) if x == d]
        ref.upsert(d, [ids[n] for n in rows], vectors[rows])
    return tmp_path / "idx", ref


def random_changes(store: MutableGallery, ref: Reference, rng: np.random.Generator, n: int) -> None:
    """Adds, replacements of base and added products, deletes of both, some of them batched."""
    for step in range(n):
        dataset = "a" if rng.random() < 0.7 else "b"
        known = [i for d, i in ref.products if d == dataset]
        choice = rng.random()
        if choice < 0.45:
            ids = [f"new{step}-{j}" for j in range(int(rng.integers(1, 4)))]
        elif choice < 0.7:
            ids = list(rng.choice(known, size=min(2, len(known)), replace=False))
        else:
            ids = list(rng.choice(known, size=1)) + ["never-there"]
            assert store.delete(dataset, ids) == ref.delete(dataset, ids)
            continue
        vectors = unit(rng, len(ids))
        store.upsert(dataset, ids, vectors, [{"category": "dress" if j % 2 else "top"} for j in range(len(ids))])
        ref.upsert(dataset, ids, vectors)


def assert_same(store: MutableGallery, ref: Reference, rng: np.random.Generator, k: int = 10) -> None:
    q = unit(rng, 12)
    for dataset in ("a", "b"):
        got = store.search(q, k, dataset=dataset)
        assert [[pid for pid, _ in row] for row in got] == ref.search(q, k, dataset)
        assert all(len(row) == k for row in got)  # hidden base products never leave a row short
        assert sorted(store.ids(dataset)) == sorted(i for d, i in ref.products if d == dataset)
        assert store.count(dataset) == sum(1 for d, _ in ref.products if d == dataset)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_changes_match_brute_force_before_and_after_reload_and_compaction(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    folder, ref = base_folder(tmp_path, rng, kind)
    store = MutableGallery.open(folder)
    assert isinstance(store, WritableStore) and store.fingerprint == FINGERPRINT
    random_changes(store, ref, rng, 80)
    assert_same(store, ref, rng)
    store.close()
    reloaded = MutableGallery.open(folder)  # the log replayed on the saved base
    assert reloaded.pending == store.pending > 0
    assert_same(reloaded, ref, rng)
    reloaded.compact()
    assert reloaded.pending == 0 and len(read_log(folder / LOG)[0]) == 1  # a header, nothing else
    assert_same(reloaded, ref, rng)
    random_changes(reloaded, ref, rng, 20)  # and the log goes on after a compaction
    reloaded.close()
    again = MutableGallery.open(folder)
    assert_same(again, ref, rng)
    assert GalleryIndex.load(folder).kind == kind


def test_where_filters_on_metadata_kept_through_compaction(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder, _ = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    vectors = unit(rng, 4)
    store.upsert("a", ["d1", "d2", "t1", "plain"], vectors, [{"category": "dress"}, {"category": "dress"},
                                                             {"category": "top"}, {}])
    q = vectors[:1] + 0.01
    for _ in range(2):  # as written, then compacted and reopened
        got = store.search(q, 10, dataset="a", where={"category": "dress"})
        assert sorted(pid for pid, _ in got[0]) == ["d1", "d2"]
        assert store.meta("a", "t1") == {"category": "top"} and store.meta("a", "plain") == {}
        store.compact()
        store.close()
        store = MutableGallery.open(folder)


def test_a_kill_mid_record_drops_that_record_and_keeps_every_earlier_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder, ref = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    random_changes(store, ref, rng, 30)
    kept = (folder / LOG).stat().st_size
    last = unit(rng, 1)
    store.upsert("a", ["torn"], last)
    store.close()
    full = (folder / LOG).read_bytes()
    for cut in (kept + 3, kept + 20, len(full) - 1):  # inside the frame, the JSON, the vector bytes
        (folder / LOG).write_bytes(full[:cut])
        reopened = MutableGallery.open(folder)
        assert not reopened.contains("a", "torn") and any("torn last record" in n for n in reopened.notes)
        assert (folder / LOG).stat().st_size == kept  # cut back, so the next record follows whole ones
        assert_same(reopened, ref, rng)
        reopened.upsert("b", ["after"], last)
        reopened.close()
        after = MutableGallery.open(folder)
        assert after.contains("b", "after") and not after.notes
        after.delete("b", ["after"])
        after.close()
        (folder / LOG).write_bytes(full)


def test_damage_before_the_last_record_is_refused_not_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    folder, ref = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    random_changes(store, ref, rng, 5)
    store.close()
    data = bytearray((folder / LOG).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / LOG).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged record at byte"):
        MutableGallery.open(folder)


@pytest.mark.parametrize("killed_after", ["marker", "save"])
def test_a_compaction_killed_midway_loses_and_duplicates_nothing(tmp_path: Path, killed_after: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    folder, ref = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    random_changes(store, ref, rng, 25)

    def killed(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # as a kill: nothing after this runs

    if killed_after == "marker":  # before the new base is whole: the old base and its log stand
        monkeypatch.setattr(mutable.GalleryIndex, "save", killed)
    else:  # the new base saved, the log not yet replaced: it names the old base
        monkeypatch.setattr(MutableGallery, "_write_header", killed)
    with pytest.raises(KeyboardInterrupt):
        store.compact()
    monkeypatch.undo()
    store.close()
    reopened = MutableGallery.open(folder)
    assert not reopened.notes  # a compaction's own leftovers are no news
    assert_same(reopened, ref, rng)
    assert reopened.pending == (0 if killed_after == "save" else store.pending)
    assert not list(folder.glob("changes-superseded-*"))


def test_a_log_of_a_base_rebuilt_by_other_means_is_set_aside(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder, ref = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    store.upsert("a", ["gone"], unit(rng, 1))
    store.close()
    GalleryIndex.load(folder).save(folder)  # a rebuild (cir index again): same products, new files
    reopened = MutableGallery.open(folder)
    assert not reopened.contains("a", "gone") and "not replayed" in reopened.notes[0]
    assert len(list(folder.glob("changes-superseded-*.log"))) == 1
    assert_same(reopened, ref, rng)


def test_concurrent_writers_and_readers_leave_a_consistent_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    folder, ref = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    vectors = {f"w{t}-{n}": unit(np.random.default_rng(100 * t + n), 1) for t in range(4) for n in range(15)}
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for n in range(15):
                store.upsert("a", [f"w{t}-{n}"], vectors[f"w{t}-{n}"])
                if n % 3 == 0:
                    store.delete("a", [f"w{t}-{n}"])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(40):
                assert all(len(r) == 5 for r in store.search(unit(np.random.default_rng(7), 3), 5, dataset="a"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)] + [threading.Thread(target=reader)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for name, v in vectors.items():
        if int(name.split("-")[1]) % 3:
            ref.upsert("a", [name], v)
    store.close()
    assert_same(MutableGallery.open(folder), ref, rng)


def test_bad_writes_are_refused_and_leave_nothing_in_the_log(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    folder, _ = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    with pytest.raises(ValueError, match="dimensions"):
        store.upsert("a", ["x"], np.ones((1, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        store.upsert("a", ["x"], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="one vector per product"):
        store.search(np.ones((1, 2, DIM), np.float32), 3, dataset="a")
    assert store.delete("a", ["nothing"]) == 0
    assert not (folder / LOG).exists()  # nothing written: a read-only serving leaves the folder as it was


def test_an_index_of_several_vectors_per_product_is_refused(tmp_path: Path) -> None:
    v = unit(np.random.default_rng(9), 12).reshape(4, 3, DIM)
    try:
        GalleryIndex.build(v, [f"p{i}" for i in range(4)], ["a"] * 4).save(tmp_path / "multi")
    except (ValueError, RuntimeError, AssertionError):
        pytest.skip("this GalleryIndex holds one vector per product")
    with pytest.raises(ValueError, match="several vectors per product"):
        MutableGallery.open(tmp_path / "multi")


def test_a_compaction_keeps_how_the_base_was_built(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    vectors, ids = unit(rng, 60), [f"p{i}" for i in range(60)]
    try:
        base = GalleryIndex.build(vectors, ids, ["a"] * 60, kind="ivf", fingerprint=FINGERPRINT, store_vectors=True,
                                  rerank=20)
    except TypeError:
        pytest.skip("this GalleryIndex keeps no vectors beside its index")
    base.save(tmp_path / "idx")
    ref = Reference()
    ref.upsert("a", ids, vectors)
    ref.upsert("b", ["b0", "b1", "b2"], unit(rng, 3))
    store = MutableGallery.open(tmp_path / "idx")
    store.upsert("b", ["b0", "b1", "b2"], np.stack([ref.products[("b", f"b{i}")] for i in range(3)]))
    random_changes(store, ref, rng, 30)
    store.compact()
    rebuilt = GalleryIndex.load(tmp_path / "idx")
    assert rebuilt.kind == "ivf" and set(rebuilt.stored) == {"a", "b"} and rebuilt.defaults.get("rerank") == 20
    store.close()
    assert_same(MutableGallery.open(tmp_path / "idx"), ref, rng, k=3)


def test_changes_after_a_compaction_that_could_not_start_a_new_log_survive_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new base is saved, then writing the new log fails (a full disk): writes go on into the
    old log, whose header names the old base. A restart must replay them, not set them aside."""
    rng = np.random.default_rng(7)
    folder, ref = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    random_changes(store, ref, rng, 10)
    real = MutableGallery._write_header
    failed = []

    def failing(self, meta):  # noqa: ANN001, ANN202
        if not failed:
            failed.append(True)
            raise OSError("no space left on device")
        return real(self, meta)

    monkeypatch.setattr(MutableGallery, "_write_header", failing)
    with pytest.raises(OSError):
        store.compact()
    monkeypatch.setattr(MutableGallery, "_write_header", real)
    random_changes(store, ref, rng, 12)  # acknowledged after the failed compaction
    store.close()
    again = MutableGallery.open(folder)
    q = unit(rng, 5)
    for dataset in ("a", "b"):
        assert [[i for i, _ in row] for row in again.search(q, 5, dataset)] == ref.search(q, 5, dataset)
    assert not list(folder.glob("changes-superseded-*"))


def test_a_zero_filled_tail_is_a_torn_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    folder, ref = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    random_changes(store, ref, rng, 6)
    store.close()
    with open(folder / LOG, "ab") as f:
        f.write(b"\0" * 4096)  # a power cut after the file grew, before its data reached the disk
    again = MutableGallery.open(folder)
    q = unit(rng, 4)
    assert [[i for i, _ in row] for row in again.search(q, 5, "a")] == ref.search(q, 5, "a")
    assert any("torn" in note for note in again.notes)


@pytest.mark.parametrize("state", ["torn", "compacted_old_log"])
def test_a_read_only_reader_sees_what_a_writer_would_and_writes_nothing(tmp_path: Path, state: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    folder, ref = base_folder(tmp_path, rng)
    store = MutableGallery.open(folder)
    random_changes(store, ref, rng, 20)
    if state == "torn":  # a record being appended as the reader opens the log
        store.upsert("a", ["in_flight"], unit(rng, 1))
        store.close()
        full = (folder / LOG).read_bytes()
        (folder / LOG).write_bytes(full[:-5])
    else:  # a compaction saved the new base, then died before replacing the log
        monkeypatch.setattr(MutableGallery, "_write_header", lambda *_, **__: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            store.compact()
        monkeypatch.undo()
        store.upsert("a", ["after"], unit(rng, 1))  # a write once it was over: in no base yet
        store.close()
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    reader = MutableGallery.open(folder, read_only=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # nothing written, nothing cut
    writer = MutableGallery.open(folder)  # what the writer makes of the same folder
    for dataset in writer.datasets():
        assert reader.ids(dataset) == writer.ids(dataset)
        q = unit(rng, 3)
        assert reader.search(q, 5, dataset) == writer.search(q, 5, dataset)
    assert not reader.contains("a", "in_flight")
    assert reader.contains("a", "after") == (state == "compacted_old_log")
    with pytest.raises(PermissionError, match="read-only"):
        reader.upsert("a", ["x"], unit(rng, 1))
    with pytest.raises(PermissionError, match="read-only"):
        reader.compact()
