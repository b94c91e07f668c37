"""``cir caption``: caption every product (and synthesise modified texts) of a shard folder with an
MLLM, into a sidecar file the DataModules merge in (``data.init_args.captions_file``).

    cir caption --data data/fashioniq --out data/fashioniq/captions.llava.jsonl --captioner llava \\
        [--name-or-path llava-hf/llava-1.5-13b-hf] [--load-in-4bit] [--splits train val] [--batch-size 8]

Resumable: ids already in the sidecar are skipped; each batch is synced before the next starts.
"""

from __future__ import annotations

import json

from lightning_modules.families.llava_caption.caption_job import build_captioner, run_caption_job

from .args import command_parser, parse


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
    captioner = build_captioner(args.captioner, args.name_or_path, args.load_in_4bit, args.device, args.base_url,
                                args.concurrency)
    counts = run_caption_job(args.data, args.out, captioner, splits=args.splits, batch_size=args.batch_size,
                             modified_text=not args.no_modified_text)
    print(json.dumps(counts))
