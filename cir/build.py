"""``cir build``: make product-level CIR training data from a catalogue of multi-view photos, with
the FashionMV paper's three-stage pipeline (captions, left/right filter, triplets).

    cir data synthetic --layout catalogue --out data/catalogue --products 300
    cir build --catalogue data/catalogue --out data/built --backend oracle --image-encoder clip:tiny
    cir data fashionmv --root data/built --out data/built-shards
    # --chain: also multi-turn sessions (data/built/{split}_sessions.jsonl); convert them with --sessions

With a model server (vLLM, SGLang, `transformers serve`, a hosted API) for a real catalogue:

    cir build --catalogue shop/ --out data/shop-cir --backend openai --base-url http://localhost:8000/v1 \\
        --model Qwen/Qwen3-VL-8B-Instruct --concurrency 32 [--triplets-model ... --triplets-base-url ...]

Or a model in this process: --backend transformers --model Qwen/Qwen3.5-0.8B (or a folder) [--device cuda].
Rerun the same command after a crash or a kill: finished requests are skipped.

With --backend openai every distinct endpoint and model is asked once before any work (GET /models,
else a one-token chat request), and a server that stops listening mid-build stops it within
seconds: one line names the URL, what answered and the option to fix. A catalogue with no readable
image is refused. --image-encoder (default clip:clip-vit-b32, from the hub) is needed by every
backend for stage 3; offline, give a local folder, or clip:tiny for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lightning_modules.construction.answers import WordRanges
from lightning_modules.construction.oracle import OracleChat
from lightning_modules.construction.pipeline import Build, BuildConfig, BuildIncomplete
from lightning_modules.construction.prompts import PAPER_MAX_TOKENS, STAGES, Stage
from lightning_modules.construction.runner import ServerRefused
from lightning_modules.generation import ChatBackend, EndpointUnavailable, OpenAIChat, TransformersChat

from .args import command_parser, parse
from .errors import debug_requested, endpoint_message

# The longest wait for the check of an endpoint before any work: a server that is up answers
# ``GET /models`` (or a one-token chat request) well within it.
CHECK_TIMEOUT_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("build", __doc__)
    p.add_argument("--catalogue", required=True, help="folder of images/<product_id>/*.jpg [+ products.jsonl]")
    p.add_argument("--out", required=True, help="output folder (FashionMV layout; journals in OUT/build/)")
    p.add_argument("--backend", choices=["oracle", "transformers", "openai"], required=True)
    p.add_argument("--model", default=None, help="hub id, folder or served model name, for every stage")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    for stage in STAGES:
        p.add_argument(f"--{stage}-model", default=None, help=f"the {stage} stage's model (default: --model)")
        p.add_argument(f"--{stage}-base-url", default=None, help=f"the {stage} stage's endpoint (default: --base-url)")
        p.add_argument(f"--{stage}-temperature", type=float, default=None, help="default: --temperature")
        p.add_argument(f"--{stage}-max-tokens", type=int, default=None,
                       help=f"default: --max-tokens, else the paper's {PAPER_MAX_TOKENS[stage]}")
        p.add_argument(f"--{stage}-extra-body", default=None, help="default: --extra-body (e.g. thinking only for "
                       "the first two stages, as the paper)")
        p.add_argument(f"--{stage}-api-key-env", default=None, help="default: --api-key-env")
    p.add_argument("--temperature", type=float, default=1.0, help="every stage (the paper: 1.0)")
    p.add_argument("--max-tokens", type=int, default=None, help="every stage (default: the paper's per stage)")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding the API key (default: OPENAI_API_KEY where set)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai backend)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request")
    p.add_argument("--max-retries", type=int, default=6, help="HTTP retries on 429/5xx/timeouts, with backoff")
    p.add_argument("--extra-body", default=None,
                   help='JSON merged into every request, e.g. \'{"chat_template_kwargs": {"enable_thinking": true}}\'')
    p.add_argument("--batch-size", type=int, default=4, help="requests per generate call (transformers backend)")
    p.add_argument("--device", default=None, help="device of in-process models and encoders, e.g. cuda")
    p.add_argument("--oracle-truth", default=None,
                   help="ground truth of the oracle (default: CATALOGUE/ground_truth.jsonl)")
    p.add_argument("--prompts", default=None, help="folder of captions.txt/verify.txt/triplets.txt replacing ours")
    p.add_argument("--val-fraction", type=float, default=0.15, help="products held out for val, per dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neighbours", type=int, default=20, help="top-k per retrieval path (the paper: 20)")
    p.add_argument("--candidates", type=int, default=10, help="candidates shown per source (the paper: 10)")
    p.add_argument("--verify-batch", type=int, default=5, help="products per verification request (the paper: 5)")
    p.add_argument("--attempts", type=int, default=3, help="tries per request when the answer breaks the schema")
    p.add_argument("--word-slack", type=float, default=0.5, help="word counts refused beyond this fraction outside "
                   "the paper's ranges")
    p.add_argument("--composite-height", type=int, default=512, help="pixel height of stitched composites")
    p.add_argument("--max-side", type=int, default=1024, help="views larger than this are scaled down for stage 1")
    p.add_argument("--image-encoder", default="clip:clip-vit-b32", help="clip:<preset, hub id or folder>")
    p.add_argument("--text-encoder", default="tfidf", help="tfidf or clip:<preset, hub id or folder>")
    p.add_argument("--dataset", default="catalogue", help="dataset name of products without one in products.jsonl")
    p.add_argument("--retry-failed", action="store_true", help="ask again where answers were recorded as failures")
    p.add_argument("--chain", action="store_true", help="also chain the triplets into multi-turn sessions "
                   "(OUT/{split}_sessions.jsonl; `cir data fashionmv --root OUT --sessions` writes them as shards)")
    p.add_argument("--min-turns", type=int, default=2, help="fewest turns of a chained session (with --chain)")
    p.add_argument("--max-turns", type=int, default=5, help="most turns of a chained session (with --chain)")
    p.add_argument("--no-progress", action="store_true")
    return p


def backend_factory(args: argparse.Namespace) -> Callable[[Stage], ChatBackend]:
    def make(stage: Stage) -> ChatBackend:
        if args.backend == "oracle":
            return OracleChat(args.oracle_truth or Path(args.catalogue) / "ground_truth.jsonl")
        model = getattr(args, f"{stage}_model") or args.model
        if not model:
            raise SystemExit(f"cir build: --backend {args.backend} needs --model (or --{stage}-model)")
        if args.backend == "transformers":
            return TransformersChat(model, batch_size=args.batch_size, device=args.device)
        base_url = getattr(args, f"{stage}_base_url") or args.base_url
        if not base_url:
            raise SystemExit(f"cir build: --backend openai needs --base-url (or --{stage}-base-url)")
        flag = f"--{stage}-extra-body" if getattr(args, f"{stage}_extra_body") else "--extra-body"
        raw = getattr(args, f"{stage}_extra_body") or args.extra_body
        try:
            extra = json.loads(raw) if raw else None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"cir build: {flag} is not JSON ({exc}): {raw!r}") from exc
        if extra is not None and not isinstance(extra, dict):
            raise SystemExit(f"cir build: {flag} must be a JSON object, got {raw!r}")
        key_env = getattr(args, f"{stage}_api_key_env") or args.api_key_env
        if key_env and not os.environ.get(key_env):
            raise SystemExit(f"cir build: the API key variable {key_env} is not set; export it or drop --api-key-env")
        return OpenAIChat(base_url, model, api_key_env=key_env or "OPENAI_API_KEY", concurrency=args.concurrency,
                          timeout_s=args.timeout, max_retries=args.max_retries, extra_body=extra)
    return make


def _flags(args: argparse.Namespace, stage: Stage) -> dict[str, str]:
    """The options that set ``stage``'s endpoint, model and key: the stage's own where given."""
    def flag(name: str) -> str:
        return f"--{stage}-{name}" if getattr(args, f"{stage}_{name.replace('-', '_')}") else f"--{name}"
    return {"url": flag("base-url"), "model": flag("model"), "key": flag("api-key-env")}


def check_endpoints(args: argparse.Namespace, make: Callable[[Stage], ChatBackend]) -> None:
    """Before any work: one request per distinct endpoint, model and key of the stages, so a dead
    server or a wrong URL, model or key stops the build in a line instead of hours into it."""
    if args.backend != "openai":
        return
    seen: set[tuple[str, str, str]] = set()
    for stage in STAGES:
        backend = make(stage)
        assert isinstance(backend, OpenAIChat)
        key = (backend.base_url, backend.model, backend.api_key)
        if key in seen:
            continue
        seen.add(key)
        try:
            backend.check(timeout_s=min(args.timeout, CHECK_TIMEOUT_S))
        except EndpointUnavailable as exc:
            if debug_requested():
                raise
            raise SystemExit(endpoint_message("cir build", exc, _flags(args, stage))) from exc


def _stage_flags_for(args: argparse.Namespace, url: str) -> dict[str, str]:
    """The flags of the first stage whose endpoint is ``url`` (an error names a URL, not a stage)."""
    for stage in STAGES:
        base_url = (getattr(args, f"{stage}_base_url") or args.base_url or "").rstrip("/")
        if base_url and url.startswith(base_url):
            return _flags(args, stage)
    return {"url": "--base-url", "model": "--model", "key": "--api-key-env"}


def config_from(args: argparse.Namespace) -> BuildConfig:
    if args.chain and not 1 <= args.min_turns <= args.max_turns:
        raise SystemExit(f"cir build: --min-turns {args.min_turns} --max-turns {args.max_turns}: need 1 <= min <= max")
    temperature = {s: v if (v := getattr(args, f"{s}_temperature")) is not None else args.temperature for s in STAGES}
    max_tokens = {s: getattr(args, f"{s}_max_tokens") or args.max_tokens or PAPER_MAX_TOKENS[s] for s in STAGES}
    return BuildConfig(
        catalogue=Path(args.catalogue), out=Path(args.out), prompts=args.prompts, val_fraction=args.val_fraction,
        seed=args.seed, neighbours=args.neighbours, candidates=args.candidates, verify_batch=args.verify_batch,
        attempts=args.attempts, composite_height=args.composite_height, max_side=args.max_side,
        image_encoder=args.image_encoder, text_encoder=args.text_encoder, device=args.device,
        default_dataset=args.dataset, temperature=temperature, max_tokens=max_tokens,
        ranges=WordRanges(slack=args.word_slack), retry_failed=args.retry_failed, progress=not args.no_progress,
        chain=(args.min_turns, args.max_turns) if args.chain else None)


def _refuse_empty(summary: dict, out: str) -> None:
    """The catalogue was readable but the release holds no triplet: an error (no one trains on an
    empty release), saying at which stage it emptied; the summary and the journals stay for a look."""
    if sum(summary["triplets"]["per_split"].get(s, 0) for s in ("train", "val")):
        return
    caps, verify = summary["captions"], summary["verify"]
    if not caps["clothing"]:
        why = f"no product passed stage 1 ({caps['failed']} failed, {caps['non_clothing']} not clothing)"
    elif not verify["retained"]:
        why = (f"no product passed stage 2 ({verify['left_right_errors']} left/right errors, "
               f"{verify['failed']} failed)")
    else:
        t = summary["triplets"]
        why = (f"no source got a target in stage 3 ({t['failed']} failed, {t['no_candidates']} without candidates, "
               f"{t['without_selection']} without a selection)")
    raise SystemExit(f"cir build: the release has no triplets: {why}; see {Path(out) / 'build_summary.json'} and "
                     f"{Path(out) / 'build'}/ (answers are kept: fix the cause, then rerun the same command)")


def main(argv: list[str] | None = None) -> None:
    args, _ = parse(build_parser(), argv)
    make = backend_factory(args)
    try:
        # The catalogue is read (and an empty one refused) before any server is asked.
        pipeline = Build(config_from(args), make)
        skipped = pipeline.catalogue.counts["no_readable_images"]
        if skipped:
            print(f"cir build: warning: {skipped} of {pipeline.catalogue.counts['products_in']} products have no "
                  "readable image and are skipped (counted in build_summary.json)", file=sys.stderr)
        check_endpoints(args, make)
        summary = pipeline.run()
    except BuildIncomplete as exc:
        print(f"cir build: {exc}", file=sys.stderr)
        raise SystemExit(3) from exc
    except ServerRefused as exc:
        raise SystemExit(f"cir build: the server refused the requests: {exc}") from exc
    except EndpointUnavailable as exc:  # the server went away mid-build: what is journalled is kept
        if debug_requested():
            raise
        raise SystemExit(endpoint_message("cir build", exc, _stage_flags_for(args, exc.url))
                         + ", then rerun the same command (answers so far are kept)") from exc
    except (ValueError, OSError) as exc:  # bad input, unreadable files: one line naming the file or key
        if debug_requested():
            raise
        raise SystemExit(f"cir build: {exc} (CIR_DEBUG=1 shows the traceback)") from exc
    _refuse_empty(summary, args.out)
    keys = ("catalogue", "captions", "verify", "triplets", "released_products", "sessions")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    print(f"summary: {Path(args.out) / 'build_summary.json'}")
