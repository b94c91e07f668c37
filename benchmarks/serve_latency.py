"""`cir serve` under load: latency (p50, p99) and requests/s at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_latency.py                          # tiny presets, generated data, --device auto
    python benchmarks/serve_latency.py --families clip4cir --device cpu --settings index "index + writes"
    python benchmarks/serve_latency.py --families procir --clients 1 8 32 --requests 192
    python benchmarks/serve_latency.py --families procir --exp experiments/procir/fashionmv.yaml \\
        --ckpt outputs/procir/checkpoints/last.ckpt --device cuda -- --data.init_args.data_dir=data/fashionmv

Each setting starts a real ``cir serve`` process (``--device``, ``--dtype``) and sends ``--requests``
queries from ``N`` concurrent HTTP clients (each client sends its next query when the last one is
answered). A query is a gallery source plus a text; sources come from a pool of ``--sources``
products, so a user refining one source with several texts is the common case, which is what
ProCIR's turn-1 cache is for. Settings per family: request batching on (``--max-batch 8``) and off
(``--max-batch 1``) over the gallery embedded at start-up; for ProCIR also with the cache off
(``--cache-mb 0``); ``index``: batching, the gallery served from a ``cir search build`` folder (a
``MutableGallery``: the base index and its change log); ``index + writes``: the same while one
more client adds a product (``POST /products``, a photo embedded by the model) and deletes it
again, ``--write-rate`` changes a second (each one acknowledged before the next); the ``writes``
column counts the acknowledged changes, and ``mean batch`` counts the photos embedded with the
queries. Compare rows of one run only: on a machine shared with other work,
absolute times move a lot.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMOS = {"clip4cir": "experiments/demos/clip4cir.yaml", "llava_caption": "experiments/demos/llava_caption.yaml",
         "procir": "experiments/demos/procir.yaml"}
TEXTS = ["make it red", "with long sleeves instead", "add a side stripe", "shorter hem and a logo on the front",
         "the same but in a checked pattern", "remove the pocket", "make it darker", "navy with no detail"]
KEY = "benchmark-key"
SETTINGS = ["batching", "no batching", "batching + cache", "no batching + cache", "batching, no cache",
            "no batching, no cache", "index", "index + writes"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(ckpt: str | None) -> list[str]:
    # The commands refuse to run without a checkpoint unless told: latency needs no trained weights.
    return ["--ckpt", ckpt] if ckpt else ["--untrained"]


def build_index(exp: str, ckpt: str | None, extra: list[str], out: Path, log: Path) -> None:
    cmd = [str(Path(sys.executable).parent / "cir"), "search", "build", "--config", exp, *weights(ckpt), "--out",
           str(out), "--", *extra]
    with log.open("w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"cir search build failed: {log.read_text()[-2000:]}")


def start(exp: str, ckpt: str | None, options: list[str], extra: list[str], log: Path,
          key: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "cir"), "serve", "--config", exp, "--port", str(port), *options,
           *weights(ckpt)]
    env = {k: v for k, v in os.environ.items() if k != "CIR_API_KEY"} | ({"CIR_API_KEY": key} if key else {})
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, "--", *extra], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cir serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"cir serve did not start in 10 minutes; see {log}")


def photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 360, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def writer(session: aiohttp.ClientSession, url: str, dataset: str, stop: asyncio.Event, rate: float) -> int:
    """Adds a product and deletes it, again and again, ``rate`` changes a second at most, until
    ``stop``; returns the acknowledged changes."""
    done, n = 0, 0
    headers = {"Authorization": f"Bearer {KEY}"}
    start = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(max(0.0, start + done / rate - time.perf_counter()))
        form = aiohttp.FormData({"dataset": dataset, "product_id": f"bench-{n}"})
        form.add_field("images", photo(n), filename="photo.jpg")
        async with session.post(f"{url}/products", data=form, headers=headers) as r:
            if r.status not in (200, 201):
                raise SystemExit(f"POST /products: HTTP {r.status}: {await r.text()}")
        async with session.delete(f"{url}/products/{dataset}/bench-{n}", headers=headers) as r:
            if r.status != 200:
                raise SystemExit(f"DELETE: HTTP {r.status}: {await r.text()}")
        done, n = done + 2, n + 1
    return done


async def load(url: str, dataset: str, sources: list[str], clients: int, requests: int, k: int,
               write_rate: float = 0.0) -> tuple[list[float], float, int]:
    """Latencies (s) of ``requests`` queries sent by ``clients`` closed-loop clients, the wall time,
    and the changes written meanwhile."""
    jobs = asyncio.Queue()
    for i in range(requests):
        jobs.put_nowait((sources[i % len(sources)], TEXTS[(i // len(sources)) % len(TEXTS)]))
    latencies: list[float] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while not jobs.empty():
            source, text = jobs.get_nowait()
            form = aiohttp.FormData({"text": text, "dataset": dataset, "k": str(k), "source_id": source})
            t0 = time.perf_counter()
            async with session.post(f"{url}/search", data=form) as r:
                body = await r.json()
                if r.status != 200:
                    raise SystemExit(f"HTTP {r.status}: {body}")
            latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        stop = asyncio.Event()
        background = asyncio.create_task(writer(session, url, dataset, stop, write_rate)) if write_rate else None
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - t0
        stop.set()
        written = await background if background is not None else 0
        return latencies, wall, written


def get_json(url: str) -> object:
    import json

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def settings_of(family: str, work: Path) -> dict[str, list[str]]:
    if family == "procir":
        out = {"batching + cache": ["--max-batch", "8"], "no batching + cache": ["--max-batch", "1"],
               "batching, no cache": ["--max-batch", "8", "--cache-mb", "0"],
               "no batching, no cache": ["--max-batch", "1", "--cache-mb", "0"]}
    else:
        out = {"batching": ["--max-batch", "8"], "no batching": ["--max-batch", "1"]}
    index = ["--max-batch", "8", "--index", str(work / f"{family}-index")]
    return {**out, "index": index, "index + writes": index}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(DEMOS), choices=list(DEMOS))
    parser.add_argument("--exp", help="experiment of a trained model (default: each family's demo, random weights)")
    parser.add_argument("--ckpt")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="cir serve --device")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="cir serve --dtype")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, help="rows to run (default: all of the family's)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="queries per row")
    parser.add_argument("--sources", type=int, default=8, help="distinct source products the queries refine")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--write-rate", type=float, default=4.0, help="changes a second in the index + writes rows")
    own, extra = (sys.argv[1:], []) if "--" not in sys.argv else (sys.argv[1:sys.argv.index("--")],
                                                                     sys.argv[sys.argv.index("--") + 1:])
    args = parser.parse_args(own)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if not extra and not args.exp:
        extra = [f"--data.init_args.data_dir={work / 'data'}", "--data.init_args.products=300",
                 "--data.init_args.num_workers=0"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; --device {args.device} "
          f"--dtype {args.dtype}; {args.requests} requests per row, {args.sources} sources, top-{args.k}, max wait "
          f"{args.max_wait_ms} ms, {args.write_rate:g} changes/s in the index + writes rows\n")
    print(f"{'family':<14} {'setting':<22} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'mean batch':>10} "
          f"{'cache hits':>10} {'writes':>6}")
    print("-" * 101)
    for family in args.families:
        exp = args.exp or str(ROOT / DEMOS[family])
        for name, options in settings_of(family, work).items():
            if args.settings and name not in args.settings:
                continue
            if "--index" in options and not (work / f"{family}-index").is_dir():
                build_index(exp, args.ckpt, extra, work / f"{family}-index", work / f"{family}-build.log")
            writes = name.endswith("+ writes")
            proc, url = start(exp, args.ckpt, [*options, "--max-wait-ms", str(args.max_wait_ms), "--device",
                                               args.device, "--dtype", args.dtype], extra, work / f"{family}.log",
                              KEY if writes else None)
            try:
                health = get_json(f"{url}/health")
                if writes and health.get("writes") != "on":
                    print(f"{family:<14} {name:<22} skipped: {health.get('writes')}", flush=True)
                    continue
                datasets = get_json(f"{url}/datasets")
                dataset = datasets[0]["name"]
                sources = get_json(f"{url}/products/{dataset}?limit={args.sources}")["ids"]
                asyncio.run(load(url, dataset, sources, 1, 4, args.k))  # warm-up
                for clients in args.clients:
                    before = get_json(f"{url}/health")
                    lat, wall, written = asyncio.run(load(url, dataset, sources, clients, args.requests, args.k,
                                                          args.write_rate if writes else 0.0))
                    after = get_json(f"{url}/health")
                    b0, b1 = before["batching"], after["batching"]
                    mean_batch = (b1["requests"] - b0["requests"]) / max(1, b1["batches"] - b0["batches"])
                    c0, c1 = before["turn1_cache"], after["turn1_cache"]
                    hits = f"{c1['hits'] - c0['hits']}/{args.requests}" if c1 else "-"
                    q = statistics.quantiles(lat, n=100, method="inclusive")
                    print(f"{family:<14} {name:<22} {clients:>7} {1000 * statistics.median(lat):>8.1f} "
                          f"{1000 * q[98]:>8.1f} {len(lat) / wall:>7.1f} {mean_batch:>10.2f} {hits:>10} "
                          f"{written if writes else '-':>6}", flush=True)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)


if __name__ == "__main__":
    main()
