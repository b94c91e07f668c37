"""``cir compare``: MLflow runs of an experiment as a table, in the layout of the papers'.

    cir compare --experiment fashion-cir [--k 5 10] [--filter "tags.family = 'CLIP4CIR'"] [--out DIR]
    cir compare --experiment fashion-cir --layout table2 --reported   # the FashionMV paper's Table 2
    cir compare --experiment fashion-cir --layout fashioniq --filter "tags.dataset LIKE 'fashioniq%'"
    cir compare --experiment fashion-cir-sweeps                       # the trials of cir sweep

Every experiment config logs to the MLflow experiment fashion-cir (configs/logger/mlflow.yaml),
cir sweep to fashion-cir-sweeps.

``--layout runs`` (the default, an ablation table): one row per run with its name, the variant
switches (MLflow tags ``variant.*``, ✓ when on), Recall@K per dataset, their average, the same
average of the run's own text-blind line (``val/<dataset>/text_blind/recall_at_K``: the query
without its text), the gain over it (what reading the text adds, in points), for runs that
evaluated multi-turn sessions Recall@K per turn beside that turn's text-blind line
(``turn t R@K``, ``turn t blind R@K`` from ``val/turn_<t>/recall_at_K``), and wall time.
``--layout table2``: model, parameters, multi-view strategy (the runs' ``model``, ``parameters``
and ``strategy`` tags), R@5 and R@10 per dataset, their averages over datasets and the overall
average. ``--layout fashioniq``: the same with R@10 and R@50 per category. The best value of each
metric column is marked ``*``. An average or overall is left blank where a value it needs was not
logged, and a note below the table names what is missing. ``--reported`` adds the paper's rows only
when the runs evaluated a dataset the paper reports. Printed, and written as ``compare.csv`` and
``compare.md``. Works on any tracking URI (``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``, default
``sqlite:///mlflow.db``); a local store (an SQLite file, a folder) that does not exist is refused
rather than created empty.
"""

from __future__ import annotations

import csv
import difflib
import functools
import os
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from callbacks.tracking import resolve_tracking_uri
from lightning_modules.retrieval.metric_names import DATASET_PATTERN

from .args import command_parser, parse
from .reported import TABLE2, TABLE2_DATASETS, table2_recalls

RECALL_KEY = "val/<dataset>/recall_at_<K>"


@functools.cache
def _recall() -> re.Pattern[str]:
    """``val/<dataset>/recall_at_K``; ``val/text_blind/recall_at_K`` and the other reference lines are
    not datasets. Compiled on first use: ``cir compare --help`` builds its parser without model code."""
    return re.compile(rf"^val/(?P<ds>{DATASET_PATTERN})/recall_at_(?P<k>\d+)$")


_TURN = re.compile(r"^val/turn_(?P<t>\d+)/recall_at_(?P<k>\d+)$")


def run_turns(runs: Sequence[Any]) -> list[int]:
    """The session turns (1-based) the runs logged a per-turn recall of."""
    return sorted({int(m["t"]) for r in runs for key in r.data.metrics if (m := _TURN.match(key))})


def run_datasets(runs: Sequence[Any]) -> list[str]:
    """The datasets the runs logged a per-dataset recall of."""
    return sorted({m["ds"] for r in runs for key in r.data.metrics if (m := _recall().match(key))})


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
                reported: Sequence[tuple[str, str, str, dict[str, float]]] = ()
                ) -> tuple[list[str], list[list[str]], list[str]]:
    """The papers' comparison layout: model, parameters, strategy, R@K per dataset, per-K averages
    over the datasets and their overall average. ``reported``: published rows (model, parameters,
    strategy, ``{"{dataset}/recall_at_{k}": fraction}``) printed after the runs, marked "(paper)".

    An average needs every dataset's value and the overall every average: one made of what happens
    to be there (R@10 alone when no R@50 was logged) would read as the same number as a complete
    one. Such cells stay blank; the notes returned say what is missing.
    """
    datasets = run_datasets(runs)
    header = ["model", "params", "strategy", *(f"{ds} R@{k}" for ds in datasets for k in ks),
              *(f"avg R@{k}" for k in ks), "overall"]
    sources = [(tags.get("model") or r.info.run_name or r.info.run_id[:8], _params(tags.get("parameters", "")),
                tags.get("strategy", ""), {k.removeprefix("val/"): v for k, v in r.data.metrics.items()})
               for r in runs for tags in (r.data.tags,)]
    sources += [(f"{model} (paper)", params, strategy, recalls) for model, params, strategy, recalls in reported]
    rows: list[list[Any]] = []
    missing: dict[str, list[str]] = {}  # run → the cells it lacks (the paper's gaps: reported_rows' note)
    for i, (model, params, strategy, metrics) in enumerate(sources):
        values = [metrics.get(f"{ds}/recall_at_{k}") for ds in datasets for k in ks]
        averages = [_complete_mean([metrics.get(f"{ds}/recall_at_{k}") for ds in datasets]) for k in ks]
        rows.append([model, params, strategy, *values, *averages, _complete_mean(averages)])
        if i < len(runs):
            label = f"{model} ({strategy})" if strategy else model
            missing[label] = [f"{ds} R@{k}" for ds in datasets for k in ks
                              if metrics.get(f"{ds}/recall_at_{k}") is None]
    n_metrics = len(header) - 3
    return header, _mark_best(rows, 3, n_metrics, 3 + n_metrics), _missing_notes(missing, datasets, ks)


