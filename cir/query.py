"""``cir query``: interactive retrieval, one modification text per line, for any trained model.

    cir query --config experiments/demos/procir.yaml --ckpt outputs/procir_demo/checkpoints/last.ckpt \\
        --images front.jpg back.jpg [--split val] [--dataset synth_studio] [-k 5] [-- --data.init_args.data_dir=...]
    query> make it red
    query> no, with long sleeves and a pocket

Without ``--ckpt`` the command refuses to run unless ``--untrained`` asks for the experiment's
initial weights. The gallery of ``--split`` is embedded first. A ProCIR model with the two-stage dialogue runs turn
1 of the source once (``InteractiveEncoder.cache_source``) and each text only runs turn 2; every
other model runs its full query forward per text. Each answer prints the top-k product ids of the
chosen dataset's gallery and the query latency.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator

import torch

from lightning_modules.families.procir import InteractiveEncoder, ProCIR

from .args import command_parser, parse
from .models import encode_gallery, encode_query, load_model_and_data, require_weights
from .search import choose_dataset

PROMPT = "query> "


def _texts(given: list[str] | None) -> Iterator[str]:
    if given:
        yield from given
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(PROMPT, end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.strip()


def main(argv: list[str] | None = None) -> None:
    p = command_parser("query", __doc__)
    p.add_argument("--config", action="append", required=True, help="experiment YAML of a trained model")
    p.add_argument("--ckpt", help="checkpoint with the trained weights (loaded weights-only)")
    p.add_argument("--untrained", action="store_true",
                   help="answer with the experiment's initial weights (no --ckpt): for trying the command only")
    p.add_argument("--images", nargs="+", required=True, help="the source product's views")
    p.add_argument("--split", default="val", help="split whose gallery is searched")
    p.add_argument("--dataset", default=None, help="the gallery searched (needed when the split holds several)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--text", action="append", help="modification texts (default: read lines from stdin)")
    args, extra = parse(p, argv, passthrough=True)
    require_weights("cir query", args.ckpt, args.untrained)
    model, dm = load_model_and_data(args.config, args.ckpt, extra)
    gallery, ids, datasets = encode_gallery(model, dm, args.split)
    dataset = choose_dataset(datasets, args.dataset, "cir query")
    rows = torch.tensor([d == dataset for d in datasets])
    gallery, ids = gallery[rows], [i for i, keep in zip(ids, rows.tolist(), strict=True) if keep]
    t0 = time.perf_counter()
    if isinstance(model, ProCIR) and model.two_stage_dialogue:
        encoder = InteractiveEncoder(model)
        cache = encoder.cache_source(args.images)
        how = f"source cached: {cache.tokens} tokens in {1000 * (time.perf_counter() - t0):.1f} ms"
        embed: Callable[[str], torch.Tensor] = lambda text: encoder.encode_query(None, text, cache=cache)  # noqa: E731
    else:
        how = "no cache for this model: each text runs the full query forward"
        embed = lambda text: encode_query(model, dm, args.images, text)[0]  # noqa: E731
    print(f"gallery: {len(ids)} products of {dataset}; {how}", flush=True)
    for text in _texts(args.text):
        if not text:
            continue
        t0 = time.perf_counter()
        q = embed(text)
        ms = 1000 * (time.perf_counter() - t0)
        scores, idx = torch.topk(gallery.to(q.device) @ q, min(args.k, len(ids)))
        ranked = ", ".join(f"{ids[i]} ({s:.3f})" for s, i in zip(scores.tolist(), idx.tolist(), strict=True))
        print(f"[{ms:.1f} ms] {text!r}: {ranked}", flush=True)
