"""The 16 ProCIR ablations (paper Table 3: MT, Align, CoT × pretrained or SFT initialisation) at the
training-quality tests' shortened scale, each beside its own text-blind line.

    python benchmarks/procir_ablations.py --out ablations.jsonl [--products 1500] [--seed 0] [--epochs 2]
    python benchmarks/procir_ablations.py --out after.jsonl --before before.jsonl   # two runs side by side

The experiment files under ``experiments/procir/ablations/`` set the paper's 0.8B model on
FashionMV; this script runs the same switches on the tiny random Qwen3.5 over generated data
(``--products`` products, data and training seed ``--seed``), as
``tests/integration/test_training_quality.py::test_procir_mt_align_reads_the_text`` does for MT +
Align: ``--epochs`` epochs at batch 32, lr 1e-3, 30 warm-up steps, gradient clip 1.0, CIRR's
protocol. The SFT rows start from one SFT stage (``--sft-epochs`` epochs of
``configs/model/procir/sft_tiny.yaml``'s settings on the same data), run once per invocation.

Each finished variant is appended to ``--out`` as one JSON line and skipped when the script is run
again, so a long sweep can be stopped and continued. The table printed at the end reads ``--out``.
Minutes per variant on a 2-core CPU: about 3-4.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import lightning as L
import torch

from callbacks import CoTSchedule
from datamodules import ShardDataModule
from lightning_modules import CosineSchedule, ProCIR, ProCIRSFT, RetrievalEval
from lightning_modules.backbones import QwenBackbone

KEYS = ("recall_at_1", "text_blind/recall_at_1", "recall_at_10", "text_blind/recall_at_10",
        "recall_subset_at_1", "text_blind/recall_subset_at_1", "chance/recall_at_1")


def variants() -> list[tuple[str, bool, bool, bool, bool]]:
    """(name, mt, align, cot, sft) in the ablation files' names and order."""
    out = []
    for sft, (mt, align, cot) in itertools.product((False, True), itertools.product((False, True), repeat=3)):
        parts = [p for p, on in (("mt", mt), ("align", align), ("cot", cot)) if on] or ["baseline"]
        out.append(("_".join(parts) + ("_sft" if sft else "_pretrained"), mt, align, cot, sft))
    return out


def trainer(root: Path, epochs: int, callbacks: list[L.Callback], validate: bool = True) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     callbacks=callbacks, default_root_dir=root, num_sanity_val_steps=0, gradient_clip_val=1.0,
                     check_val_every_n_epoch=epochs, enable_model_summary=False,
                     limit_val_batches=1.0 if validate else 0)


def datamodule(data: Path) -> ShardDataModule:
    return ShardDataModule(str(data), batch_size=32, eval_batch_size=64, num_workers=0, train_text="mixed")


def sft_stage(data: Path, work: Path, seed: int, epochs: int) -> Path:
    path = work / f"sft_{data.name}_epochs{epochs}.ckpt"  # the data folder's name carries products and seed
    if path.exists():
        return path
    L.seed_everything(seed)
    module = ProCIRSFT(QwenBackbone("tiny"), sample_fraction=1.0, caption_system_prompt=None,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0))
    run = trainer(work / "sft", epochs, [], validate=False)
    run.fit(module, datamodule=datamodule(data))
    partial = path.with_suffix(".partial")
    run.save_checkpoint(partial)
    partial.replace(path)  # a killed stage leaves no checkpoint that looks finished
    return path


def run_variant(data: Path, work: Path, seed: int, epochs: int, mt: bool, align: bool, cot: bool,
                sft: Path | None) -> dict[str, float]:
    torch.manual_seed(seed)
    L.seed_everything(seed)
    module = ProCIR(QwenBackbone("tiny"), two_stage_dialogue=mt, align=align, cot=cot,
                    sft_checkpoint=str(sft) if sft else None,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
                    scheduler=lambda o: CosineSchedule(o, warmup_steps=30),
                    evaluation=RetrievalEval(remove_source=True, score_k=(1, 5, 10)))
    run = trainer(work / "runs", epochs, [CoTSchedule(removal_fraction=0.5)] if cot else [])
    run.fit(module, datamodule=datamodule(data))
    return {k: round(float(run.callback_metrics[f"val/{k}"]), 4) for k in KEYS}


