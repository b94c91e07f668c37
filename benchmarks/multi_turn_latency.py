"""Latency of turn t of a multi-turn ProCIR session with the KV cache (only turn t's tokens run on
turn t-1's cache) versus a full recompute of the whole dialogue through turn t. Prints a Markdown
table for text-only turns and for turns that each bring a clicked result's views.

    python benchmarks/multi_turn_latency.py                                   # tiny preset, CPU
    python benchmarks/multi_turn_latency.py --preset qwen3.5-0.8b-random --image-size 256 --repeats 2
    python benchmarks/multi_turn_latency.py --preset qwen3.5-0.8b-random --device cuda --dtype bfloat16

Goal: the cached cost of turn t stays flat in t (within 1.5x of turn 2) while the full recompute
grows with the dialogue. The cached time includes copying the previous state's cache (a state can
be extended again: a shopper retrying a turn). ``qwen3.5-0.8b-random`` is Qwen3.5-0.8B's architecture
with random weights (latency does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from kv_cache_latency import call_ms
from PIL import Image

TEXTS = ["like this but in navy blue", "with long sleeves and buttoned cuffs", "and a zipper at the back",
         "a bit shorter, above the knee", "in a softer, matte fabric"]


def product(n: int, seed: int, size: int) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), ((40 * seed + 60 * i) % 256, 90, 160)) for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--image-size", type=int, default=512, help="side of the square views (512: 256 tokens each)")
    p.add_argument("--views", type=int, default=2, help="views of the start product and of each clicked result")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from lightning_modules.backbones import QwenBackbone
    from lightning_modules.families.procir.dialogue import Turn
    from lightning_modules.families.procir.model import ProCIR
    from lightning_modules.families.procir.session_cache import SessionEncoder

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = ProCIR(QwenBackbone(args.preset), image_text_eval=False).to(args.device, getattr(torch, args.dtype))
    enc = SessionEncoder(model)
    print(f"preset {args.preset}, {args.device} {args.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters (built in {time.perf_counter() - t0:.0f} s), {torch.get_num_threads()} threads; "
          f"{args.views} views of {args.image_size}² per product, median of {args.repeats} rounds over the turns\n")
    print("| turns | t | dialogue tokens | turn t tokens | cache (MB) | cached turn t (ms) | full recompute (ms) "
          "| speed-up | cached t / cached 2 | max abs Δq |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scenario, clicked in (("text only", False), ("clicked result", True)):
        start = enc.views(product(args.views, 0, args.image_size))
        turns = [Turn(TEXTS[0], start)] + [
            Turn(TEXTS[t % len(TEXTS)], enc.views(product(args.views, t, args.image_size)) if clicked else None)
            for t in range(1, args.turns)]
        _, state = enc.start_session(turns[0].reference, turns[0].text)
        states = [state]
        for turn in turns[1:]:
            states.append(enc.extend(states[-1], turn.text, turn.reference)[1])
        # Round-robin over the turns, the first round a warm-up: a load that drifts while the
        # benchmark runs (a shared machine) then weighs on every turn alike, not on the last ones.
        calls = {t: (lambda turn=turns[t - 1], before=states[t - 2]: enc.extend(before, turn.text, turn.reference),
                     lambda upto=turns[:t]: enc.encode_session(upto)) for t in range(2, args.turns + 1)}
        times: dict[int, tuple[list[float], list[float]]] = {t: ([], []) for t in calls}
        for round_ in range(args.repeats + 1):
            for t, (cached, full) in calls.items():
                c, f = call_ms(cached, args.device), call_ms(full, args.device)
                if round_:
                    times[t][0].append(c)
                    times[t][1].append(f)
        base = statistics.median(times[2][0])
        for t in calls:
            cached, full = (statistics.median(x) for x in times[t])
            before, after = states[t - 2], states[t - 1]
            diff = (calls[t][0]()[0] - calls[t][1]()[-1]).abs().max()
            print(f"| {scenario} | {t} | {after.tokens} | {after.tokens - before.tokens} | "
                  f"{after.nbytes / 2**20:.2f} | {cached:.1f} | {full:.1f} | {full / cached:.1f}× | "
                  f"{cached / base:.2f} | {diff.item():.1e} |", flush=True)


if __name__ == "__main__":
    main()
