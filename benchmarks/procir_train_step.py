"""Time and peak memory of one ProCIR training step (forward + backward + AdamW) at a given size.

    python benchmarks/procir_train_step.py                                   # tiny preset, CPU
    python benchmarks/procir_train_step.py --preset qwen3.5-0.8b-random --device cuda --batch 16

Random weights and blank 512×512 views: speed and memory depend on the architecture and the
token counts only. Prints a Markdown table, one row per (mechanisms, views) setting, so a user can
see whether the paper's batch of 16 fits a GPU before starting a run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

CAPTION = " ".join(["a fitted knee-length dress in navy blue with long sleeves and a round neck"] * 3)
TEXT = "make it red with short sleeves and add a pocket on the left side of the chest"


def batch_of(model: object, n: int, views: int, size: int) -> dict:
    transform = model.backbone.image_transform
    imgs = [[transform(Image.new("RGB", (size, size), (20 * i, 40 * v, 90))) for v in range(views)] for i in range(n)]
    product = {"long_caption": CAPTION, "short_caption": CAPTION[:80]}
    return {"source_images": imgs, "target_images": imgs[::-1], "text": [TEXT] * n,
            "meta": [{"source": product, "target": product}] * n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()

    from lightning_modules.backbones import QwenBackbone
    from lightning_modules.families.procir.model import ProCIR

    backbone = QwenBackbone(args.preset, gradient_checkpointing=args.gradient_checkpointing)
    cuda = args.device.startswith("cuda")
    print(f"preset {args.preset}, {args.device}, batch {args.batch}, {args.image_size}² views, gradient "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, bf16 autocast {'on' if cuda else 'off'}\n")
    print("| MT | Align | CoT | views | step (s) | peak GPU memory (GiB) |")
    print("|---|---|---|---:|---:|---:|")
    for mt, align, cot, views in ((False, False, False, 5), (True, True, False, 5), (True, True, True, 5),
                                  (True, True, False, 2)):
        model = ProCIR(backbone, two_stage_dialogue=mt, align=align, cot=cot, image_text_eval=False)
        model.to(args.device).train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
        batch = batch_of(model, args.batch, views, args.image_size)
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.repeats + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                terms = model.training_terms(model.embed_pair(batch), batch)
            terms["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-"
        yes = {True: "✓", False: ""}
        print(f"| {yes[mt]} | {yes[align]} | {yes[cot]} | {views} | {statistics.median(times[1:]):.2f} | {peak} |",
              flush=True)
        del opt, model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
