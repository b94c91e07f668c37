"""How much a multi-view model relies on the source's other views: Recall@K on the view-incomplete
queries (the change cannot be seen in the source's first view) and on the rest, with every view of
the source and with its first view only.

    python benchmarks/view_incompleteness.py --config EXP --ckpt CKPT [-- --data.init_args.data_dir=...]
    python benchmarks/view_incompleteness.py --config experiments/demos/clip4cir.yaml --untrained \\
        -- --data.init_args.data_dir=/tmp/vi-data --data.init_args.products=300 --data.init_args.num_workers=0

Nothing is trained: the experiment's model gets the checkpoint's weights (or keeps its initial ones
with ``--untrained``, which only shows that the script runs) and is evaluated twice under the
experiment's protocol (``model.init_args.evaluation``) with ``trainer.validate``: once as usual, once
with ``data.init_args.query_views=first`` (each query keeps its source's first view; the gallery
stays whole). The view-incomplete rows are the evaluation's own ``val/view_incomplete/recall_at_K``;
the other rows come from it and the pooled ``val/recall_at_K`` with the query counts. The text-blind
line (each query replaced by its source's gallery embedding, so it does not depend on the query's
views) is printed for reference. Needs data whose triplets carry ``view_incomplete`` (the generator
from version 4); arguments after ``--`` go to the experiment's CLI.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from typing import Any

from lightning_modules.retrieval.metric_names import DATASET_PATTERN

_QUERIES = re.compile(rf"^val/(?P<name>{DATASET_PATTERN})/queries$")


def evaluate(model: Any, dm: Any, query_views: str, accelerator: str, precision: str | None,
             limit: float | int) -> dict[str, float]:
    """Every metric one validation run logs, as floats, with the queries' views set to ``query_views``."""
    import lightning as L

    dm.hparams.query_views = query_views  # read when the loaders are built, at the start of validate
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, limit_val_batches=limit,
                        **({"precision": precision} if precision else {}))
    trainer.validate(model, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def split_rows(metrics: dict[str, float], ks: list[int], prefix: str = "") -> dict[str, list[float | None]]:
    """R@K of the view-incomplete queries, the rest, and all, from the pooled and flagged lines.
    ``prefix``: ``text_blind/`` for the text-blind line, whose queries are those with their source in
    the gallery; its "rest" assumes every flagged query is one (true of generated data)."""
    total = sum(v for k, v in metrics.items() if _QUERIES.match(k))
    if prefix:
        total = metrics.get("val/text_blind/queries", 0.0)
    flagged = metrics.get("val/view_incomplete/queries", 0.0)
    rows: dict[str, list[float | None]] = {"view-incomplete": [], "rest": [], "all": []}
    for k in ks:
        everything = metrics.get(f"val/{prefix}recall_at_{k}")
        incomplete = metrics.get(f"val/view_incomplete/{prefix}recall_at_{k}") if flagged else None
        rest = None
        if everything is not None and incomplete is not None and total > flagged:
            rest = (everything * total - incomplete * flagged) / (total - flagged)
        elif everything is not None and not flagged:
            rest = everything
        rows["view-incomplete"].append(incomplete)
        rows["rest"].append(rest)
        rows["all"].append(everything)
    return rows


def fmt(values: list[float | None], sign: bool = False) -> str:
    # round first: a difference of two equal recalls must not print as -0.000
    return " ".join((f"{round(v, 3) + 0.0:+6.3f}" if sign else f"{v:6.3f}") if v is not None else f"{'n/a':>6}"
                    for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="experiment config (repeatable)")
    parser.add_argument("--ckpt", help="checkpoint of the trained model")
    parser.add_argument("--untrained", action="store_true",
                        help="no checkpoint: evaluate the experiment's initial weights (a smoke run)")
    parser.add_argument("--split", help="split to evaluate (default: the data's val_split)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--precision", help="Lightning precision, e.g. bf16-mixed (default: the Trainer's)")
    parser.add_argument("--limit-val-batches", type=float, default=1.0,
                        help="as the Trainer's limit_val_batches (a fraction, or a count when > 1)")
    own, extra = (sys.argv[1:], []) if "--" not in sys.argv else (sys.argv[1:sys.argv.index("--")],
                                                                     sys.argv[sys.argv.index("--") + 1:])
    args = parser.parse_args(own)
    if bool(args.ckpt) == args.untrained:
        parser.error("give --ckpt CKPT, or --untrained to evaluate initial weights on purpose")

    from cir.models import load_model_and_data

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # two Trainers' banners
    start = time.perf_counter()
    model, dm = load_model_and_data(args.config, args.ckpt, extra)
    if args.split:
        dm.hparams.val_split = args.split
    limit = int(args.limit_val_batches) if args.limit_val_batches > 1 else args.limit_val_batches
    runs = {mode: evaluate(model, dm, mode, args.accelerator, args.precision, limit) for mode in ("all", "first")}
    dm.hparams.query_views = "all"

    ks = list(model.evaluation.top_k)
    metrics = runs["all"]
    total = sum(v for k, v in metrics.items() if _QUERIES.match(k))
    flagged = int(metrics.get("val/view_incomplete/queries", 0))
    print(f"experiment: {' '.join(args.config)}; weights: {args.ckpt or 'initial (--untrained)'}; "
          f"split: {dm.hparams.val_split}; source removed: {model.evaluation.remove_source}")
    print(f"queries: {int(total)} ({flagged} view-incomplete, {int(total) - flagged} rest); "
          f"{time.perf_counter() - start:.0f} s")
    if not flagged:
        print("no query is flagged view_incomplete: this data does not record it (generated data from version 4 "
              "does; real datasets do not)")
    head = " ".join(f"{'R@' + str(k):>6}" for k in ks)
    width = len(head)
    print(f"\n{'source views':<18} | {'view-incomplete':^{width}} | {'rest':^{width}} | {'all':^{width}}")
    print(f"{'':<18} | {head} | {head} | {head}")
    print("-" * (21 + 3 * (width + 3)))
    lines = [("all views", runs["all"], ""), ("first view only", runs["first"], ""),
             ("text-blind", runs["all"], "text_blind/")]
    rows = {}
    for label, values, prefix in lines:
        rows[label] = split_rows(values, ks, prefix)
        r = rows[label]
        print(f"{label:<18} | {fmt(r['view-incomplete'])} | {fmt(r['rest'])} | {fmt(r['all'])}")
    drop = {part: [(a - b) if a is not None and b is not None else None
                   for a, b in zip(rows["all views"][part], rows["first view only"][part], strict=True)]
            for part in ("view-incomplete", "rest", "all")}
    print(f"{'all - first':<18} | {fmt(drop['view-incomplete'], True)} | {fmt(drop['rest'], True)} | "
          f"{fmt(drop['all'], True)}")
    subset = [(mode, [runs[mode].get(f"val/recall_subset_at_{k}") for k in (1, 2, 3)]) for mode in runs]
    if all(v is not None for _, values in subset for v in values):
        print("\nRecall_subset@1/2/3 (all queries): " + "; ".join(
            f"{'all views' if mode == 'all' else 'first view only'} {fmt(values)}" for mode, values in subset))
    print("\nThe text-blind line uses the source's gallery embedding (all its views) in both passes.")


if __name__ == "__main__":
    main()
