"""`cir serve` under load: latency (p50, p99) and requests/s at 1, 8 and 32 concurrent clients.

The service runs its model on the CPU (GPU serving is not implemented yet).

    python benchmarks/serve_latency.py                          # tiny presets, generated data
    python benchmarks/serve_latency.py --families procir --clients 1 8 32 --requests 192
    python benchmarks/serve_latency.py --families procir --exp experiments/procir/fashionmv.yaml \\
        --ckpt outputs/procir/checkpoints/last.ckpt -- --data.init_args.data_dir=data/fashionmv   # a trained model

Each setting starts a real ``cir serve`` process and sends ``--requests`` queries from ``N``
concurrent HTTP clients (each client sends its next query when the last one is answered). A query
is a gallery source plus a text; sources come from a pool of ``--sources`` products, so a user
refining one source with several texts is the common case, which is what ProCIR's turn-1 cache is
for. Settings per family: request batching on (``--max-batch 8``) and off (``--max-batch 1``); for
ProCIR also with the cache off (``--cache-mb 0``). Compare rows of one run only: on a machine
shared with other work, absolute times move a lot.
"""

from __future__ import annotations

import argparse
import asyncio
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

ROOT = Path(__file__).resolve().parents[1]
DEMOS = {"clip4cir": "experiments/demos/clip4cir.yaml", "llava_caption": "experiments/demos/llava_caption.yaml",
         "procir": "experiments/demos/procir.yaml"}
TEXTS = ["make it red", "with long sleeves instead", "add a side stripe", "shorter hem and a logo on the front",
         "the same but in a checked pattern", "remove the pocket", "make it darker", "navy with no detail"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(exp: str, ckpt: str | None, options: list[str], extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "cir"), "serve", "--config", exp, "--port", str(port), *options]
    # cir serve refuses to run without a checkpoint unless told: latency needs no trained weights.
    cmd += ["--ckpt", ckpt] if ckpt else ["--untrained"]
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, "--", *extra], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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


async def load(url: str, dataset: str, sources: list[str], clients: int, requests: int, k: int
               ) -> tuple[list[float], float]:
    """Latencies (s) of ``requests`` queries sent by ``clients`` closed-loop clients, and the wall time."""
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
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return latencies, time.perf_counter() - t0


def get_json(url: str) -> object:
    import json

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(DEMOS), choices=list(DEMOS))
    parser.add_argument("--exp", help="experiment of a trained model (default: each family's demo, random weights)")
    parser.add_argument("--ckpt")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="queries per row")
    parser.add_argument("--sources", type=int, default=8, help="distinct source products the queries refine")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    own, extra = (sys.argv[1:], []) if "--" not in sys.argv else (sys.argv[1:sys.argv.index("--")],
                                                                     sys.argv[sys.argv.index("--") + 1:])
    args = parser.parse_args(own)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if not extra and not args.exp:
        extra = [f"--data.init_args.data_dir={work / 'data'}", "--data.init_args.products=300",
                 "--data.init_args.num_workers=0"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.requests} requests "
          f"per row, {args.sources} sources, top-{args.k}, max wait {args.max_wait_ms} ms\n")
    print(f"{'family':<14} {'setting':<22} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'mean batch':>10} "
          f"{'cache hits':>10}")
    print("-" * 94)
    for family in args.families:
        settings = {"batching": ["--max-batch", "8"], "no batching": ["--max-batch", "1"]}
        if family == "procir":
            settings = {"batching + cache": ["--max-batch", "8"], "no batching + cache": ["--max-batch", "1"],
                        "batching, no cache": ["--max-batch", "8", "--cache-mb", "0"],
                        "no batching, no cache": ["--max-batch", "1", "--cache-mb", "0"]}
        for name, options in settings.items():
            proc, url = start(args.exp or str(ROOT / DEMOS[family]), args.ckpt,
                              [*options, "--max-wait-ms", str(args.max_wait_ms)], extra, work / f"{family}.log")
            try:
                datasets = get_json(f"{url}/datasets")
                dataset = datasets[0]["name"]
                sources = get_json(f"{url}/products/{dataset}?limit={args.sources}")["ids"]
                asyncio.run(load(url, dataset, sources, 1, 4, args.k))  # warm-up
                for clients in args.clients:
                    before = get_json(f"{url}/health")
                    lat, wall = asyncio.run(load(url, dataset, sources, clients, args.requests, args.k))
                    after = get_json(f"{url}/health")
                    b0, b1 = before["batching"], after["batching"]
                    mean_batch = (b1["requests"] - b0["requests"]) / max(1, b1["batches"] - b0["batches"])
                    c0, c1 = before["turn1_cache"], after["turn1_cache"]
                    hits = f"{c1['hits'] - c0['hits']}/{args.requests}" if c1 else "-"
                    q = statistics.quantiles(lat, n=100, method="inclusive")
                    print(f"{family:<14} {name:<22} {clients:>7} {1000 * statistics.median(lat):>8.1f} "
                          f"{1000 * q[98]:>8.1f} {len(lat) / wall:>7.1f} {mean_batch:>10.2f} {hits:>10}", flush=True)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)


if __name__ == "__main__":
    main()
