"""`cir serve` over HTTP on localhost: a real `cir serve` process for CLIP4CIR (routes, equality
with `cir search query`, every refusal, batching of concurrent clients, the page in headless
Chromium), and in-process uvicorn servers for ProCIR (turn-1 cache) and LLaVA-caption CIR."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from PIL import Image
from support.ports import free_port
from support.servers import in_process_server, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"
CIR = str(Path(sys.executable).parent / "cir")


def data_args(folder: Path) -> list[str]:
    return [f"--data.init_args.data_dir={folder}", "--data.init_args.products=120",
            "--data.init_args.generator_seed=3", "--data.init_args.val_fraction=0.25",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=8"]


@dataclass
class Service:
    url: str
    ckpt: Path
    index: Path
    folder: Path


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def post(url: str, fields: dict[str, Any], files: list[tuple[str, bytes]] | None = None) -> tuple[int, dict[str, Any]]:
    return asyncio.run(post_many(url, [(fields, files or [])]))[0]


async def post_many(url: str, requests: list[tuple[dict[str, Any], list[tuple[str, bytes]]]]
                    ) -> list[tuple[int, dict[str, Any]]]:
    async def one(session: aiohttp.ClientSession, fields: dict[str, Any], files: list[tuple[str, bytes]]
                  ) -> tuple[int, dict[str, Any]]:
        form = aiohttp.FormData()
        for key, value in fields.items():
            form.add_field(key, str(value))
        for name, data in files:
            form.add_field("images", data, filename=name)
        async with session.post(f"{url}/search", data=form, timeout=aiohttp.ClientTimeout(total=60)) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session, f, fs) for f, fs in requests)))


def raw_http(url: str, head: str) -> tuple[int, str]:
    """Send a hand-written request head (no body) and read the status line and body: what a
    misbehaving client does, which an HTTP library would not let us send."""
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def _length(data: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n", 1)[0], re.I)
    return int(found.group(1)) if found else 0


@pytest.fixture(scope="module")
def service(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from cir.models import load_model_and_data
    from cir.search import main as search_main

    folder = tmp_path_factory.mktemp("serve")
    model, _ = load_model_and_data([str(DEMO)], None, data_args(small_data))
    # Weights unlike the config's initialisation: a server that ignored --ckpt would rank differently.
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = folder / "model.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    index = folder / "index"
    search_main(["build", "--config", str(DEMO), "--ckpt", str(ckpt), "--out", str(index), "--",
                 *data_args(small_data)])
    port = free_port()
    log = folder / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [CIR, "serve", "--config", str(DEMO), "--ckpt", str(ckpt), "--index", str(index), "--port", str(port),
             "--max-wait-ms", "40", "--max-image-mb", "0.25", "--", *data_args(small_data)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield Service(url, ckpt, index, folder)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _first_product(url: str, dataset: str) -> str:
    return json.loads(get(f"{url}/products/{dataset}?limit=1")[1])["ids"][0]


@pytest.mark.slow
def test_routes_answer_with_the_gallery_of_the_shards(service: Service, small_data: Path) -> None:
    from datamodules.shards import SkipCounter, iterate_shards, read_manifest, shard_urls

    gallery = {}
    for sample in iterate_shards(shard_urls(small_data, read_manifest(small_data), "val", "gallery"),
                                 handler=SkipCounter("t")):
        gallery[(sample["json"]["dataset"], sample["json"]["product_id"])] = sample
    status, body, _ = get(f"{service.url}/health")
    health = json.loads(body)
    assert status == 200 and health["model"] == "CLIP4CIR" and health["turn1_cache"] is None
    counts = {d: sum(1 for ds, _ in gallery if ds == d) for d in {ds for ds, _ in gallery}}
    assert health["datasets"] == counts
    assert json.loads(get(f"{service.url}/datasets")[1]) == [{"name": d, "gallery_size": n}
                                                             for d, n in sorted(counts.items())]
    listing = json.loads(get(f"{service.url}/products/synth_street?limit=1000")[1])
    assert listing["ids"] == sorted(p for d, p in gallery if d == "synth_street")
    pid = listing["ids"][3]
    meta = json.loads(get(f"{service.url}/products/synth_street/{pid}")[1])
    truth = gallery[("synth_street", pid)]["json"]
    assert meta["captions"]["short"] == truth["short_caption"] and meta["view_names"] == truth["view_names"]
    assert meta["views"] == len(truth["view_names"]) and len(meta["images"]) == meta["views"]
    status, data, media = get(service.url + meta["images"][-1])
    stored = gallery[("synth_street", pid)][f"view{meta['views'] - 1}.jpg"]
    assert status == 200 and media == "image/jpeg"
    assert Image.open(io.BytesIO(data)).convert("RGB").tobytes() == stored.convert("RGB").tobytes()
    status, page, media = get(f"{service.url}/")
    assert status == 200 and media.startswith("text/html") and b'id="results"' in page
    spec = json.loads(get(f"{service.url}/openapi.json")[1])
    assert {"/search", "/health", "/products/{dataset}/{product_id}"} <= set(spec["paths"])
    examples = json.loads(get(f"{service.url}/examples/synth_studio?n=3")[1])
    assert len(examples) == 3 and all(("synth_studio", e["target_id"]) in gallery for e in examples)


@pytest.mark.slow
def test_search_equals_cir_search_query_for_the_same_views_and_text(service: Service, small_data: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from cir.search import main as search_main

    pid = _first_product(service.url, "synth_studio")
    views = []
    for n in range(2):
        views.append(service.folder / f"view{n}.jpg")
        views[-1].write_bytes(get(f"{service.url}/images/synth_studio/{n}/{pid}")[1])
    text = "make it green with a long hem"
    status, answer = post(service.url, {"text": text, "dataset": "synth_studio", "k": 7},
                          [(p.name, p.read_bytes()) for p in views])
    capsys.readouterr()
    search_main(["query", "--config", str(DEMO), "--ckpt", str(service.ckpt), "--index", str(service.index),
                 "--images", *map(str, views), "--text", text, "--dataset", "synth_studio", "-k", "7",
                 "--", *data_args(small_data)])
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert status == 200 and [r["id"] for r in answer["results"]] == [row[2] for row in rows]
    assert all(abs(r["score"] - float(row[1])) <= 5.1e-5 for r, row in zip(answer["results"], rows, strict=True))


@pytest.mark.slow
def test_every_bad_input_gets_a_4xx_with_a_one_line_reason(service: Service) -> None:
    url, pid = service.url, _first_product(service.url, "synth_street")
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(png, "PNG")
    small = png.getvalue()
    big = io.BytesIO()
    Image.effect_noise((400, 400), 90).convert("RGB").save(big, "PNG")  # > the 0.25 MB limit of this server
    good = {"text": "make it red", "dataset": "synth_street", "k": 5}
    cases = [
        ({**good}, [("notes.txt", b"these bytes are no picture at all")], 415, "'notes.txt' is not an image"),
        ({**good}, [("cut.png", small[: len(small) // 2])], 415, "could not be decoded"),
        ({**good}, [(f"v{i}.png", small) for i in range(6)], 400, "6 images given"),
        ({**good}, [("huge.png", big.getvalue())], 413, "'huge.png' has"),
        ({**good, "text": "   "}, [("v.png", small)], 400, "text is empty"),
        ({**good, "text": "x" * 501}, [("v.png", small)], 400, "501 characters"),
        ({**good, "dataset": "shoes"}, [("v.png", small)], 404, "unknown dataset 'shoes'"),
        ({**good, "source_id": "p999999"}, [], 404, "no product 'p999999'"),
        ({**good, "source_id": "../../../../etc/passwd"}, [], 404, "no product '../../../../etc/passwd'"),
        ({**good, "source_id": "/etc/passwd"}, [], 404, "no product '/etc/passwd'"),
        ({**good, "source_id": pid}, [("v.png", small)], 400, "either source_id or images"),
        ({**good}, [], 400, "no source"),
        ({**good, "k": 0, "source_id": pid}, [], 400, "k=0"),
        ({**good, "k": "ten", "source_id": pid}, [], 422, "k: "),
    ]
    for fields, files, status, words in cases:
        got, body = post(url, fields, files)
        assert (got, set(body)) == (status, {"error"}), (fields.get("text", "")[:20], files[:1], body)
        assert words in body["error"] and "\n" not in body["error"], body
    gets = [(f"/products/synth_street/{urllib.parse.quote('../../etc/passwd', safe='')}", 404, "no product"),
            ("/products/synth_street/..%2F..%2F..%2Fetc%2Fpasswd", 404, "no product"),
            ("/images/synth_street/0/%2Fetc%2Fpasswd", 404, "no product '/etc/passwd'"),
            (f"/images/synth_street/9/{pid}", 404, "has no view 9"),
            ("/images/synth_street/-1/x", 404, "no product 'x'"),
            ("/products/nowhere/p1", 404, "unknown dataset"),
            ("/nothing-here", 404, "no such page")]
    for path, status, words in gets:
        got, body, _ = get(url + path)
        assert got == status and words in json.loads(body)["error"] and b"root:" not in body, (path, body)
    # Path tricks a browser would normalise away, sent raw; a POST without a length; one announcing 1 GB.
    for head, status, words in [
        ("GET /images/synth_street/0/../../../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
         404, "no product"),
        ("POST /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", 411,
         "Content-Length"),
        ("POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n", 413,
         "at most"),
        ("POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n"
         "Connection: close\r\n\r\n", 411, "no Transfer-Encoding"),
    ]:
        got, body = raw_http(url, head)
        assert got == status and words in body and "root:" not in body, (head, body)
    assert get(f"{url}/health")[0] == 200  # and the service still answers


@pytest.mark.slow
def test_concurrent_clients_share_model_batches_with_the_results_of_single_requests(service: Service) -> None:
    pids = json.loads(get(f"{service.url}/products/synth_street?limit=4")[1])["ids"]
    requests = [({"text": text, "dataset": "synth_street", "k": 5, "source_id": pid}, [])
                for pid in pids for text in ("make it red", "add a side stripe", "shorter hem")]
    alone = [post(service.url, *r) for r in requests]
    before = json.loads(get(f"{service.url}/health")[1])["batching"]
    together = asyncio.run(post_many(service.url, requests))
    after = json.loads(get(f"{service.url}/health")[1])["batching"]
    assert all(status == 200 for status, _ in alone + together)
    for (_, a), (_, b) in zip(alone, together, strict=True):
        assert [r["id"] for r in a["results"]] == [r["id"] for r in b["results"]]
        assert all(abs(x["score"] - y["score"]) < 1e-5 for x, y in zip(a["results"], b["results"], strict=True))
    assert max(b["batch_size"] for _, b in together) > 1 and after["largest_batch"] > 1
    assert after["requests"] - before["requests"] == len(requests) > after["batches"] - before["batches"]


@pytest.mark.slow
def test_the_page_shows_the_result_grid_in_headless_chromium(service: Service) -> None:
    """The page, driven by a real browser: a val query opened from its link, results rendered by
    the page's own JavaScript, the target framed; the screenshot is kept for a look."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); see docs/serving/index.md")
    example = json.loads(get(f"{service.url}/examples/synth_street?n=1")[1])[0]
    k = json.loads(get(f"{service.url}/health")[1])["datasets"]["synth_street"]  # all of it: the target is shown
    query = urllib.parse.urlencode({"dataset": "synth_street", "source": example["source_id"], "text": example["text"],
                                    "target": example["target_id"], "k": k})
    page = f"{service.url}/?{query}"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=20000", "--window-size=1280,1600", f"--user-data-dir={service.folder / 'chrome'}"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    shot = service.folder / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    _, expected = post(service.url, {"text": example["text"], "dataset": "synth_street", "k": k,
                                     "source_id": example["source_id"]})
    shown = re.findall(r'<figure class="result( target)?" data-id="([^"]+)"', dom)
    assert [pid for _, pid in shown] == [r["id"] for r in expected["results"]], dom[-2000:]
    assert [pid for framed, pid in shown if framed] == [example["target_id"]]
    assert 'data-state="done"' in dom
    img = Image.open(shot).convert("RGB")
    # The target's frame colour (#e08a00) is on screen: the grid was drawn, not only the DOM built.
    frame = sum(1 for px in img.getdata() if abs(px[0] - 0xE0) < 12 and abs(px[1] - 0x8A) < 12 and px[2] < 24)
    assert frame > 100, f"no target frame in {shot}"


