"""``cir-query``: interactive ProCIR retrieval, the source product cached once, one text per line.

    cir-query --config experiments/procir_demo.yaml --ckpt outputs/procir_demo/checkpoints/last.ckpt \\
        --images front.jpg back.jpg [--split val] [-k 5] [-- --data.init_args.data_dir=...]
    > make it red
    > no, with long sleeves and a pocket

The gallery of ``--split`` is embedded first; then turn 1 of the source runs once
(``InteractiveEncoder.cache_source``) and each line typed runs only turn 2 (``encode_query`` with
the cache). Each answer prints the top-k product ids and the query latency.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .interactive import InteractiveEncoder
from .search_cli import encode_gallery, load_model_and_data


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="cir-query", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="experiment YAML of a ProCIR model")
    p.add_argument("--ckpt", help="checkpoint with the trained weights (loaded weights-only)")
    p.add_argument("--images", nargs="+", required=True, help="the source product's views")
    p.add_argument("--split", default="val", help="split whose gallery is searched")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--text", action="append", help="modification texts (default: read lines from stdin)")
    args = p.parse_args(argv)
    model, dm = load_model_and_data(args.config, args.ckpt, extra)
    encoder = InteractiveEncoder(model)
    gallery, ids, _ = encode_gallery(model, dm, args.split)
    t0 = time.perf_counter()
    cache = encoder.cache_source(args.images)
    print(f"gallery: {len(ids)} products; source cached: {cache.tokens} tokens in "
          f"{1000 * (time.perf_counter() - t0):.1f} ms", flush=True)
    for text in args.text or (line.strip() for line in sys.stdin):
        if not text:
            continue
        t0 = time.perf_counter()
        q = encoder.encode_query(None, text, cache=cache)
        ms = 1000 * (time.perf_counter() - t0)
        scores, idx = torch.topk(gallery.to(q.device) @ q, min(args.k, len(ids)))
        ranked = ", ".join(f"{ids[i]} ({s:.3f})" for s, i in zip(scores.tolist(), idx.tolist(), strict=True))
        print(f"[{ms:.1f} ms] {text!r}: {ranked}", flush=True)


if __name__ == "__main__":
    main()