def table(rows: list[dict]) -> str:
    lines = ["| variant | R@1 vs text-blind | gain | R@10 vs text-blind | Recall_subset@1 vs text-blind | min |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['variant']} | {m['recall_at_1']:.3f} vs {m['text_blind/recall_at_1']:.3f} | "
                     f"{m['recall_at_1'] - m['text_blind/recall_at_1']:+.3f} | "
                     f"{m['recall_at_10']:.3f} vs {m['text_blind/recall_at_10']:.3f} | "
                     f"{m['recall_subset_at_1']:.3f} vs {m['text_blind/recall_subset_at_1']:.3f} | "
                     f"{r['seconds'] / 60:.1f} |")
    if rows:
        lines.append(f"\nchance R@1: {rows[0]['metrics']['chance/recall_at_1']:.4f}")
    return "\n".join(lines)


def compare(before: list[dict], after: list[dict]) -> str:
    """Before/after rows of the variants both files hold: R@1 and its gain over the text-blind line."""
    old = {r["variant"]: r["metrics"] for r in before}
    lines = ["| variant | R@1 vs text-blind, before | after | gain before → after | Recall_subset@1 before → after |",
             "|---|---|---|---|---|"]
    gains = []
    for r in after:
        if r["variant"] not in old:
            continue
        b, a = old[r["variant"]], r["metrics"]
        gb, ga = b["recall_at_1"] - b["text_blind/recall_at_1"], a["recall_at_1"] - a["text_blind/recall_at_1"]
        gains.append((gb, ga))
        lines.append(f"| {r['variant']} | {b['recall_at_1']:.3f} vs {b['text_blind/recall_at_1']:.3f} | "
                     f"{a['recall_at_1']:.3f} vs {a['text_blind/recall_at_1']:.3f} | {gb:+.3f} → {ga:+.3f} | "
                     f"{b['recall_subset_at_1']:.3f} → {a['recall_subset_at_1']:.3f} |")
    if gains:
        n = len(gains)
        above = (sum(g > 0 for g, _ in gains), sum(g > 0 for _, g in gains))
        lines.append(f"\nmean gain over {n} variants: before {sum(g for g, _ in gains) / n:+.3f}, after "
                     f"{sum(g for _, g in gains) / n:+.3f}; gain above zero: before {above[0]}/{n}, "
                     f"after {above[1]}/{n}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per finished variant")
    parser.add_argument("--work", type=Path, default=Path("outputs/procir_ablations"))
    parser.add_argument("--products", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sft-epochs", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="variant names (default: all 16)")
    parser.add_argument("--before", type=Path, help="another run's --out file: print both side by side and stop")
    args = parser.parse_args()
    if args.before:
        print(compare(_rows(args.before), _rows(args.out)))
        return

    from datamodules.synthetic import write_synthetic

    data = args.work / f"data_{args.products}_seed{args.seed}"
    if not (data / "manifest.json").exists():
        write_synthetic(data, products=args.products, seed=args.seed)
    settings = {"seed": args.seed, "epochs": args.epochs, "products": args.products}
    done = set()
    for row in _rows(args.out):
        if {k: row[k] for k in settings} != settings:
            raise SystemExit(f"{args.out} holds runs of {({k: row[k] for k in settings})}, this one is {settings}: "
                             "give another --out")
        done.add(row["variant"])
    for name, mt, align, cot, sft in variants():
        if name in done or (args.only and name not in args.only):
            continue
        start = time.perf_counter()
        sft_path = sft_stage(data, args.work, args.seed, args.sft_epochs) if sft else None
        metrics = run_variant(data, args.work, args.seed, args.epochs, mt, align, cot, sft_path)
        row = {"variant": name, "seed": args.seed, "epochs": args.epochs, "products": args.products,
               "metrics": metrics, "seconds": round(time.perf_counter() - start, 1)}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(table(_rows(args.out)))


def _rows(path: Path) -> list[dict]:
    """The finished variants of ``path``; a last line cut by a kill is left out (rerun: it is redone)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


if __name__ == "__main__":
    main()