@pytest.mark.slow
def test_procir_service_runs_only_turn_2_for_a_cached_source(small_data: Path) -> None:
    from cir.models import load_model_and_data
    from cir.serve.engine import Query, SearchEngine

    exp = ROOT / "experiments/demos/procir.yaml"
    model, dm = load_model_and_data([str(exp)], None, data_args(small_data))
    engine = SearchEngine(model, dm, "val", cache_mb=64)
    texts = ["make it red", "now with a long hem", "and a side stripe"]
    with in_process_server(engine) as url:
        pid = _first_product(url, "synth_street")
        answers = [post(url, {"text": t, "dataset": "synth_street", "k": 6, "source_id": pid}) for t in texts]
        other = json.loads(get(f"{url}/products/synth_street?limit=2")[1])["ids"][1]
        _, another = post(url, {"text": texts[0], "dataset": "synth_street", "k": 6, "source_id": other})
        health = json.loads(get(f"{url}/health")[1])["turn1_cache"]
    assert [a["cached"] for _, a in answers] == [False, True, True] and not another["cached"]  # a cache per source
    assert another["results"] != answers[0][1]["results"]
    assert health["entries"] == 2 and health["hits"] == 2 and health["misses"] == 2 and health["bytes"] > 0
    # The reference: each text's full dialogue (turn 1 and turn 2 in one forward), no cache.
    full = SearchEngine(model, dm, "val", cache_mb=0)
    assert not full.caches_turn1
    views, caption = full.store.source("synth_street", pid)
    for (_, got), text in zip(answers, texts, strict=True):
        ref = full.run([Query("synth_street", text, 6, views, None, caption)])[0]
        assert [r["id"] for r in got["results"]] == [pid for pid, _ in ref.results]
        assert all(abs(r["score"] - s) < 1e-4 for r, (_, s) in zip(got["results"], ref.results, strict=True))


