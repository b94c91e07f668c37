"""GPU memory and throughput of the zero-shot embedders by padded-token budget per forward.

    python benchmarks/embedder_memory.py                       # Qwen3-VL-Embedding-8B's architecture, bf16, CUDA
    python benchmarks/embedder_memory.py --preset tiny --device cpu --image-size 96   # a smoke run

The weights are random (the real ones cannot be downloaded here) but the architecture is the 8B
model's, so memory and speed are the real model's. Products have ``--views`` views of
``--image-size`` pixels square (512: 256 image tokens per view with Qwen3-VL's 32-px merged tiles);
rows: Joint documents (every view in one request) and MaxSim/MeanPool queries (one view + text per
request), each at several ``max_batch_tokens``. The peak is ``torch.cuda.max_memory_allocated``:
the weights plus the largest forward's activations; a 24 GB card also needs room for the CUDA
context and allocator slack (about 1 GB).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from lightning_modules.backbones.vl_embedder import VLEmbedderBackbone

GIB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-vl-embedding-8b-random")
    parser.add_argument("--family", default="qwen3-vl-embedding", choices=["qwen3-vl-embedding", "gme"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--products", type=int, default=48)
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    dtype = "bfloat16" if cuda else "float32"
    t0 = time.perf_counter()
    backbone = VLEmbedderBackbone(args.preset, family=args.family, dtype=dtype, init_device=args.device).eval()
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in backbone.parameters())
    weights = torch.cuda.memory_allocated() / GIB if cuda else float("nan")
    rng = np.random.default_rng(0)
    views = [backbone.image_transform(Image.fromarray(rng.integers(0, 255, (args.image_size, args.image_size, 3),
                                                                   dtype=np.uint8)))
             for _ in range(args.views * 2)]
    text = "make it dark red with long sleeves and add a zip at the back"
    workloads = {
        "joint documents": [backbone.request(views[i % 2 * args.views:][: args.views]) for i in range(args.products)],
        "per-view queries": [backbone.request([views[i % len(views)]], text, "query")
                             for i in range(args.products * args.views)],
    }
    print(f"{args.preset}: {params / 1e9:.2f} B parameters ({dtype}) built on {args.device} in {built:.0f} s; "
          f"weights {weights:.1f} GiB; {backbone.image_tokens(views[0])} tokens per view")
    print(f"{'workload':18} {'tokens/request':>14} {'max_batch_tokens':>16} {'forwards':>8} {'peak GiB':>9} "
          f"{'requests/s':>10}")
    for name, seqs in workloads.items():
        for budget in args.budgets:
            backbone.max_batch_tokens = budget
            forwards = len(backbone.micro_batches(seqs))
            with torch.inference_mode():
                backbone.embed(seqs[: max(1, len(seqs) // 8)])  # warm-up: kernels, allocator
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                backbone.embed(seqs)
                if cuda:
                    torch.cuda.synchronize()
            elapsed = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
            print(f"{name:18} {len(seqs[0].ids):>14} {budget:>16} {forwards:>8} {peak:>9.1f} "
                  f"{len(seqs) / elapsed:>10.1f}")


if __name__ == "__main__":
    main()
