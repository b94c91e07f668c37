"""`cir serve` over a catalogue that changes while it runs: real `cir serve` processes on localhost
with the tiny CLIP4CIR demo. Writes need CIR_API_KEY and reads stay open; an added product is found
by a query of its own photo and a deleted one is gone, both checked against a brute-force ranking
computed here with the same model; a SIGKILLed server restarted on its index (a compaction done
in between) loses no acknowledged change; queries under concurrent writes; a Milvus Lite
collection written, killed and served again; and a folder of phone-like JPEGs through `cir index`
to `cir serve --index`: its photos shown, and an uploaded phone photo ranked exactly as the model
ranks its upright pixels. A fake store stands in for any other vector database, in process: the
service reaches a store through the protocol only."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from support.photos import ROTATED_CW, phone_jpeg
from support.ports import free_port
from support.servers import in_process_server, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/demos/clip4cir.yaml")
CIR = str(Path(sys.executable).parent / "cir")
KEY = "s3cret-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NOWHERE = ["--data.init_args.data_dir=/nonexistent/shards"]  # a catalogue index needs no experiment data


def data_args(folder: Path) -> list[str]:
    return [f"--data.init_args.data_dir={folder}", "--data.init_args.products=120",
            "--data.init_args.generator_seed=3", "--data.init_args.val_fraction=0.25",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=8"]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def start(args: list[str], log: Path, key: str | None) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CIR_API_KEY"} | {"OMP_NUM_THREADS": "1"}
    if key:
        env["CIR_API_KEY"] = key
    with log.open("a") as out:
        proc = subprocess.Popen([CIR, "serve", "--port", str(port), "--max-wait-ms", "20", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_healthy(server.url, proc, log)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


def search(url: str, text: str, dataset: str, k: int, photo: bytes | None = None, source_id: str | None = None
           ) -> tuple[int, Any]:
    fields = {"text": text, "dataset": dataset, "k": str(k)} | ({"source_id": source_id} if source_id else {})
    files = [("images", ("photo.jpg", photo))] if photo is not None else None
    r = requests.post(f"{url}/search", data=fields, files=files, timeout=120)
    return r.status_code, r.json()


def put(url: str, dataset: str, pid: str, photos: list[bytes], headers: Mapping[str, str] | None = AUTH,
        **fields: str) -> tuple[int, Any]:
    r = requests.post(f"{url}/products", data={"dataset": dataset, "product_id": pid, **fields},
                      files=[("images", (f"v{n}.jpg", p)) for n, p in enumerate(photos)], headers=headers, timeout=120)
    return r.status_code, r.json()


def delete(url: str, dataset: str, pid: str, headers: Mapping[str, str] | None = AUTH) -> tuple[int, Any]:
    r = requests.delete(f"{url}/products/{dataset}/{pid}", headers=headers, timeout=60)
    return r.status_code, r.json()


def listing(url: str, dataset: str) -> list[str]:
    return requests.get(f"{url}/products/{dataset}?limit=1000", timeout=30).json()["ids"]


def photo(seed: int, width: int = 320, height: int = 420) -> tuple[bytes, Image.Image]:
    """A phone photo stored sideways with its EXIF orientation, and its upright pixels."""
    return phone_jpeg(width, height, tag=ROTATED_CW, seed=seed)


@dataclass
class Setup:
    ckpt: Path
    index: Path
    data: Path
    folder: Path
    model: Any
    dm: Any
    gallery: dict[str, tuple[torch.Tensor, list[str]]]  # the val gallery, embedded here


@pytest.fixture(scope="module")
def setup(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from cir.models import encode_gallery, load_model_and_data
    from cir.search import main as search_main

    folder = tmp_path_factory.mktemp("serve-writes")
    model, dm = load_model_and_data([DEMO], None, data_args(small_data))
    torch.manual_seed(7)  # weights unlike the initialisation, as test_serve's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = folder / "model.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    search_main(["build", "--config", DEMO, "--ckpt", str(ckpt), "--out", str(folder / "index"), "--",
                 *data_args(small_data)])
    emb, ids, datasets = encode_gallery(model, dm, "val")
    gallery = {d: (emb[[i for i, x in enumerate(datasets) if x == d]], [i for i, x in zip(ids, datasets, strict=True)
                                                                        if x == d]) for d in sorted(set(datasets))}
    return Setup(ckpt, folder / "index", small_data, folder, model, dm, gallery)


def serve_copy(setup: Setup, name: str, key: str | None = KEY, options: Sequence[str] = ()) -> tuple[Server, Path]:
    index = setup.folder / name
    shutil.copytree(setup.index, index)
    args = ["--config", DEMO, "--ckpt", str(setup.ckpt), "--index", str(index), *options, "--",
            *data_args(setup.data)]
    return start(args, setup.folder / f"{name}.log", key), index


@pytest.fixture(scope="module")
def writable(setup: Setup) -> Iterator[Server]:
    server, _ = serve_copy(setup, "writable")
    yield server
    server.stop()


class Reference:
    """The ranking a query must get: the model run here, the val gallery embedded here, each change
    applied by hand; every product scored by a dot product."""

    def __init__(self, setup: Setup, dataset: str) -> None:
        emb, ids = setup.gallery[dataset]
        self.setup, self.products = setup, dict(zip(ids, emb, strict=True))

    @torch.no_grad()
    def target(self, upright: Image.Image) -> torch.Tensor:
        from lightning_modules.core import Products

        views = self.setup.dm.image_transform(upright)[None, None]
        return self.setup.model.encode_target(Products(views, torch.ones(1, 1, dtype=torch.bool))).float()[0]

    @torch.no_grad()
    def query(self, upright: Image.Image, text: str) -> torch.Tensor:
        batch = {"source_images": self.setup.dm.image_transform(upright)[None, None], "text": [text],
                 "source_mask": torch.ones(1, 1, dtype=torch.bool), "source_caption": [""]}
        return self.setup.model.encode_query(batch).float()[0]

    def ranking(self, upright: Image.Image, text: str) -> list[tuple[str, float]]:
        q = self.query(upright, text)
        scored = [(pid, float(v @ q)) for pid, v in self.products.items()]
        return sorted(scored, key=lambda x: -x[1])


def assert_ranked_as(results: list[dict[str, Any]], expected: list[tuple[str, float]]) -> None:
    assert [r["id"] for r in results] == [pid for pid, _ in expected]
    assert [r["score"] for r in results] == pytest.approx([s for _, s in expected], abs=1e-4)


def test_device_cuda_without_cuda_is_refused_in_one_line() -> None:
    from cir.serve.command import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as stopped:  # before the model is built: it would take seconds to minutes
        main(["--config", DEMO, "--untrained", "--device", "cuda"])
    message = str(stopped.value.code)
    assert len(message.splitlines()) == 1 and message.startswith("cir serve: --device cuda: ")
    assert "--device cpu" in message


def test_the_precision_is_bf16_on_a_gpu_only_where_the_experiment_allows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from cir.serve.device import dtype_of, trainer_precision

    model = torch.nn.Linear(2, 2)
    assert trainer_precision([str(ROOT / "experiments/baselines/gme_2b_joint.yaml")], []) == "bf16-mixed"
    assert trainer_precision([DEMO], []) == ""
    assert trainer_precision([DEMO], ["--trainer.precision=bf16-mixed"]) == "bf16-mixed"
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert dtype_of("auto", cpu, model, "bf16-mixed", "p") == torch.float32  # the CPU computes in float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_: True)
    assert dtype_of("auto", gpu, model, "bf16-mixed", "p") == torch.bfloat16
    assert dtype_of("auto", gpu, model, "32-true", "p") == torch.float32
    assert dtype_of("auto", gpu, model.to(torch.bfloat16), "", "p") == torch.bfloat16  # a backbone loaded in bf16
    assert dtype_of("float32", gpu, model, "bf16-mixed", "p") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_: False)
    assert dtype_of("auto", gpu, model, "bf16-mixed", "p") == torch.float32
    with pytest.raises(SystemExit, match="no bf16 support"):
        dtype_of("bfloat16", gpu, model, "", "p")


@pytest.mark.slow
def test_writes_need_the_key_and_reads_stay_open(writable: Server) -> None:
    url = writable.url
    data, _ = photo(1)
    for headers in (None, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": KEY},
                    {"X-API-Key": KEY[:-1]}):
        status, body = put(url, "synth_street", "x1", [data], headers=headers)
        assert status == 401 and "API key" in body["error"], (headers, body)
        assert delete(url, "synth_street", listing(url, "synth_street")[0], headers=headers)[0] == 401
    # Refused before the body is read: a huge announced upload without the key is a 401, not a 413.
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20) as s:
        s.sendall(b"POST /products HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n")
        assert s.recv(100).split(b" ")[1] == b"401"
    assert put(url, "synth_street", "x1", [data], headers={"X-API-Key": KEY})[0] == 201  # either header works
    assert delete(url, "synth_street", "x1", headers={"Authorization": f"bearer {KEY}"})[0] == 200
    health = requests.get(f"{url}/health", timeout=30).json()
    assert health["writes"] == "on" and health["store"] == "MutableGallery"
    assert (health["device"], health["dtype"]) == ("cpu", "float32")
    pid = listing(url, "synth_street")[0]
    assert search(url, "make it red", "synth_street", 3, source_id=pid)[0] == 200  # reads need no key
    assert requests.get(f"{url}/products/synth_street/{pid}", timeout=30).status_code == 200


@pytest.mark.slow
def test_an_added_product_is_found_by_its_own_photo_and_a_deleted_one_is_gone(writable: Server,
                                                                                setup: Setup) -> None:
    url, ds, text = writable.url, "synth_street", "make it red with long sleeves"
    ref = Reference(setup, ds)
    data, upright = photo(2)
    status, body = put(url, ds, "shop/new 1", [data], category="dress", title="A new dress")
    assert status == 201 and body["created"] and body["gallery_size"] == len(ref.products) + 1
    ref.products["shop/new 1"] = ref.target(upright)  # embedded upright (EXIF applied), as cir index does
    k = len(ref.products)
    status, got = search(url, text, ds, k, photo=data)
    assert status == 200 and "shop/new 1" in [r["id"] for r in got["results"]]
    assert_ranked_as(got["results"], ref.ranking(upright, text))
    # Its photos are shown and can be its source; it is listed with its metadata.
    meta = requests.get(f"{url}/products/{ds}/shop/new 1", timeout=30).json()
    assert (meta["uploaded"], meta["category"], meta["title"], meta["views"]) == (True, "dress", "A new dress", 1)
    assert requests.get(url + meta["images"][0], timeout=30).content == data
    _, by_id = search(url, text, ds, k, source_id="shop/new 1")
    assert_ranked_as(by_id["results"], ref.ranking(upright, text))
    assert "shop/new 1" in listing(url, ds)

    # A base product replaced by new photos: same id, the new vector.
    base_id = setup.gallery[ds][1][0]
    other, other_upright = photo(3, 400, 300)
    status, body = put(url, ds, base_id, [other])
    assert status == 200 and not body["created"]
    ref.products[base_id] = ref.target(other_upright)
    assert requests.get(f"{url}/images/{ds}/0/{base_id}", timeout=30).content == other
    assert_ranked_as(search(url, text, ds, k, photo=other)[1]["results"], ref.ranking(other_upright, text))

    # Deleted: gone from the ranking, the listing and the routes.
    assert delete(url, ds, "shop/new 1") == (200, {"dataset": ds, "id": "shop/new 1", "deleted": True})
    del ref.products["shop/new 1"]
    _, after = search(url, text, ds, k, photo=data)
    assert "shop/new 1" not in [r["id"] for r in after["results"]]
    assert_ranked_as(after["results"], ref.ranking(upright, text)[:k])
    assert requests.get(f"{url}/products/{ds}/shop/new 1", timeout=30).status_code == 404
    assert requests.get(f"{url}/images/{ds}/0/shop/new 1", timeout=30).status_code == 404
    status, body = delete(url, ds, "shop/new 1")
    assert status == 404 and "no product 'shop/new 1'" in body["error"]
    # Bad writes are refused in one line and change nothing.
    for fields, files, words in [({"product_id": " padded"}, [data], "leading or trailing"),
                                 ({"product_id": "ok", "dataset": "no/such"}, [data], "new dataset's name"),
                                 ({"product_id": "ok"}, [b"not a picture"], "is not an image")]:
        r = requests.post(f"{url}/products", data={"dataset": ds, **fields},
                          files=[("images", ("v.jpg", f)) for f in files], headers=AUTH, timeout=60)
        assert r.status_code in (400, 415) and words in r.json()["error"], r.json()
    assert sorted(listing(url, ds)) == sorted(ref.products)


@pytest.mark.slow
def test_a_killed_server_restarted_on_its_index_loses_no_acknowledged_change(setup: Setup) -> None:
    from lightning_modules.retrieval.mutable import base_id

    server, index = serve_copy(setup, "killed", options=["--compact-after", "3"])  # a compaction on the way
    first_base = base_id(index)
    ds, text = "synth_studio", "in a darker shade"
    expected = set(setup.gallery[ds][1])
    added: dict[str, tuple[bytes, list[tuple[str, float]]]] = {}
    try:
        for n in range(4):
            data, _ = photo(10 + n, 300 + 20 * n, 400)
            assert put(server.url, ds, f"new-{n}", [data])[0] == 201
            expected.add(f"new-{n}")
        for pid in ("new-1", setup.gallery[ds][1][2]):
            assert delete(server.url, ds, pid)[0] == 200
            expected.discard(pid)
        replaced, _ = photo(20)
        assert put(server.url, ds, "new-3", [replaced])[0] == 200  # the last change: a replacement
        deadline = time.monotonic() + 60  # 7 changes: the first compaction is done once fewer are pending
        while requests.get(f"{server.url}/health", timeout=30).json()["changes_not_compacted"] >= 7:
            assert time.monotonic() < deadline, "no compaction within 60 s"
            time.sleep(0.1)
        for pid in ("new-0", "new-2", "new-3"):
            data = replaced if pid == "new-3" else photo(10 + int(pid[-1]), 300 + 20 * int(pid[-1]), 400)[0]
            added[pid] = (data, [(r["id"], r["score"]) for r in search(server.url, text, ds, 5, photo=data)[1]
                                 ["results"]])
    finally:
        server.stop(signal.SIGKILL)  # no shutdown: what is on disk is all there is
    assert server.proc.returncode == -signal.SIGKILL
    assert base_id(index) != first_base  # changes before and after a compaction, killed after both
    again = start(["--config", DEMO, "--ckpt", str(setup.ckpt), "--index", str(index), "--",
                   *data_args(setup.data)], setup.folder / "killed-again.log", KEY)
    try:
        assert set(listing(again.url, ds)) == expected
        for pid, (data, before) in added.items():
            assert requests.get(f"{again.url}/images/{ds}/0/{pid}", timeout=30).content == data
            got = [(r["id"], r["score"]) for r in search(again.url, text, ds, 5, photo=data)[1]["results"]]
            assert [i for i, _ in got] == [i for i, _ in before]
            assert [s for _, s in got] == pytest.approx([s for _, s in before], abs=1e-6)  # the same vectors
        assert requests.get(f"{again.url}/products/{ds}/new-1", timeout=30).status_code == 404
    finally:
        again.stop()


@pytest.mark.slow
def test_queries_under_concurrent_writes_never_fail_and_keep_every_change(writable: Server) -> None:
    url, ds = writable.url, "synth_studio"
    sources = listing(url, ds)[:6]
    expected = set(listing(url, ds))
    photos = [photo(100 + n, 280 + 16 * n, 360)[0] for n in range(16)]
    latencies: list[float] = []
    statuses: list[int] = []
    writing = threading.Event()
    writing.set()
    deadline = time.monotonic() + 45

    def reader(n: int) -> None:
        i = 0
        while writing.is_set() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            status, _ = search(url, "make it blue", ds, 10, source_id=sources[(n + i) % len(sources)])
            latencies.append(time.perf_counter() - t0)
            statuses.append(status)
            i += 1

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    writes: list[int] = []
    try:
        for n, data in enumerate(photos):  # 16 adds, 8 deletes, 4 replacements: 28 changes
            writes.append(put(url, ds, f"load-{n}", [data])[0])
            expected.add(f"load-{n}")
            if n % 2:
                writes.append(delete(url, ds, f"load-{n - 1}")[0])
                expected.discard(f"load-{n - 1}")
            if n % 4 == 3:
                writes.append(put(url, ds, f"load-{n}", [photos[0]])[0])
    finally:
        writing.clear()
        for t in threads:
            t.join()
    assert all(s in (200, 201) for s in writes), writes
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    assert set(listing(url, ds)) == expected
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    print(f"\n{len(latencies)} queries from 8 threads during {len(writes)} writes: p50 "
          f"{1000 * statistics.median(latencies):.1f} ms, p99 {1000 * q[98]:.1f} ms")


@pytest.mark.slow
def test_a_catalogue_of_phone_photos_is_indexed_and_served_with_its_photos(tmp_path: Path) -> None:
    from cir.models import load_with_fingerprint
    from datamodules.synthetic import generate
    from datamodules.synthetic.catalogue import write_catalogue_layout
    from lightning_modules.core import Products
    from lightning_modules.retrieval import GalleryIndex

    shop = tmp_path / "shop"
    write_catalogue_layout(shop, generate(10, seed=4), seed=4)
    images = shop / "images"
    first = sorted(images.rglob("*.jpg"))[0]
    (images / "big" / "x7").mkdir(parents=True)  # a studio shot 7x the size
    with Image.open(first) as img:
        img.resize((img.width * 7, img.height * 7)).save(images / "big" / "x7" / "00_front.jpg", quality=90)
    stored, upright = photo(5, 300, 500)
    (images / "phone" / "sideways").mkdir(parents=True)
    (images / "phone" / "sideways" / "00_front.jpg").write_bytes(stored)
    truncated = first.read_bytes()[: len(first.read_bytes()) // 2]
    (images / "broken" / "half").mkdir(parents=True)
    (images / "broken" / "half" / "00_front.jpg").write_bytes(truncated)  # its only view: left out
    (images / "broken" / "partly").mkdir(parents=True)
    shutil.copy(first, images / "broken" / "partly" / "00_front.jpg")
    (images / "broken" / "partly" / "01_back.jpg").write_bytes(truncated)
    index = tmp_path / "index"
    done = subprocess.run([CIR, "index", "--config", DEMO, "--untrained", "--catalogue", str(shop), "--out",
                           str(index), "--", *NOWHERE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    server = start(["--config", DEMO, "--untrained", "--index", str(index), "--", *NOWHERE], tmp_path / "serve.log",
                   key=None)
    try:
        url = server.url
        ds = "catalogue"  # products.jsonl names no dataset for the ones added by hand
        assert {"big/x7", "phone/sideways", "broken/partly"} <= set(listing(url, ds))
        assert "broken/half" not in listing(url, ds)
        assert requests.get(f"{url}/images/{ds}/0/phone/sideways", timeout=30).content == stored
        assert requests.get(f"{url}/products/{ds}/broken/partly", timeout=30).json()["views"] == 1
        assert requests.get(f"{url}/products/{ds}/broken/half", timeout=30).status_code == 404
        # The reference: the same untrained model here; the query from the upright pixels (turned by
        # hand), the gallery as cir index stored it, whose rotated product must embed as its upright pixels.
        model, dm, _ = load_with_fingerprint([DEMO], None, NOWHERE, needs_data=False)
        index_ds = GalleryIndex.load(index)
        ids = index_ds.ids[ds]
        stored_vectors = torch.from_numpy(index_ds.indexes[ds].reconstruct_n(0, len(ids)))
        with torch.no_grad():
            own = model.encode_target(Products(dm.image_transform(upright)[None, None],
                                               torch.ones(1, 1, dtype=torch.bool))).float()[0]
            q = model.encode_query({"source_images": dm.image_transform(upright)[None, None], "text": ["make it red"],
                                    "source_mask": torch.ones(1, 1, dtype=torch.bool), "source_caption": [""]})[0]
        assert torch.allclose(stored_vectors[ids.index("phone/sideways")], own, atol=1e-5)
        scores = stored_vectors @ q.float()
        expected = [(ids[i], float(scores[i])) for i in scores.argsort(descending=True).tolist()]
        status, got = search(url, "make it red", ds, len(ids), photo=stored)
        assert status == 200
        assert_ranked_as(got["results"], expected)
        _, by_id = search(url, "make it red", ds, len(ids), source_id="phone/sideways")  # its catalogue photo
        assert_ranked_as(by_id["results"], expected)
        sideways = io.BytesIO()
        Image.open(io.BytesIO(stored)).save(sideways, "PNG")  # the same pixels, no orientation: lies on its side
        _, turned = search(url, "make it red", ds, len(ids), photo=sideways.getvalue())
        assert [r["score"] for r in turned["results"]] != pytest.approx([s for _, s in expected], abs=1e-4)
        # No key on this server: writes are off, reads open.
        status, body = put(url, ds, "x", [stored], headers={"Authorization": f"Bearer {KEY}"})
        assert status == 403 and "CIR_API_KEY" in body["error"]
        assert delete(url, ds, "phone/sideways")[0] == 403
        assert requests.get(f"{url}/health", timeout=30).json()["writes"].startswith("writes are off")
    finally:
        server.stop()


@pytest.mark.slow
def test_a_milvus_collection_is_served_written_and_survives_a_kill(setup: Setup, tmp_path: Path) -> None:
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    shop = tmp_path / "shop"
    (shop / "images").mkdir(parents=True)  # no catalogue photos: the products are the ones written here
    args = ["--config", DEMO, "--ckpt", str(setup.ckpt), "--milvus", str(tmp_path / "shop.db"), "--catalogue",
            str(shop), "--uploads", str(tmp_path / "uploads"), "--", *NOWHERE]
    server = start(args, tmp_path / "milvus.log", KEY)
    ds, text = "shop", "make it green"
    ref = Reference(setup, "synth_street")
    ref.products.clear()
    photos = {f"m-{n}": photo(50 + n, 300 + 30 * n, 420) for n in range(3)}
    try:
        assert requests.get(f"{server.url}/health", timeout=30).json()["store"] == "MilvusGallery"
        for pid, (data, upright) in photos.items():
            assert put(server.url, ds, pid, [data], category="top")[0] == 201
            ref.products[pid] = ref.target(upright)
        assert delete(server.url, ds, "m-1")[0] == 200
        del ref.products["m-1"]
    finally:
        server.stop(signal.SIGKILL)
    again = start(args, tmp_path / "milvus-again.log", KEY)
    try:
        assert sorted(listing(again.url, ds)) == ["m-0", "m-2"]
        for pid in ("m-0", "m-2"):
            data, upright = photos[pid]
            _, got = search(again.url, text, ds, 3, photo=data)
            assert_ranked_as(got["results"], ref.ranking(upright, text))
        assert requests.get(f"{again.url}/images/{ds}/0/m-1", timeout=30).status_code == 404
    finally:
        again.stop()


class FakeStore:
    """A WritableStore as a vector database offers it: no listing of its ids, brute-force search."""

    def __init__(self, fingerprint: dict[str, str] | None = None) -> None:
        self.fingerprint = fingerprint
        self.rows: dict[tuple[str, str], np.ndarray] = {}
        self.calls: list[tuple[str, str, list[str]]] = []

    def datasets(self) -> list[str]:
        return sorted({d for d, _ in self.rows})

    def count(self, dataset: str) -> int:
        return sum(1 for d, _ in self.rows if d == dataset)

    def search(self, queries: Any, k: int, dataset: str | None = None,
               where: Mapping[str, str] | None = None) -> list[list[tuple[str, float]]]:
        keys = [key for key in self.rows if key[0] == dataset]
        if not keys:
            raise KeyError(dataset)
        m = np.stack([self.rows[key] for key in keys])
        out = []
        for q in np.asarray(queries, dtype=np.float32):
            s = m @ q
            out.append([(keys[i][1], float(s[i])) for i in np.argsort(-s, kind="stable")[:k]])
        return out

    def upsert(self, dataset: str, ids: Sequence[str], vectors: Any,
               meta: Sequence[Mapping[str, str]] | None = None) -> None:
        self.calls.append(("upsert", dataset, list(ids)))
        for pid, v in zip(ids, np.asarray(vectors, dtype=np.float32), strict=True):
            self.rows[(dataset, pid)] = v

    def delete(self, dataset: str, ids: Sequence[str]) -> int:
        self.calls.append(("delete", dataset, list(ids)))
        return sum(self.rows.pop((dataset, pid), None) is not None for pid in ids)


@pytest.mark.slow
def test_a_store_reached_only_through_the_protocol_takes_writes(setup: Setup, tmp_path: Path) -> None:
    from cir.serve.engine import SearchEngine
    from cir.serve.gallery import GalleryStore
    from cir.serve.products import Products
    from cir.serve.uploads import UploadStore
    from lightning_modules.retrieval.store import WritableStore

    ds = "synth_street"
    store = FakeStore()
    emb, ids = setup.gallery[ds]
    store.upsert(ds, ids, emb)
    assert isinstance(store, WritableStore)
    uploads = UploadStore(tmp_path / "uploads")
    products = Products(store, GalleryStore(setup.data, "val", setup.dm.captions), uploads)
    engine = SearchEngine(setup.model, setup.dm, "val", store, products=products)
    ref = Reference(setup, ds)
    data, upright = photo(30)
    with in_process_server(engine, api_key=KEY, uploads=uploads) as url:
        assert put(url, ds, "fake-1", [data])[0] == 201
        ref.products["fake-1"] = ref.target(upright)
        assert store.calls[-1] == ("upsert", ds, ["fake-1"])
        assert torch.allclose(torch.from_numpy(store.rows[(ds, "fake-1")]), ref.products["fake-1"], atol=1e-5)
        _, got = search(url, "add a stripe", ds, len(ref.products), photo=data)
        assert_ranked_as(got["results"], ref.ranking(upright, "add a stripe"))
        assert "fake-1" in listing(url, ds)  # listed from the photos, as the store lists nothing
        assert delete(url, ds, "fake-1")[0] == 200 and (ds, "fake-1") not in store.rows
        assert "fake-1" not in listing(url, ds) and not list((tmp_path / "uploads").iterdir())


def test_uploaded_photos_are_whole_or_absent_after_a_kill(tmp_path: Path) -> None:
    from cir.serve.uploads import CURRENT, UploadStore

    store = UploadStore(tmp_path / "up")
    first, _ = photo(40)
    second, _ = photo(41)
    assert store.save("d", "a/../b", [(first, "jpg")], "dress", "") is None
    previous = store.save("d", "a/../b", [(second, "jpg"), (first, "jpg")])
    assert previous is not None and store.view_image("d", "a/../b", 1) == (first, "image/jpeg")
    folder = store.folder("d", "a/../b")
    assert folder.parent == tmp_path / "up"  # the id never became a path
    # A save killed before its pointer moved: a version nothing points at, and a product never pointed at.
    (folder / "deadbeef0000").mkdir()
    (tmp_path / "up" / ("0" * 32)).mkdir()
    reopened = UploadStore(tmp_path / "up")
    assert reopened.view_image("d", "a/../b", 0) == (second, "image/jpeg")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CURRENT, reopened.get("d", "a/../b").version])
    assert not (tmp_path / "up" / ("0" * 32)).exists()
    reopened.restore("d", "a/../b", previous)  # the store's write failed: back to the photos before
    assert reopened.describe("d", "a/../b")["views"] == 1 and reopened.describe("d", "a/../b")["category"] == "dress"
    assert reopened.forget_unless(lambda d, pid: False) == 1 and not reopened.has("d", "a/../b")
    assert not folder.exists()