@pytest.mark.slow
def test_llava_caption_service_queries_with_the_source_caption_against_brute_force(small_data: Path) -> None:
    from cir.models import encode_gallery, load_model_and_data
    from cir.serve.engine import SearchEngine
    from datamodules.batching import collate, stack_views

    exp = ROOT / "experiments/demos/llava_caption.yaml"
    model, dm = load_model_and_data([str(exp)], None, data_args(small_data))
    engine = SearchEngine(model, dm, "val")
    with in_process_server(engine, max_wait_ms=1.0) as url:
        pid = _first_product(url, "synth_studio")
        status, got = post(url, {"text": "make it blue", "dataset": "synth_studio", "k": 8, "source_id": pid})
    assert status == 200 and not got["cached"]
    # Brute force: the product's own caption joins the text; every gallery product scored by a dot product.
    views, caption = engine.store.source("synth_studio", pid)
    assert dm.captions is None and caption == engine.store.sample("synth_studio", pid)["json"]["short_caption"] != ""
    with torch.no_grad():
        q = model.encode_query(collate([{"source_images": stack_views(views, dm.image_transform),
                                         "text": "make it blue", "source_caption": caption}])).float()[0]
    emb, ids, datasets = encode_gallery(model, dm, "val")
    keep = [i for i, d in enumerate(datasets) if d == "synth_studio"]
    scores = emb[keep] @ q
    order = scores.argsort(descending=True)[:8]
    assert [r["id"] for r in got["results"]] == [ids[keep[i]] for i in order]
    assert all(abs(r["score"] - scores[i].item()) < 1e-4 for r, i in zip(got["results"], order, strict=True))
    # A query whose view cannot be transformed fails alone; the rest of its batch is answered.
    from cir.serve.engine import Answer, Query

    good = Query("synth_studio", "make it blue", 8, views, None, caption)
    answers = engine.run([good, Query("synth_studio", "x", 8, [Image.new("RGB", (0, 0))], None, ""), good])
    assert isinstance(answers[1], Exception) and isinstance(answers[0], Answer) and isinstance(answers[2], Answer)
    assert [pid for pid, _ in answers[0].results] == [r["id"] for r in got["results"]] and answers[0].batch_size == 2


