"""The caption job behind ``cir caption``: caption every product (and synthesise modified texts)
of a shard folder with an MLLM, into a sidecar file the DataModules merge in (``captions_file``).

The sidecar is JSON lines, one record per id::

    {"key": "fashioniq_dress--B0084Y8XIU", "kind": "caption", "text": "...", "captioner": "llava", ...}
    {"key": "<triplet sample key>", "kind": "modified_text", "text": "...", ...}

Product captions are keyed ``{dataset}--{product_id}`` (the paper's C_r and C_t: every product
that is a source or a target is a gallery product of its split); modified texts by the triplet's
sample key. The job is resumable: ids already in the sidecar are skipped, and each batch is
appended and flushed to disk before the next starts, so a killed run loses at most one batch.

    cir caption --data data/fashioniq --out data/fashioniq/captions.llava.jsonl --captioner llava \\
        [--name-or-path llava-hf/llava-1.5-13b-hf] [--load-in-4bit] [--splits train val] [--batch-size 8]
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datamodules.batching import caption_of
from datamodules.shards import SkipCounter, iterate_shards, read_manifest, shard_urls
from datamodules.sidecar import append_records, read_sidecar

from .captioners import LlavaCaptioner, OracleCaptioner, QwenCaptioner, ServedCaptioner
from .prompts import DESCRIBE_PROMPT, REWRITE_PROMPT, rewrite_input


def _batches(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_caption_job(data_dir: str | Path, out: str | Path, captioner: Any, splits: list[str] | None = None,
                    batch_size: int = 8, modified_text: bool = True, prompt: str | None = None,
                    rewrite_prompt: str | None = None, progress: bool = True) -> dict[str, int]:
    """Caption the gallery products (and rewrite the triplets' texts) of ``splits``; returns counts."""
    prompt, rewrite_prompt = prompt or DESCRIBE_PROMPT, rewrite_prompt or REWRITE_PROMPT
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_sidecar(out) if out.is_file() else {}
    counts = {"captioned": 0, "rewritten": 0, "skipped_existing": 0}
    manifest = read_manifest(data_dir)
    splits = splits or sorted(manifest["splits"])
    handler = SkipCounter("cir caption")
    base = {"captioner": captioner.name, "prompt": prompt}

    def todo(kind: str) -> Iterator[dict[str, Any]]:
        for split in splits:
            for sample in iterate_shards(shard_urls(data_dir, manifest, split, kind), handler=handler):
                meta = sample["json"]
                key = (f"{meta['dataset']}--{meta['product_id']}" if kind == "gallery" else sample["__key__"])
                if key in done:
                    counts["skipped_existing"] += 1
                    continue
                yield {"key": key, "sample": sample, "meta": meta}

    captions = {k: r["text"] for k, r in done.items() if r.get("kind") == "caption"}
    for batch in _batches(tqdm(todo("gallery"), desc="captions", disable=not progress), batch_size):
        images = [item["sample"]["view0.jpg"] for item in batch]
        texts = captioner.describe(images, prompt, [item["meta"] for item in batch])
        records = [{"key": it["key"], "kind": "caption", "text": t, **base} for it, t in zip(batch, texts, strict=True)]
        append_records(out, records)
        captions.update({r["key"]: r["text"] for r in records})
        counts["captioned"] += len(records)
    if modified_text:
        for batch in _batches(tqdm(todo("triplets"), desc="modified texts", disable=not progress), batch_size):
            triplets = [it["meta"]["triplet"] for it in batch]
            inputs = [rewrite_input(caption_of(it["meta"]["source"], captions), t["modification_short"])
                      for it, t in zip(batch, triplets, strict=True)]
            texts = captioner.rewrite(inputs, rewrite_prompt, triplets)
            append_records(out, [{"key": it["key"], "kind": "modified_text", "text": t, **base,
                                  "prompt": rewrite_prompt} for it, t in zip(batch, texts, strict=True)])
            counts["rewritten"] += len(batch)
    return counts


def build_captioner(kind: str, name_or_path: str | None, load_in_4bit: bool, device: str | None,
                    base_url: str | None = None, concurrency: int = 8) -> Any:
    if kind == "oracle":
        return OracleCaptioner()
    if base_url:
        return ServedCaptioner(base_url, name_or_path or "llava-hf/llava-1.5-13b-hf", concurrency=concurrency)
    if kind == "llava":
        return LlavaCaptioner(name_or_path or "llava-hf/llava-1.5-13b-hf", load_in_4bit=load_in_4bit,
                                         device=device)
    return QwenCaptioner(name_or_path or "Qwen/Qwen3.5-0.8B", device=device)
