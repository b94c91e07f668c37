"""Training throughput of ProCIR (MT + Align, five views per product) and CLIP4CIR, with the speed
switches (``callbacks.Speedups``: torch.compile, Liger; gradient checkpointing) on and off.

    python benchmarks/train_throughput.py --scale tiny                    # CPU, tiny presets: ratios only
    python benchmarks/train_throughput.py --scale gpu --peak-tflops 989   # one H100 SXM (dense bf16 peak)
    python benchmarks/train_throughput.py --scale gpu --only procir --switches compile --data-path

Every row is a real Lightning ``fit`` of a fresh copy of the model, ``--warmup`` steps then
``--steps`` measured ones, on synthetic triplets built through the real transforms
(``datamodules.batching``: JPEG views decoded, the backbone's image transform, ``collate``) and
held in memory; ``--data-path`` decodes and transforms every step inside the DataLoader instead.
Columns: triplets/s and tokens/s (median wall time per step, the data wait included), model FLOPs
utilisation (FLOPs of one plain step counted by ``torch.utils.flop_counter``, per triplet, times
triplets/s, over ``--peak-tflops``), peak memory (CUDA: allocated by torch; CPU: the process's
RSS), padding (the share of padded positions in the language model's inputs for ProCIR; for
CLIP4CIR, of padded view slots and text positions), and what torch.compile did.

Scales: ``gpu`` is the paper's setting (Qwen3.5-0.8B architecture, random weights; 512² views;
ProCIR batch 16 and 160 in GradCache chunks of 16; CLIP ViT-B/32 architecture, random weights,
batch 128 and 1024; bf16 autocast); ``tiny`` the tiny presets at 128² views, ProCIR batch 4 and
16 (chunks of 4), CLIP4CIR batch 16 and 64, fp32: its absolute numbers mean nothing, its ratios
show what a switch does to the code path. The GradCache rows appear when the families take
``grad_cache_chunk``. ProCIR also gets a breakdown of where a plain step's time goes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import io
import itertools
import random
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from step_parts import PartTimer, StepMeter, step_flops
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

SWITCHES = ("compile", "liger", "checkpointing")


@dataclass(frozen=True)
class Scale:
    procir_preset: str
    clip_preset: str  # a preset name, or "vit-b32-random" (built here: no hub access needed)
    views_px: int
    procir_batches: tuple[tuple[int, int | None], ...]  # (batch, GradCache chunk or None)
    clip_batches: tuple[tuple[int, int | None], ...]
    precision: str


SCALES = {
    "gpu": Scale("qwen3.5-0.8b-random", "vit-b32-random", 512, ((16, None), (160, 16)),
                 ((128, None), (1024, None), (1024, 128)), "bf16-mixed"),
    "tiny": Scale("tiny", "tiny", 128, ((4, None), (16, 4)), ((16, None), (64, None), (64, 16)), "32-true"),
}


# -- data ------------------------------------------------------------------------------------------

class TripletPool:
    """Generated products (five views each, ``px`` pixels) as JPEG bytes, and their triplets."""

    def __init__(self, px: int, products: int, seed: int = 0) -> None:
        from datamodules.shards import encode_product
        from datamodules.synthetic import DatasetStyle, generate

        data = generate(products, seed=seed, styles={"bench": DatasetStyle(size=px, min_views=5, max_views=5)})
        encoded = {}
        for split in ("train", "val"):
            for product in data.render(split):
                encoded[product.product_id] = encode_product(product)
        self.samples = []
        for t in data.triplets["train"] + data.triplets["val"]:
            (src_meta, src_views), (tgt_meta, tgt_views) = encoded[t.source_id], encoded[t.target_id]
            sample: dict[str, Any] = {"__key__": t.key, "json": {"triplet": t.meta(), "source": src_meta,
                                                                  "target": tgt_meta}}
            sample.update({f"src{i}.jpg": b for i, b in enumerate(src_views)})
            sample.update({f"tgt{i}.jpg": b for i, b in enumerate(tgt_views)})
            self.samples.append(sample)

    def batch(self, n: int, transform: Callable[[Image.Image], Any], rng: random.Random) -> dict[str, Any]:
        """``n`` triplets (drawn with replacement) decoded, transformed and collated as the DataModule does."""
        from datamodules.batching import TripletExample, collate

        example = TripletExample(transform, "mixed", seed=rng.randrange(2**31))
        decoded = []
        for sample in rng.choices(self.samples, k=n):
            decoded.append({k: Image.open(io.BytesIO(v)).convert("RGB") if k.endswith(".jpg") else v
                            for k, v in sample.items()})
        return collate([example(s) for s in decoded])


class Batches(IterableDataset):
    """``steps`` batches: the prebuilt ones in turn, or (``pool`` given) new ones built each step."""

    def __init__(self, steps: int, prebuilt: list[dict[str, Any]], pool: TripletPool | None, batch: int,
                 transform: Callable[[Image.Image], Any]) -> None:
        self.steps, self.prebuilt, self.pool, self.size, self.transform = steps, prebuilt, pool, batch, transform

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.pool is None:
            yield from itertools.islice(itertools.cycle(self.prebuilt), self.steps)
            return
        rng = random.Random(torch.utils.data.get_worker_info().id if torch.utils.data.get_worker_info() else 0)
        for _ in range(self.steps):
            yield self.pool.batch(self.size, self.transform, rng)


# -- models ----------------------------------------------------------------------------------------

def random_vit_b32(folder: Path) -> str:
    """CLIP ViT-B/32's architecture (transformers' CLIPConfig defaults) with random weights, saved
    where CLIPBackbone can load it: the hub is out of reach on a benchmark machine."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lightning_modules.backbones.tokenizer import build_word_tokenizer
    from lightning_modules.backbones.vocabulary import clip_words

    tok = build_word_tokenizer(clip_words(), model_max_length=77)
    text = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    CLIPModel(CLIPConfig(text_config=text, projection_dim=512)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return str(folder)


def build_procir(preset: str, px: int) -> L.LightningModule:
    from lightning_modules import ProCIR
    from lightning_modules.backbones import QwenBackbone

    backbone = QwenBackbone(preset, max_pixels=px * px, min_pixels=min(px * px, 128 * 128))
    return ProCIR(backbone, two_stage_dialogue=True, align=True, image_text_eval=False)


def build_clip4cir(name: str) -> L.LightningModule:
    from lightning_modules import CLIP4CIR, Combiner
    from lightning_modules.backbones import CLIPBackbone

    backbone = CLIPBackbone(name)
    return CLIP4CIR(backbone, fusion=Combiner(dim=backbone.dim))


def takes_grad_cache(family: str) -> bool:
    from lightning_modules import CLIP4CIR, ProCIR

    cls = ProCIR if family == "procir" else CLIP4CIR
    return "grad_cache_chunk" in inspect.signature(cls.__init__).parameters


def enable_checkpointing(model: L.LightningModule) -> None:
    """What ``QwenBackbone(gradient_checkpointing=True)`` does, on a copy that was built without it."""
    model.backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# -- tokens ----------------------------------------------------------------------------------------

@dataclass
class Tokens:
    """Real and padded positions of the inputs of measured steps (forwards with gradients only, so
    a GradCache step's no-grad first pass is not counted twice)."""

    real: int = 0
    padded: int = 0
    on: bool = False

    def add(self, real: int, padded: int) -> None:
        if self.on and torch.is_grad_enabled():
            self.real += real
            self.padded += padded


def count_dialogue_tokens(model: L.LightningModule, tokens: Tokens) -> None:
    builder = model.dialogue
    inner = builder.batch

    def batch(seqs: list[Any], device: Any, left_pad: bool = False) -> dict[str, Any]:
        tokens.add(sum(len(s.ids) for s in seqs), len(seqs) * max(len(s.ids) for s in seqs))
        return inner(seqs, device, left_pad)

    builder.batch = batch


def clip_token_counter(model: L.LightningModule, tokens: Tokens) -> Callable[[dict[str, Any]], None]:
    vision = model.backbone.model.config.vision_config
    per_view = (vision.image_size // vision.patch_size) ** 2 + 1
    tokenizer = model.backbone.tokenizer

    def count(batch: dict[str, Any]) -> None:
        masks = [batch["source_mask"], batch["target_mask"]]
        lengths = [len(ids) for ids in tokenizer(batch["text"], truncation=True)["input_ids"]]
        tokens.add(sum(int(m.sum()) for m in masks) * per_view + sum(lengths),
                   sum(m.numel() for m in masks) * per_view + len(lengths) * max(lengths))

    return count


class BatchTokens(L.Callback):
    def __init__(self, count: Callable[[dict[str, Any]], None]) -> None:
        self.count = count

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.count(batch)


# -- rows ------------------------------------------------------------------------------------------

@dataclass
class Result:
    family: str
    config: str
    switches: tuple[str, ...]
    triplets_per_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float | None = None
    peak_gib: float = 0.0
    padding: float = 0.0
    compile: str = "-"
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def trainer_for(device: str, precision: str, steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, precision=precision,
                     max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     callbacks=callbacks)


def run_row(family: str, config: str, base: L.LightningModule, chunk: int | None, switches: tuple[str, ...],
            loader_of: Callable[[int], DataLoader], args: argparse.Namespace, scale: Scale,
            flops_per_triplet: float | None) -> Result:
    from callbacks import Speedups

    result = Result(family, config, switches)
    model = copy.deepcopy(base)
    model.grad_cache_chunk = chunk  # model.init_args.grad_cache_chunk, on a copy of the one base model
    if "checkpointing" in switches:
        enable_checkpointing(model)
    tokens = Tokens()
    callbacks: list[L.Callback] = []
    if family == "procir":
        count_dialogue_tokens(model, tokens)
    else:
        callbacks.append(BatchTokens(clip_token_counter(model, tokens)))
    speedups = None
    if "compile" in switches or "liger" in switches:
        torch._dynamo.reset()  # this row's compile counts, not a cache filled by an earlier row
        speedups = Speedups(compile="compile" in switches, backend=args.compile_backend, liger="liger" in switches,
                            eager_modules=args.compile_eager if "compile" in switches else None,
                            report_after=args.warmup)
        callbacks.append(speedups)
    meter = StepMeter(args.warmup)
    meter.on_measure_start = lambda: setattr(tokens, "on", True)
    trainer = trainer_for(args.device, scale.precision, args.warmup + args.steps, [meter, *callbacks])
    try:
        trainer.fit(model, train_dataloaders=loader_of(args.warmup + args.steps))
    except torch.cuda.OutOfMemoryError:
        result.error = "out of memory"
        return result
    except Exception as exc:  # a switch that breaks the step is a result too (e.g. a compile bug)
        result.error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return result
    finally:
        del trainer
    # The median step, not the mean: on a shared machine one step slowed by a neighbour would
    # otherwise decide the row.
    steps, seconds = len(meter.times), statistics.median(meter.times)
    result.triplets_per_s = meter.triplets / steps / seconds
    result.tokens_per_s = tokens.real / steps / seconds
    result.padding = 1 - tokens.real / max(tokens.padded, 1)
    result.peak_gib = meter.peak_bytes / 2**30
    if flops_per_triplet and args.peak_tflops:
        result.mfu = flops_per_triplet * result.triplets_per_s / (args.peak_tflops * 1e12)
    if speedups is not None and speedups.compiled:
        r = speedups.report
        result.compile = f"{r.calls} calls, {r.graphs} graphs, {r.graph_breaks} breaks, {r.eager_frames} eager"
    return result


def switch_sets(family: str, device: str, wanted: list[str]) -> list[tuple[str, ...]]:
    """Each switch alone, then all together; Liger needs CUDA and an LLM, checkpointing a backbone that offers it."""
    offered = [s for s in wanted if s == "compile" or (family == "procir" and (s == "checkpointing" or (
        s == "liger" and device.startswith("cuda"))))]
    sets: list[tuple[str, ...]] = [(), *[(s,) for s in offered]]
    return sets + [tuple(offered)] if len(offered) > 1 else sets


def plain_step(model: L.LightningModule, batch: dict[str, Any], device: str, precision: str) -> Callable[[], Any]:
    def step() -> torch.Tensor:
        on_device = move_data_to_device(batch, device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
            return model.training_terms(model.embed_pair(on_device), on_device)["loss"]
    return step


def procir_parts() -> dict[str, Callable[[L.LightningModule], list[nn.Module]]]:
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Attention, Qwen3_5GatedDeltaNet, Qwen3_5MLP

    def of(kind: type) -> Callable[[L.LightningModule], list[nn.Module]]:
        return lambda m: [x for x in m.backbone.model.modules() if isinstance(x, kind)]

    return {"vision tower": lambda m: [m.backbone.model.model.visual],
            "linear-attention mixers (Gated DeltaNet)": of(Qwen3_5GatedDeltaNet),
            "full-attention mixers": of(Qwen3_5Attention), "decoder MLPs": of(Qwen3_5MLP),
            "loss (InfoNCE)": lambda m: [m.loss]}


def table(results: list[Result]) -> str:
    lines = ["| model | batch | switches | triplets/s | tokens/s | MFU | peak memory (GiB) | padding | torch.compile |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        switches = " + ".join(r.switches) or "none"
        if r.error:
            lines.append(f"| {r.family} | {r.config} | {switches} | {r.error} | | | | | |")
            continue
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        lines.append(f"| {r.family} | {r.config} | {switches} | {r.triplets_per_s:.2f} | {r.tokens_per_s:,.0f} | "
                     f"{mfu} | {r.peak_gib:.2f} | {100 * r.padding:.1f}% | {r.compile} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--device", default=None, help="default: cuda for --scale gpu, else cpu")
    p.add_argument("--only", choices=["procir", "clip4cir"], default=None)
    p.add_argument("--switches", nargs="*", choices=SWITCHES, default=list(SWITCHES))
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (compilation happens here)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--distinct-batches", type=int, default=2, help="prebuilt batches, used in turn")
    p.add_argument("--data-path", action="store_true", help="decode and transform every batch in the DataLoader")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers with --data-path")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for the precision used (H100 SXM bf16: 989); MFU is n/a without")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-eager", nargs="*", default=[], metavar="CLASS",
                   help="module classes left eager inside compiled blocks (Speedups' eager_modules)")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on a CPU: a shared CPU's ratios stay steadier; on a GPU "
                        "torch's choice)")
    args = p.parse_args()
    args.device = args.device or ("cuda" if args.scale == "gpu" else "cpu")
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    scale = SCALES[args.scale]
    L.seed_everything(0, verbose=False)
    torch.set_float32_matmul_precision("high")

    from lightning_modules.backbones.kernels import fast_kernels_status

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    data = "decoded every step" if args.data_path else "prebuilt in memory"
    print(f"device {args.device} ({name}, {torch.get_num_threads()} CPU threads), torch {torch.__version__}, precision "
          f"{scale.precision}, scale {args.scale}, {args.warmup} warm-up + {args.steps} measured steps, data {data}")
    print(f"linear-attention kernels: {fast_kernels_status().describe()}\n")
    families = [f for f in ("procir", "clip4cir") if args.only in (None, f)]
    results: list[Result] = []
    breakdown = None
    # Everything that reads transformers' classes happens before the first Liger row, which
    # replaces Qwen3.5's RMSNorm and MLP classes in transformers' module for the whole process.
    parts = procir_parts()
    with tempfile.TemporaryDirectory() as tmp:
        clip_name = random_vit_b32(Path(tmp)) if scale.clip_preset == "vit-b32-random" else scale.clip_preset
        bases = {f: build_procir(scale.procir_preset, scale.views_px) if f == "procir" else build_clip4cir(clip_name)
                 for f in families}
        pool = TripletPool(scale.views_px, products=48)
        for family in families:
            configs = scale.procir_batches if family == "procir" else scale.clip_batches
            flops_per_triplet = None
            base = bases.pop(family)
            for batch_size, chunk in configs:
                label = f"{batch_size}" + (f" (GradCache, chunks of {chunk})" if chunk else "")
                if chunk and not takes_grad_cache(family):
                    results.append(Result(family, label, (), error="n/a: no grad_cache_chunk in this checkout"))
                    continue
                transform = base.image_transform()
                rng = random.Random(batch_size)
                prebuilt = [] if args.data_path else [pool.batch(batch_size, transform, rng)
                                                      for _ in range(args.distinct_batches)]

                def loader_of(steps: int, prebuilt: list = prebuilt, batch_size: int = batch_size,
                              transform: Any = transform) -> DataLoader:
                    data = Batches(steps, prebuilt, pool if args.data_path else None, batch_size, transform)
                    return DataLoader(data, batch_size=None, collate_fn=lambda b: b, num_workers=args.workers)

                if flops_per_triplet is None and not chunk:
                    model = copy.deepcopy(base).to(args.device).train()
                    sample = prebuilt[0] if prebuilt else pool.batch(batch_size, transform, rng)
                    flops_per_triplet = step_flops(plain_step(model, sample, args.device, scale.precision)) / batch_size
                    del model
                    print(f"{family}: {flops_per_triplet / 1e12:.4f} TFLOP per triplet (one plain training step, "
                          "torch.utils.flop_counter; custom kernels not counted)", flush=True)
                for switches in switch_sets(family, args.device, args.switches):
                    result = run_row(family, label, base, chunk, switches, loader_of, args, scale, flops_per_triplet)
                    results.append(result)
                    print(table([result]).splitlines()[-1], flush=True)
                    gc.collect()
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                if family == "procir" and not chunk and not args.no_breakdown and breakdown is None:
                    timer = PartTimer(parts, args.warmup)
                    trainer = trainer_for(args.device, scale.precision, args.warmup + args.steps, [timer])
                    trainer.fit(copy.deepcopy(base), train_dataloaders=loader_of(args.warmup + args.steps))
                    breakdown = (label, timer.table())
            del base
    print(f"\n{table(results)}")
    if breakdown is not None:
        print(f"\nWhere a plain ProCIR step's time goes (batch {breakdown[0]}, no switches, every hook "
              "synchronising):\n")
        print(breakdown[1])


if __name__ == "__main__":
    main()
