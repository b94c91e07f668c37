"""``cir serve``: a trained model behind an HTTP API and a web page, over its gallery.

    cir serve --config experiments/demos/clip4cir.yaml --ckpt outputs/clip4cir_demo/checkpoints/last.ckpt
    cir serve --config EXP --ckpt CKPT --index index/ [--split val] [--host 127.0.0.1 --port 8000]

The model loads once (``--ckpt``; ``--untrained`` serves the experiment's initial weights). Its
gallery is ``--index`` (built by ``cir search build`` with the same model, data and split: an index
whose model fingerprint differs is refused) or, without it, the split's gallery embedded at
start-up. Open http://HOST:PORT/ for the page and /docs for the API. Concurrent queries are
batched on the model (``--max-batch``, up to ``--max-wait-ms`` of extra wait; ``--max-batch 1``
turns batching off); a ProCIR model with the two-stage dialogue caches turn 1 of each source
(``--cache-mb``, 0 turns it off). Options after ``--`` go to the config (e.g.
``-- --data.init_args.data_dir=data/fashionmv``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from lightning_modules.retrieval import GalleryIndex

from ..args import add_weights_options, command_parser, parse
from ..errors import check_files, user_errors
from ..models import REBUILD, fingerprint_mismatch, load_with_fingerprint, require_weights
from .app import create_app
from .engine import SearchEngine
from .limits import Limits


def main(argv: list[str] | None = None) -> None:
    p = command_parser("serve", __doc__)
    add_weights_options(p, "serve")
    p.add_argument("--index", help="a `cir search build` folder (default: embed the split's gallery at start-up)")
    p.add_argument("--split", default="val", help="the split whose gallery is served")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="queries per model batch (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a query waits for others to join it")
    p.add_argument("--cache-mb", type=float, default=512.0, help="ProCIR turn-1 cache size (0: no cache)")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="largest uploaded view accepted")
    p.add_argument("--timeout-s", type=float, default=60.0, help="longest a query may wait for the model")
    args, extra = parse(p, argv, passthrough=True)
    with user_errors("cir serve"):  # a file found missing later, Ctrl-C while loading: one line
        _serve(p, args, extra)


def _serve(p: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    if args.max_batch < 1:
        p.error(f"--max-batch {args.max_batch}: at least 1 (1 turns batching off)")
    require_weights("cir serve", args.ckpt, args.untrained, "train the model first (make demo writes "
                    "outputs/clip4cir_demo/checkpoints/last.ckpt) or give a checkpoint path")
    check_files("cir serve", [("--config", c) for c in args.config])
    if args.index and not (Path(args.index) / "gallery_index.json").is_file():
        p.error(f"--index {args.index}: not a gallery index folder; build one with cir search build, or leave "
                "--index out to embed the gallery at start-up")

    if args.untrained:
        print("cir serve: --untrained: serving the experiment's initial weights (untrained unless the config loads "
              "some)", file=sys.stderr, flush=True)
    index = GalleryIndex.load(args.index) if args.index else None
    if index is not None and index.fingerprint is None:  # nothing to compare with: refused before the model loads
        raise SystemExit(f"cir serve: {fingerprint_mismatch(None, {}, f'--index {args.index}', REBUILD)}")
    model, dm, fingerprint = load_with_fingerprint(args.config, args.ckpt, extra)
    if index is not None and (problem := fingerprint_mismatch(index.fingerprint, fingerprint,
                                                               f"--index {args.index}", REBUILD)):
        raise SystemExit(f"cir serve: {problem}")
    engine = SearchEngine(model, dm, args.split, index, cache_mb=args.cache_mb)
    limits = Limits(max_image_bytes=int(args.max_image_mb * 2**20), timeout_s=args.timeout_s)
    app = create_app(engine, limits, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    sizes = ", ".join(f"{d}: {engine.gallery_size(d)}" for d in engine.datasets)
    print(f"serving {type(model).__name__} over the {args.split} gallery ({sizes}) on http://{args.host}:{args.port}/"
          f" (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