def _complete_mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else _mean(values)


def _missing_notes(missing: dict[str, list[str]], datasets: list[str], ks: tuple[int, ...]) -> list[str]:
    """What the blank cells lack: a K no run logged, in one line; then each run's own gaps."""
    labels = list(missing)
    notes = []
    for k in ks:
        cells = {f"{ds} R@{k}" for ds in datasets}
        if all(cells <= set(missing[label]) for label in labels):
            notes.append(f"no run logged R@{k} (val/<dataset>/recall_at_{k}; set model.init_args.evaluation.top_k "
                         f"to include {k}): the R@{k} columns, avg R@{k} and overall are blank")
            for label in labels:
                missing[label] = [c for c in missing[label] if c not in cells]
    gaps = [f"{label}: {', '.join(cells)}" for label, cells in missing.items() if cells]
    if gaps:
        notes.append("not logged, so the averages that need them are blank: " + "; ".join(gaps))
    return notes


def reported_rows(datasets: Sequence[str]) -> tuple[list[tuple[str, str, str, dict[str, float]]], list[str]]:
    """The FashionMV paper's Table 2 rows for a table of ``datasets``, and a note when they do not fit.

    The paper reports three datasets of FashionMV's release; beside runs on other data its rows would
    be all blank, so they are left out and the note says why."""
    shared = [ds for ds in datasets if ds in TABLE2_DATASETS]
    release = ", ".join(TABLE2_DATASETS)
    if not shared:
        return [], [f"--reported: no paper rows added: the FashionMV paper's Table 2 reports {release}; these "
                    f"runs evaluated {', '.join(datasets)}"]
    rows = [(m, p, strategy, table2_recalls(v)) for m, p, strategy, v in TABLE2]
    others = [ds for ds in datasets if ds not in TABLE2_DATASETS]
    notes = [f"--reported: the paper's rows have no numbers for {', '.join(others)} (it reports {release})"
             ] if others else []
    return rows, notes


def build_table(runs: list[Any], ks: list[int]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, metric columns) for ``runs`` (MLflow ``Run`` objects)."""
    switches = sorted({k.removeprefix("variant.") for r in runs for k in r.data.tags if k.startswith("variant.")})
    datasets = run_datasets(runs)
    metric_cols = [f"{ds} R@{k}" for ds in datasets for k in ks]
    # Multi-turn sessions: each turn's recall beside its own text-blind line (blank for runs without).
    turn_keys = [(f"turn {t}{line} R@{k}", f"val/turn_{t}/{prefix}recall_at_{k}") for t in run_turns(runs) for k in ks
                 for line, prefix in (("", ""), (" blind", "text_blind/"))]
    header = ["run", "stage", "family", *switches, *metric_cols, "avg", "text-blind avg", "gain",
              *(name for name, _ in turn_keys), "minutes"]
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
                     *(r.data.metrics.get(key) for _, key in turn_keys), minutes])
    first_metric = 3 + len(switches)
    n_metrics = len(metric_cols) + 1
    # The text-blind average, the gain and the per-turn columns are recalls too.
    percent_until = first_metric + n_metrics + 2 + len(turn_keys)
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


def missing_store(uri: str) -> Path | None:
    """The local file or folder ``uri`` names when nothing is there (MLflow would create an empty
    store and report no experiments); None for a store that exists or is not local (a server)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////absolute.db; sqlite:// alone is an in-memory database.
        path = uri.split("://", 1)[1].split("?", 1)[0].removeprefix("/")
        return Path(path) if path and path != ":memory:" and not Path(path).exists() else None
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # a folder (C: is a drive, not a scheme)
        path = parsed.path if parsed.scheme == "file" else uri
        return Path(path) if not Path(path).exists() else None
    return None


