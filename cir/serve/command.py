"""``cir serve``: a trained model behind an HTTP API and a web page, over its gallery.

    cir serve --config experiments/demos/clip4cir.yaml --ckpt outputs/clip4cir_demo/checkpoints/last.ckpt
    cir serve --config EXP --ckpt CKPT --index index/ [--split val] [--host 127.0.0.1 --port 8000]
    CIR_API_KEY=secret cir serve --config EXP --ckpt CKPT --index shop-index/ --device cuda

The model loads once (``--ckpt``; ``--untrained`` serves the experiment's initial weights) on
``--device`` (auto: CUDA when there is one) in ``--dtype`` (auto: bf16 on a GPU where the experiment
trains in bf16, float32 on the CPU). Its gallery is ``--index`` (built by ``cir search build`` with
the same model, data and split, or by ``cir index`` from a catalogue folder, whose photos are then
shown and whose experiment data is not needed), ``--milvus URI`` (a Milvus collection), or, without
either, the split's gallery embedded at start-up. A store of another model is refused.

With ``CIR_API_KEY`` set, ``POST /products`` and ``DELETE /products/{dataset}/{id}`` change the
gallery while it is served (an index keeps each change in its change log before answering, and
compacts it after ``--compact-after`` changes). Open http://HOST:PORT/ for the page and /docs for
the API. Concurrent queries are batched on the model (``--max-batch``, up to ``--max-wait-ms`` of
extra wait; ``--max-batch 1`` turns batching off); a ProCIR model with the two-stage dialogue
caches turn 1 of each source (``--cache-mb``, 0 turns it off). Multi-turn sessions (``POST /sessions``)
last ``--max-turns`` turns, end after ``--session-ttl-s`` idle seconds and hold at most ``--session-mb``
in all (the least recently used go first); such a ProCIR model keeps each session's KV cache, so a turn
runs only its own tokens. Options after ``--`` go to the config (e.g.
``-- --data.init_args.data_dir=data/fashionmv``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from ..args import add_weights_options, command_parser, parse
from ..errors import check_files, user_errors
from ..models import REBUILD, fingerprint_mismatch, load_with_fingerprint, require_weights
from .app import create_app
from .device import device_of, dtype_of, place, trainer_precision
from .engine import SearchEngine
from .limits import Limits
from .products import Products
from .sessions import SessionStore
from .stores import PROG, Opened, open_index, open_milvus, photos, probe, refuse_caption_targets
from .writes import API_KEY_ENV, writes_off


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("serve", __doc__)
    add_weights_options(p, "serve")
    p.add_argument("--index", help="a cir search build or cir index folder (default: embed the split's gallery at "
                                    "start-up)")
    p.add_argument("--milvus", metavar="URI", help="serve a Milvus collection (a Milvus Lite file or a server URI; "
                                                   "MILVUS_TOKEN authenticates)")
    p.add_argument("--milvus-collection", default="fashion_cir", help="the collection --milvus serves")
    p.add_argument("--catalogue", help="the catalogue folder whose photos are shown (default: the one a cir index "
                                       "folder records)")
    p.add_argument("--uploads", help="folder for photos of products added while serving (default: INDEX/uploads; "
                                     "needed for writes with --milvus)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where the model runs")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute precision (auto: bf16 on a GPU where the experiment trains in bf16, else float32)")
    p.add_argument("--compact-after", type=int, default=10_000,
                   help="fold the index's change log into a new index after this many changes (0: never)")
    p.add_argument("--split", default="val", help="the split whose gallery is served")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="queries per model batch (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a query waits for others to join it")
    p.add_argument("--cache-mb", type=float, default=512.0, help="ProCIR turn-1 cache size (0: no cache)")
    p.add_argument("--session-mb", type=float, default=1024.0,
                   help="memory of all multi-turn sessions together (ProCIR: their KV caches); the least recently "
                        "used session goes first")
    p.add_argument("--session-ttl-s", type=float, default=1800.0, help="a session ends after this many idle seconds")
    p.add_argument("--max-turns", type=int, default=5, help="turns of one session")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="largest uploaded view accepted")
    p.add_argument("--timeout-s", type=float, default=60.0, help="longest a query may wait for the model")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args, extra = parse(p, argv, passthrough=True)
    with user_errors(PROG):  # a file found missing later, Ctrl-C while loading: one line
        _serve(p, args, extra)


def _serve(p: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    if args.max_batch < 1:
        p.error(f"--max-batch {args.max_batch}: at least 1 (1 turns batching off)")
    if args.max_turns < 1 or args.session_ttl_s <= 0 or args.session_mb <= 0:
        p.error(f"--max-turns {args.max_turns}, --session-ttl-s {args.session_ttl_s:g}, --session-mb "
                f"{args.session_mb:g}: sessions need at least 1 turn, a positive idle time and some memory")
    if args.index and args.milvus:
        p.error("--index and --milvus each name the gallery: give one")
    if (args.catalogue or args.uploads) and not (args.index or args.milvus):
        p.error("--catalogue and --uploads go with --index or --milvus (without either, the split's gallery is "
                "served as it is)")
    require_weights(PROG, args.ckpt, args.untrained, "train the model first (make demo writes "
                    "outputs/clip4cir_demo/checkpoints/last.ckpt) or give a checkpoint path")
    check_files(PROG, [("--config", c) for c in args.config])
    device = device_of(args.device, PROG)  # before the model: a GPU asked of a machine without one is a typo
    api_key = os.environ.get(API_KEY_ENV) or None

    if args.untrained:
        print(f"{PROG}: --untrained: serving the experiment's initial weights (untrained unless the config loads "
              "some)", file=sys.stderr, flush=True)
    opened = Opened(None, Path(args.catalogue) if args.catalogue else None, Path(args.uploads) if args.uploads
                    else None)
    if args.index:
        opened = open_index(args.index, args.catalogue, args.uploads)
    # A catalogue's products need only the experiment's preprocessing, not its data shards.
    model, dm, fingerprint = load_with_fingerprint(args.config, args.ckpt, extra,
                                                   needs_data=opened.catalogue is None)
    if args.index and (problem := fingerprint_mismatch(opened.gallery.fingerprint, fingerprint,
                                                       f"--index {args.index}", REBUILD)):
        raise SystemExit(f"{PROG}: {problem}")
    dtype = dtype_of(args.dtype, device, model, trainer_precision(args.config, extra), PROG)
    place(model, device, dtype)
    opened.refused = refuse_caption_targets(model)
    if args.milvus:
        opened.gallery = open_milvus(args.milvus, args.milvus_collection, fingerprint,
                                     tuple(probe(model, dm, device, dtype).shape))
        if opened.uploads is None:
            opened.refused = opened.refused or "--milvus without --uploads DIR: no folder for uploaded photos"
    base, uploads = photos(opened, dm, args.split) if opened.gallery is not None else (None, None)
    products = Products(opened.gallery, base, uploads) if opened.gallery is not None else None
    engine = SearchEngine(model, dm, args.split, opened.gallery, args.cache_mb, products=products, device=device,
                          dtype=dtype)
    limits = Limits(max_image_bytes=int(args.max_image_mb * 2**20), timeout_s=args.timeout_s)
    sessions = SessionStore(int(args.session_mb * 2**20), args.session_ttl_s, args.max_turns)
    app = create_app(engine, limits, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, api_key=api_key,
                     uploads=uploads, writes_refused=opened.refused, compact_after=args.compact_after,
                     sessions=sessions)
    sizes = ", ".join(f"{d}: {engine.gallery_size(d)}" for d in engine.datasets) or "empty"
    what = (f"index {args.index}" if args.index else f"Milvus {args.milvus} ({args.milvus_collection})"
            if args.milvus else f"the {args.split} gallery")
    off = writes_off(engine, api_key, opened.refused)
    writes = "writes on" if off is None else "writes off"
    if off is not None and api_key:
        print(f"{PROG}: {off}", file=sys.stderr, flush=True)
    print(f"serving {type(model).__name__} on {device} ({str(dtype).removeprefix('torch.')}) over {what} ({sizes}; "
          f"{writes}) on http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
