"""``cir compare``: MLflow runs of an experiment as a table, in the layout of the papers'.

    cir compare --experiment fashion-cir [--k 5 10] [--filter "tags.family = 'CLIP4CIR'"] [--out DIR]
    cir compare --experiment fashionmv-baselines --layout table2      # the FashionMV paper's Table 2
    cir compare --experiment fashioniq --layout fashioniq             # the LLaVA paper's Table 1

``--layout runs`` (the default, an ablation table): one row per run with its name, the variant
switches (MLflow tags ``variant.*``, ✓ when on), Recall@K per dataset, their average, the same
average of the run's own text-blind line (``val/<dataset>/text_blind/recall_at_K``: the query
without its text), the gain over it (what reading the text adds, in points), and wall time.
``--layout table2``: model, parameters, multi-view strategy (the runs' ``model``, ``parameters``
and ``strategy`` tags), R@5 and R@10 per dataset, their averages over datasets and the overall
average. ``--layout fashioniq``: the same with R@10 and R@50 per category. The best value of each
metric column is marked ``*``. Printed, and written as ``compare.csv`` and ``compare.md``. Works on
any tracking URI (``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from callbacks.mlflow_logging import resolve_tracking_uri
from lightning_modules.retrieval.recall import DATASET_PATTERN

from .args import command_parser, parse
from .reported import TABLE2, table2_recalls

# ``val/<dataset>/recall_at_K``; ``val/text_blind/recall_at_K`` and the other reference lines are not datasets.
_RECALL = re.compile(rf"^val/(?P<ds>{DATASET_PATTERN})/recall_at_(?P<k>\d+)$")


def _switch(value: str) -> str:
    return {"true": "✓", "false": ""}.get(value.lower(), value)


PAPER_LAYOUTS = {"table2": (5, 10), "fashioniq": (10, 50)}


def _params(value: str) -> str:
    try:
        n = float(value)
    except ValueError:
        return value
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _mark_best(rows: list[list[Any]], first: int, count: int, percent_until: int) -> list[list[str]]:
    """Floats as text (recalls in %), the best of each metric column marked ``*``."""
    best = {}
    for c in range(first, first + count):
        column = [row[c] for row in rows if row[c] is not None]
        best[c] = max(column) if column else None
    out = []
    for row in rows:
        cells = []
        for c, v in enumerate(row):
            if isinstance(v, float):
                text = f"{100 * v:.1f}" if c < percent_until else f"{v:.1f}"
                cells.append(text + ("*" if best.get(c) is not None and v == best[c] else ""))
            else:
                cells.append("" if v is None else str(v))
        out.append(cells)
    return out


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def paper_table(runs: list[Any], ks: tuple[int, ...],
                reported: list[tuple[str, str, str, dict[str, float]]] = ()) -> tuple[list[str], list[list[str]]]:
    """The papers' comparison layout: model, parameters, strategy, R@K per dataset, per-K averages
    over the datasets and their overall average. ``reported``: published rows (model, parameters,
    strategy, ``{"{dataset}/recall_at_{k}": fraction}``) printed after the runs, marked "(paper)"."""
    datasets = sorted({m["ds"] for r in runs for key in r.data.metrics if (m := _RECALL.match(key))})
    header = ["model", "params", "strategy", *(f"{ds} R@{k}" for ds in datasets for k in ks),
              *(f"avg R@{k}" for k in ks), "overall"]
    sources = [(tags.get("model") or r.info.run_name or r.info.run_id[:8], _params(tags.get("parameters", "")),
                tags.get("strategy", ""), {k.removeprefix("val/"): v for k, v in r.data.metrics.items()})
               for r in runs for tags in (r.data.tags,)]
    sources += [(f"{model} (paper)", params, strategy, recalls) for model, params, strategy, recalls in reported]
    rows: list[list[Any]] = []
    for model, params, strategy, metrics in sources:
        values = [metrics.get(f"{ds}/recall_at_{k}") for ds in datasets for k in ks]
        averages = [_mean([metrics.get(f"{ds}/recall_at_{k}") for ds in datasets]) for k in ks]
        rows.append([model, params, strategy, *values, *averages, _mean(averages)])
    n_metrics = len(header) - 3
    return header, _mark_best(rows, 3, n_metrics, 3 + n_metrics)


def build_table(runs: list[Any], ks: list[int]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, metric columns) for ``runs`` (MLflow ``Run`` objects)."""
    switches = sorted({k.removeprefix("variant.") for r in runs for k in r.data.tags if k.startswith("variant.")})
    datasets = sorted({m["ds"] for r in runs for key in r.data.metrics if (m := _RECALL.match(key))})
    metric_cols = [f"{ds} R@{k}" for ds in datasets for k in ks]
    header = ["run", "stage", "family", *switches, *metric_cols, "avg", "text-blind avg", "gain", "minutes"]
    rows: list[list[Any]] = []
    for r in runs:
        values = [r.data.metrics.get(f"val/{ds}/recall_at_{k}") for ds in datasets for k in ks]
        avg = _mean(values)
        # The gain is taken over the cells where both lines were logged (runs from before the
        # text-blind line have none: blank, not a made-up zero).
        pairs = [(v, r.data.metrics.get(f"val/{ds}/text_blind/recall_at_{k}"))
                 for (ds, k), v in zip([(d, k) for d in datasets for k in ks], values, strict=True)]
        pairs = [(v, b) for v, b in pairs if v is not None and b is not None]
        blind = _mean([b for _, b in pairs])
        gain = _mean([v for v, _ in pairs]) - blind if blind is not None else None
        minutes = (r.info.end_time - r.info.start_time) / 60000 if r.info.end_time else None
        rows.append([r.info.run_name or r.info.run_id[:8], r.data.tags.get("stage", ""), r.data.tags.get("family", ""),
                     *(_switch(r.data.tags.get(f"variant.{s}", "")) for s in switches), *values, avg, blind, gain,
                     minutes])
    first_metric = 3 + len(switches)
    n_metrics = len(metric_cols) + 1
    percent_until = first_metric + n_metrics + 2  # the text-blind average and the gain are recalls too
    return (header, _mark_best(rows, first_metric, n_metrics, percent_until),
            [*metric_cols, "avg"])


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("*", "") if not c.endswith("*") else f"**{c[:-1]}**" for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def to_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import mlflow

    parser = command_parser("compare", __doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10],
                        help="the K of the Recall@K columns (runs layout)")
    parser.add_argument("--layout", choices=["runs", *PAPER_LAYOUTS], default="runs",
                        help="runs: an ablation table; table2: FashionMV's Table 2 (R@5/R@10); fashioniq: the "
                        "LLaVA paper's Table 1 (R@10/R@50)")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.family = 'ProCIR'\"")
    parser.add_argument("--reported", action="store_true",
                        help="table2: add the FashionMV paper's own Table 2 rows, marked (paper), for datasets "
                        "named as in the converted release (deepfashion, f200k, fashiongen_val)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", default="outputs/compare", help="folder for compare.csv and compare.md")
    args, _ = parse(parser, argv)

    client = mlflow.MlflowClient(resolve_tracking_uri(args.tracking_uri))
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise SystemExit(f"cir compare: no MLflow experiment {args.experiment!r} at {client.tracking_uri}; "
                         f"it has {names}")
    runs = [r for r in client.search_runs([exp.experiment_id], args.filter, max_results=5000)
            if any(_RECALL.match(k) for k in r.data.metrics)]
    if not runs:
        raise SystemExit(f"cir compare: no run of {args.experiment!r} logged per-dataset recalls")
    if args.layout == "runs":
        header, rows, _ = build_table(runs, args.k)
    else:
        reported = []
        if args.reported and args.layout == "table2":
            reported = [(m, p, strategy, table2_recalls(v)) for m, p, strategy, v in TABLE2]
        elif args.reported:
            raise SystemExit("cir compare: --reported holds the FashionMV paper's Table 2 only (--layout table2)")
        header, rows = paper_table(runs, PAPER_LAYOUTS[args.layout], reported)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    (out / "compare.md").write_text(to_markdown(header, rows) + "\n")
    print(to_text(header, rows))
    print(f"\n(* best per column; recalls in %; written to {out / 'compare.csv'} and {out / 'compare.md'})")