def _uri_source(given: str | None) -> str:
    if given:
        return "--tracking-uri"
    return "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking URI"


def store_contents(client: Any) -> str:
    """The store's experiments with their run counts, e.g. ``fashion-cir (12 runs), Default (0 runs)``."""
    limit = 1000
    parts = []
    for exp in client.search_experiments():
        n = len(client.search_runs([exp.experiment_id], max_results=limit))
        parts.append(f"{exp.name} ({n}{'+' if n == limit else ''} run{'' if n == 1 else 's'})")
    return ", ".join(parts) or "none"


def no_recalls(experiment: str, runs: Sequence[Any], flt: str, contents: str) -> str:
    """Why no run can be tabled, from what the experiment holds: no runs, or runs without per-dataset recalls."""
    where = f"{experiment!r}" + (f" matching --filter {flt!r}" if flt else "")
    if not runs:
        return f"no run of {where}; the store's experiments: {contents}"
    metrics = sorted({k for r in runs for k in r.data.metrics})
    shown = ", ".join(metrics[:8]) + (f" (+{len(metrics) - 8} more)" if len(metrics) > 8 else "")
    logged = f"they logged {shown}" if metrics else "they logged no metrics"
    return (f"none of the {len(runs)} run{'' if len(runs) == 1 else 's'} of {where} logged a per-dataset recall "
            f"({RECALL_KEY}, from validation); {logged}")


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("compare", __doc__)
    parser.add_argument("--experiment", required=True,
                        help="MLflow experiment name (the configs log to fashion-cir, cir sweep to fashion-cir-sweeps)")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10],
                        help="the K of the Recall@K columns (runs layout)")
    parser.add_argument("--layout", choices=["runs", *PAPER_LAYOUTS], default="runs",
                        help="runs: an ablation table; table2: FashionMV's Table 2 (R@5/R@10); fashioniq: the "
                        "LLaVA paper's Table 1 (R@10/R@50)")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.family = 'ProCIR'\"")
    parser.add_argument("--reported", action="store_true",
                        help="table2: add the FashionMV paper's own Table 2 rows, marked (paper), for datasets "
                        "named as in the converted release (deepfashion, f200k, fashiongen_val)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store, e.g. sqlite:///mlflow.db, a folder, http://host:5000 (default: "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--out", default="outputs/compare", help="folder for compare.csv and compare.md")
    args, _ = parse(parser, argv)
    if args.reported and args.layout != "table2":
        raise SystemExit("cir compare: --reported holds the FashionMV paper's Table 2 only (--layout table2)")

    uri = resolve_tracking_uri(args.tracking_uri)
    if (path := missing_store(uri)) is not None:
        raise SystemExit(f"cir compare: no MLflow store at {path.absolute()} ({uri}, from "
                         f"{_uri_source(args.tracking_uri)}); "
                         "nothing was logged there: point --tracking-uri at the store your runs went to")

    import mlflow  # here, not at the top: the help needs none of it

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        close = difflib.get_close_matches(args.experiment, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SystemExit(f"cir compare: no MLflow experiment {args.experiment!r} at {uri}{hint}; its experiments: "
                         f"{store_contents(client)}")
    found = client.search_runs([exp.experiment_id], args.filter, max_results=5000)
    runs = [r for r in found if any(_recall().match(k) for k in r.data.metrics)]
    if not runs:
        raise SystemExit(f"cir compare: {no_recalls(args.experiment, found, args.filter, store_contents(client))}")
    notes: list[str] = []
    if args.layout == "runs":
        header, rows, _ = build_table(runs, args.k)
    else:
        reported: list[tuple[str, str, str, dict[str, float]]] = []
        if args.reported:
            reported, notes = reported_rows(run_datasets(runs))
        header, rows, missing = paper_table(runs, PAPER_LAYOUTS[args.layout], reported)
        notes += missing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    (out / "compare.md").write_text(to_markdown(header, rows) + "\n" + "".join(f"\nNote: {n}\n" for n in notes))
    print(to_text(header, rows))
    print(f"\n(* best per column; recalls in %; written to {out / 'compare.csv'} and {out / 'compare.md'})")
    for note in notes:
        print(f"note: {note}")
