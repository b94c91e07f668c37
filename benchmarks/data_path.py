"""Views per second per core of the data path, from a tar shard to model inputs.

    python benchmarks/data_path.py [--views 48] [--repeats 3] [--sizes 512x682 1024x1365]

Writes product-like views (the generator's renderer at full resolution, pixel noise included;
JPEG quality 90) into a tar shard per size and times, in this one process with one torch thread:

- ``bare decode``: reading the shard and decoding every view at full size with PIL (nothing else);
- ``└ clip / qwen decode``: reading the shard and the reduced JPEG decode the new paths start with
  (CLIP's and Qwen's targets), the most any path that decodes this way could reach;
- ``clip``: CLIP ViT's preprocessing (shortest edge 224, centre crop 224), the processor on the
  fully decoded view as before (old) against ``HFImageTransform`` on the lazily decoded view (new);
- ``qwen tiny`` / ``qwen3.5``: Qwen's smart resize into 128²..512² pixels, 16-px patches, merge 2,
  2 frames; the tiny preset normalises with CLIP's mean/std, Qwen3.5's checkpoint with 0.5/0.5;
- ``gme``: the GME / RzenEmbed embedder's larger range (256..1280 merged 28-px tiles, 14-px patches).

``--stream DIR`` instead times the whole training stream of a shard folder (one process, no
DataLoader workers, the default 64-px transform), triplets per second of CPU time, for both
samplings: ``resampled`` (shards drawn with replacement, read sequentially, a shuffle buffer) and
``permutation`` (the epoch's permutation, each sample read by its byte range from the index).

Rates are views per second of this process's CPU time (one core; CPU time rather than wall-clock
so that other work on a shared machine counts less), the best of ``--repeats`` passes over the
shard, the paths taking turns; ``× bare`` is a rate over the bare decode's. All paths read the same
shard. Outputs are dropped as they come; a real pipeline keeps a batch of them, and fresh memory
for Qwen's float32 patches (5.7 MB a view at 416×576) costs both paths the same extra.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from datamodules import ShardDataModule
from datamodules.batching import views_of
from datamodules.fast_decode import decode_at_least
from datamodules.shards import decode_sample
from datamodules.synthetic import generate
from datamodules.synthetic.render import render_view
from lightning_modules.backbones.clip import HFImageTransform
from lightning_modules.backbones.qwen import QwenImageTransform, image_processor

Transform = Callable[[Image.Image], Any]


def product_views(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEG views of generated products, rendered at ``height`` and cut to ``width``."""
    data = generate(max(10, n), seed=seed)
    products = list(data.products.values())
    rng = random.Random(seed)
    out = []
    for i in range(n):
        spec = products[i % len(products)]
        img = render_view(spec.attributes, rng.choice(spec.view_names), height, rng)
        left = (height - width) // 2
        buf = io.BytesIO()
        img.crop((left, 0, left + width, height)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shard(path: Path, views: list[bytes]) -> None:
    """One gallery sample per view, as ``ShardSetWriter`` lays them out."""
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(views):
            for name, payload in ((f"p{i:05d}.json", json.dumps({"product_id": str(i)}).encode()),
                                  (f"p{i:05d}.view0.jpg", data)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def samples(shard: Path) -> wds.DataPipeline:
    return wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())


def bare_decode(shard: Path) -> int:
    n = 0
    for sample in samples(shard):
        Image.open(io.BytesIO(sample["view0.jpg"])).convert("RGB")
        n += 1
    return n


def reduced_decode(target: tuple[int, int], shard: Path) -> int:
    """The lazy path's decode alone: a floor under any transform that starts with it."""
    n = 0
    for sample in samples(shard):
        for view in views_of(decode_sample(sample), "view"):
            decode_at_least(view, *target)
            n += 1
    return n


def through(transform: Transform, lazy: bool, shard: Path) -> int:
    n = 0
    for sample in samples(shard):
        for view in views_of(decode_sample(sample, lazy=lazy), "view"):
            transform(view)
            n += 1
    return n


def processor_call(processor: Any, convert: bool, img: Image.Image) -> Any:
    """The transforms as they were: the processor on the fully decoded view (Qwen's converted it
    to RGB first, CLIP's passed it as it was)."""
    return processor(images=img.convert("RGB") if convert else img, return_tensors="pt")


def best_rates(runs: dict[str, Callable[[Path], int]], shard: Path, repeats: int) -> dict[str, float]:
    """Each run's best rate over ``repeats`` rounds; every round runs them all in turn, so a busy
    spell on a shared machine falls on all of them alike."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.process_time()
            n = run(shard)
            best[name] = max(best[name], n / (time.process_time() - start))
    return best


def clip_target(width: int, height: int) -> tuple[int, int]:
    """CLIP's resize target before its crop: shortest edge 224, aspect ratio kept."""
    short, long = min(width, height), max(width, height)
    return (224, int(224 * long / short)) if width <= height else (int(224 * long / short), 224)


def qwen_target(width: int, height: int) -> tuple[int, int]:
    h, w = smart_resize(height, width, factor=32, min_pixels=128 * 128, max_pixels=512 * 512)
    return w, h


def processors() -> dict[str, Any]:
    qwen35 = image_processor(16, 2, 2)
    qwen35.image_mean, qwen35.image_std = [0.5] * 3, [0.5] * 3
    gme = image_processor(14, 2, 2)
    gme.size = {"shortest_edge": 256 * 28 * 28, "longest_edge": 1280 * 28 * 28}
    return {"clip": CLIPImageProcessorPil(), "qwen tiny": image_processor(16, 2, 2), "qwen3.5": qwen35, "gme": gme}


def stream_pass(sampling: str, batches: int, data: Path) -> int:
    """Triplets of the first ``batches`` training batches of ``data`` with ``sampling``."""
    dm = ShardDataModule(str(data), batch_size=32, num_workers=0, sampling=sampling)  # type: ignore[arg-type]
    return 32 * sum(1 for _ in islice(dm.train_dataloader(), batches))


def stream_table(data: Path, repeats: int, batches: int) -> None:
    ShardDataModule(str(data), num_workers=0, sampling="permutation").train_dataloader()  # index built, not timed
    runs = {name: partial(stream_pass, name, batches) for name in ("resampled", "permutation")}
    rate = best_rates(runs, data, repeats)
    print("| sampling | triplets/s (one core) | × resampled |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | {rate[name]:.1f} | {rate[name] / rate['resampled']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["512x682", "1024x1365"])
    parser.add_argument("--stream", type=Path, help="a shard folder: time its training stream instead")
    parser.add_argument("--batches", type=int, default=20, help="batches of 32 per pass (--stream)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stream:
        stream_table(args.stream, args.repeats, args.batches)
        return

    header = ("size", "path", "old views/s", "× bare", "new views/s", "× bare", "speed-up")
    print("{:<10} {:<12} {:>12} {:>7} {:>12} {:>7} {:>9}".format(*header))
    print("-" * 75)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, height = (int(x) for x in size.split("x"))
            shard = Path(tmp) / f"{size}.tar"
            write_shard(shard, product_views(args.views, width, height))
            runs: dict[str, Callable[[Path], int]] = {"bare": bare_decode}
            for name, target in (("clip", clip_target(width, height)), ("qwen", qwen_target(width, height))):
                runs[f"└ {name} decode"] = partial(reduced_decode, target)
            for name, proc in processors().items():
                fast = HFImageTransform(proc) if name == "clip" else QwenImageTransform(proc)
                runs[f"{name} old"] = partial(through, partial(processor_call, proc, name != "clip"), False)
                runs[f"{name} new"] = partial(through, fast, True)
            rate = best_rates(runs, shard, args.repeats)
            bare = rate["bare"]
            print(f"{size:<10} {'bare decode':<12} {bare:>12.1f} {1.0:>7.2f}")
            for name in ("clip", "qwen"):
                new = rate[f"└ {name} decode"]
                print(f"{size:<10} {'└ ' + name + ' decode':<12} {'':>12} {'':>7} {new:>12.1f} {new / bare:>7.2f}")
            for name in processors():
                old, new = rate[f"{name} old"], rate[f"{name} new"]
                print(f"{size:<10} {name:<12} {old:>12.1f} {old / bare:>7.2f} {new:>12.1f} {new / bare:>7.2f} "
                      f"{new / old:>8.1f}×")

if __name__ == "__main__":
    main()
