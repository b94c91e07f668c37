"""Throughput of `cir build`: products per minute per stage, and the HTTP client's own ceiling.

    python benchmarks/build_throughput.py [--products 300] [--requests 2000]

Rows: the oracle backend in this process; the HTTP backend against a local OpenAI-compatible
server fed by the oracle, at concurrency 1, 8 and 32; and the client alone against an instant
server (tiny text requests), which must reach 200 requests/s so the client is never what limits a
real model server. The local server runs in this process (another thread, same interpreter), so
the HTTP rows are a lower bound on the client. Stage 1 sends every view; stages 2 and 3 send
stitched composites (stage 3: 11 per request), so their requests are larger.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cir.build import build_parser, config_from
from datamodules.synthetic import generate
from datamodules.synthetic.catalogue import write_catalogue_layout
from lightning_modules.construction.oracle import OracleChat
from lightning_modules.construction.pipeline import build
from lightning_modules.generation import ChatBackend, ChatRequest, Completion, OpenAIChat
from lightning_modules.generation.chat import OnResult
from lightning_modules.generation.local_server import serve_backend

STAGES = (("captions", "requested"), ("verify", "checked"), ("triplets", "sources"))


class Instant:
    name = "instant"

    def complete(self, requests: Sequence[ChatRequest], on_result: OnResult) -> None:
        for i in range(len(requests)):
            on_result(i, Completion("{}", 1, 1))

    def close(self) -> None:
        pass


def _run(catalogue: Path, make: Callable[[str], ChatBackend]) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        args = build_parser().parse_args(["--catalogue", str(catalogue), "--out", out, "--backend", "oracle",
                                          "--image-encoder", "clip:tiny", "--no-progress"])
        summary = build(config_from(args), make)
        runs = [json.loads(line) for line in (Path(out) / "build" / "runs.jsonl").read_text().splitlines()]
    seconds = {r["stage"]: r["seconds"] for r in runs}
    return [60 * summary[stage][count] / seconds[stage] for stage, count in STAGES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--requests", type=int, default=2000, help="requests of the client-overhead row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        catalogue = Path(tmp) / "catalogue"
        write_catalogue_layout(catalogue, generate(args.products, seed=0), seed=0)
        oracle = OracleChat(catalogue / "ground_truth.jsonl")
        rows = [("oracle, in process", _run(catalogue, lambda stage: oracle))]
        with serve_backend(oracle) as (url, _):
            for concurrency in (1, 8, 32):
                rows.append((f"oracle over HTTP, concurrency {concurrency}",
                             _run(catalogue, lambda stage, c=concurrency: OpenAIChat(url, "oracle", concurrency=c,
                                                                                     send_tag=True))))
    print(f"{'backend':<34} {'captions/min':>13} {'verify/min':>11} {'triplets/min':>13}")
    for name, rates in rows:
        print(f"{name:<34} " + " ".join(f"{r:>{w}.0f}" for r, w in zip(rates, (13, 11, 13), strict=True)))

    with serve_backend(Instant()) as (url, _):
        client = OpenAIChat(url, "instant", concurrency=32)
        requests = [ChatRequest(user=[f"request {i}"], max_tokens=8) for i in range(args.requests)]
        done: list[int] = []
        start = time.perf_counter()
        client.complete(requests, lambda i, c: done.append(i) if c.error is None else None)
        rate = len(done) / (time.perf_counter() - start)
    print(f"\nclient against an instant server, concurrency 32: {rate:.0f} requests/s "
          f"({len(done)}/{len(requests)} answered; needs >= 200)")
    if rate < 200 or len(done) < len(requests):
        raise SystemExit("the HTTP client is below 200 requests/s: it would limit a real model server")


if __name__ == "__main__":
    main()
