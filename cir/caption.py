"""``cir caption``: caption every product (and synthesise modified texts) of a shard folder with an
MLLM, into a sidecar file the DataModules merge in (``data.init_args.captions_file``).

    cir caption --data data/fashioniq --out data/fashioniq/captions.llava.jsonl --captioner llava \\
        [--name-or-path llava-hf/llava-1.5-13b-hf] [--load-in-4bit] [--splits train val] [--batch-size 8]

Resumable: ids already in the sidecar are skipped; each batch is synced before the next starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_modules.families.llava_caption.caption_job import build_captioner, run_caption_job
from lightning_modules.families.llava_caption.captioners import CaptionFailed
from lightning_modules.generation import EndpointUnavailable

from .args import command_parser, parse
from .errors import _exit, endpoint_message, one_line, user_errors

PROG = "cir caption"
# --base-url and --name-or-path set the endpoint and model; the key comes from the environment.
FLAGS = {"url": "--base-url", "model": "--name-or-path", "key": "OPENAI_API_KEY"}
CHECK_TIMEOUT_S = 30.0


def _line(exc: EndpointUnavailable) -> str:
    return endpoint_message(PROG, exc, FLAGS).removeprefix(f"{PROG}: ")


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("caption", __doc__)
    parser.add_argument("--data", required=True, help="shard folder (with manifest.json)")
    parser.add_argument("--out", required=True, help="sidecar JSON-lines file (appended to, resumable)")
    parser.add_argument("--captioner", choices=["llava", "qwen3.5", "oracle"], default="llava",
                        help="the MLLM that captions (oracle: the generated data's own captions, no model)")
    parser.add_argument("--name-or-path", default=None, help="hub id or local folder of the captioner")
    parser.add_argument("--load-in-4bit", action="store_true", help="4-bit weights (needs bitsandbytes and a GPU)")
    parser.add_argument("--device", default=None, help="e.g. cuda:0")
    parser.add_argument("--base-url", default=None, help="an OpenAI-compatible server (vLLM, transformers serve) "
                        "instead of a model in this process; --name-or-path is then the served model's name")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight with --base-url")
    parser.add_argument("--splits", nargs="+", default=None, help="splits captioned (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="products per generate call")
    parser.add_argument("--no-modified-text", action="store_true", help="captions only")
    args, _ = parse(parser, argv)
    if not (Path(args.data) / "manifest.json").is_file():
        raise _exit(PROG, f"--data {args.data}: not a shard folder (no manifest.json); make one with cir data",
                    FileNotFoundError(Path(args.data) / "manifest.json"))
    if args.captioner == "oracle" and args.base_url:
        raise SystemExit(f"{PROG}: --base-url: the oracle captioner reads the generated data's own captions and asks "
                         "no server; leave --base-url out, or choose --captioner llava or qwen3.5")
    with user_errors(PROG):
        captioner = build_captioner(args.captioner, args.name_or_path, args.load_in_4bit, args.device,
                                    args.base_url, args.concurrency)
        if args.base_url:  # a dead server or a wrong model stops here, in a line, before any work
            try:
                captioner.backend.check(timeout_s=CHECK_TIMEOUT_S)
            except EndpointUnavailable as exc:
                raise _exit(PROG, _line(exc), exc) from None
        try:
            counts = run_caption_job(args.data, args.out, captioner, splits=args.splits,
                                     batch_size=args.batch_size, modified_text=not args.no_modified_text)
        except EndpointUnavailable as exc:  # gone mid-job: every finished batch is in the sidecar
            raise _exit(PROG, _line(exc) + ", then rerun the same command (captions so far are kept)", exc) from None
        except (ValueError, KeyError) as exc:  # a bad manifest, a split it does not have
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else one_line(exc)
            raise _exit(PROG, f"{text} (CIR_DEBUG=1 shows the traceback)", exc) from None
        except CaptionFailed as exc:  # the server answered, with failures: every finished batch is kept
            raise _exit(PROG, f"{one_line(exc)}; captions so far are kept, rerun the same command to go on",
                        exc) from None
    print(json.dumps(counts))