def _phone_photo(view: Image.Image) -> tuple[bytes, bytes, bytes]:
    """``view`` as a phone stores a portrait: landscape pixels plus EXIF Orientation=6 (turn 90°
    clockwise to show). Returns that JPEG, its own decode turned upright by hand and the same decode
    left on its side, both as lossless PNGs that carry no orientation."""
    exif = Image.Exif()
    exif[0x0112] = 6  # the orientation tag
    buf = io.BytesIO()
    view.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    stored = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    pngs = []
    for img in (stored.transpose(Image.Transpose.ROTATE_270), stored):
        png = io.BytesIO()
        img.save(png, "PNG")
        pngs.append(png.getvalue())
    return buf.getvalue(), pngs[0], pngs[1]


@pytest.mark.slow
def test_a_phone_photo_is_searched_upright_by_serve_and_cir_search_query(service: Service, small_data: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from cir.search import main as search_main

    pid = _first_product(service.url, "synth_studio")
    view = Image.open(io.BytesIO(get(f"{service.url}/images/synth_studio/0/{pid}")[1])).convert("RGB")
    phone, upright, sideways = _phone_photo(view)
    fields = {"text": "make it green with a long hem", "dataset": "synth_studio", "k": 7}
    answers = {name: post(service.url, fields, [(f"{name}.img", data)])
               for name, data in (("phone", phone), ("upright", upright), ("sideways", sideways))}
    assert {status for status, _ in answers.values()} == {200}
    results = {name: [(r["id"], r["score"]) for r in body["results"]] for name, (_, body) in answers.items()}
    assert [i for i, _ in results["phone"]] == [i for i, _ in results["upright"]]
    assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(results["phone"], results["upright"], strict=True))
    assert results["sideways"] != results["upright"]  # the turn matters to this model: the check is not vacuous

    rows = {}
    for name, data in (("phone", phone), ("upright", upright)):
        path = service.folder / f"{name}.{'jpg' if name == 'phone' else 'png'}"
        path.write_bytes(data)
        capsys.readouterr()
        search_main(["query", "--config", str(DEMO), "--ckpt", str(service.ckpt), "--index", str(service.index),
                     "--images", str(path), "--text", fields["text"], "--dataset", "synth_studio", "-k", "7",
                     "--", *data_args(small_data)])
        rows[name] = [line.split()[1:] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert rows["phone"] == rows["upright"] and [r[1] for r in rows["phone"]] == [i for i, _ in results["upright"]]
