"""Latency of a ProCIR query with turn 1 cached (only the modification tokens run) versus the full
two-turn forward, for 1-5 source views. Prints a Markdown table.

    python benchmarks/kv_cache_latency.py                                   # tiny preset, CPU
    python benchmarks/kv_cache_latency.py --preset qwen3.5-0.8b-random --device cuda --dtype bfloat16

``qwen3.5-0.8b-random`` is Qwen3.5-0.8B's architecture with random weights (latency does not depend
on the weights); a local folder of the real model works too. The cached time includes copying the
cache (each query of an interactive session starts from the same turn-1 state).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image

TEXT = ("Change the color to navy blue, make the sleeves long with buttoned cuffs, and add a patch pocket on "
        "the wearer's left chest.")


def kernels() -> str:
    from transformers.utils import import_utils

    fla = getattr(import_utils, "is_flash_linear_attention_available", lambda: False)()
    conv = getattr(import_utils, "is_causal_conv1d_available", lambda: False)()
    return f"flash-linear-attention: {'yes' if fla else 'no'}, causal-conv1d: {'yes' if conv else 'no'}"


def call_ms(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one call (a GPU's queued work included)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up call."""
    fn()
    return statistics.median(call_ms(fn, device) for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--image-size", type=int, default=512, help="side of the square views (512: 256 tokens each)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from lightning_modules.backbones import QwenBackbone
    from lightning_modules.backbones.qwen_chat import Dialogue
    from lightning_modules.families.procir.interactive import InteractiveEncoder
    from lightning_modules.families.procir.model import ProCIR

    torch.set_grad_enabled(False)
    backbone = QwenBackbone(args.preset)
    model = ProCIR(backbone, image_text_eval=False).to(args.device, getattr(torch, args.dtype))
    enc = InteractiveEncoder(model)
    views = [Image.new("RGB", (args.image_size, args.image_size), (40 * i, 90, 160)) for i in range(5)]
    print(f"preset {args.preset}, {args.device} {args.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; {kernels()}\n")
    print("| views | turn-1 tokens | turn-2 tokens | full forward (ms) | cached turn 2 (ms) | of which cache copy (ms) "
          "| speed-up | max |Δq| |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in range(1, 6):
        source = enc.views(views[:n])
        cache = enc.cache_source(source)
        full = timed(lambda s=source: enc.encode_query(s, TEXT), args.repeats, args.device)
        cached = timed(lambda c=cache: enc.encode_query(None, TEXT, cache=c), args.repeats, args.device)
        copying = timed(lambda c=cache: copy.deepcopy(c.past_key_values), args.repeats, args.device)
        diff = (enc.encode_query(source, TEXT) - enc.encode_query(None, TEXT, cache=cache)).abs().max().item()
        turn2 = len(model.dialogue.assistant(model.dialogue.user(Dialogue(), text=TEXT), close=False).ids)
        print(f"| {n} | {cache.tokens} | {turn2} | {full:.1f} | {cached:.1f} | {copying:.1f} | "
              f"{full / cached:.1f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
