"""Prints the final evaluation metrics as a small table: each recall beside its reference lines,
the model's own text-blind line (the query without its text) and chance; then, when sessions were
evaluated, the same per turn (``{stage}/turn_{t}/...``)."""

from __future__ import annotations

import re

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from lightning_modules.retrieval.metric_names import DATASET_PATTERN

_RECALL = re.compile(rf"^(?P<stage>\w+)/(?:(?P<ds>{DATASET_PATTERN})/)?recall_at_(?P<k>\d+)$")
_TURN = re.compile(r"^(?P<stage>\w+)/turn_(?P<t>\d+)/recall_at_(?P<k>\d+)$")


def chance_recall(k: int, gallery_size: float) -> float:
    """Expected hit rate of a random ranking: K / |gallery| (capped at 1)."""
    return min(1.0, k / gallery_size) if gallery_size > 0 else float("nan")


def _chance(metrics: dict[str, float], stage: str, ds: str | None, k: int) -> float:
    """The logged chance line where the evaluation wrote one (it knows about removed sources), else
    K / gallery (query-weighted over datasets for the pooled row)."""
    logged = metrics.get(f"{stage}/{ds}/chance/recall_at_{k}" if ds else f"{stage}/chance/recall_at_{k}")
    if logged is not None:
        return logged
    if ds is not None:
        return chance_recall(k, metrics.get(f"{stage}/{ds}/gallery_size", 0.0))
    sizes = {n.split("/")[1]: v for n, v in metrics.items()
             if n.startswith(f"{stage}/") and n.endswith("/gallery_size")}
    counts = {d: metrics.get(f"{stage}/{d}/queries", 0.0) for d in sizes}
    total = sum(counts.values())
    return (sum(counts[d] * chance_recall(k, sizes[d]) for d in sizes) / total) if total else float("nan")


def format_table(metrics: dict[str, float], stage: str = "val") -> str:
    rows = []
    for name, value in metrics.items():
        m = _RECALL.match(name)
        if not m or m["stage"] != stage:
            continue
        ds, k = m["ds"], int(m["k"])
        blind = metrics.get(f"{stage}/{ds}/text_blind/recall_at_{k}" if ds else f"{stage}/text_blind/recall_at_{k}",
                            float("nan"))
        rows.append((ds or "all", k, value, blind, _chance(metrics, stage, ds, k)))
    if not rows:
        return f"(no {stage} recall metrics were logged)"
    rows.sort(key=lambda r: (r[0] != "all", r[0], r[1]))
    lines = [f"{'dataset':<16} {'K':>3} {'recall':>8} {'text-blind':>10} {'chance':>8} {'gain':>8}", "-" * 58]
    for ds, k, value, blind, chance in rows:
        lines.append(f"{ds:<16} {k:>3} {value:>8.4f} {blind:>10.4f} {chance:>8.4f} {value - blind:>+8.4f}")
    extra = [(n.split("/", 1)[1], v) for n, v in sorted(metrics.items())
             if n.startswith(f"{stage}/") and ("recall_subset_at_" in n or n.startswith(f"{stage}/view_incomplete/"))]
    if extra:
        lines += ["", *(f"{n:<40} {v:>8.4f}" for n, v in extra)]
    lines.append("(gain: recall minus the text-blind line, i.e. what reading the text adds)")
    return "\n".join(lines + turn_table(metrics, stage))


def turn_table(metrics: dict[str, float], stage: str = "val") -> list[str]:
    """Per-turn lines of the evaluated sessions (none when there were none)."""
    rows = sorted((int(m["t"]), int(m["k"]), value) for name, value in metrics.items()
                  if (m := _TURN.match(name)) and m["stage"] == stage)
    if not rows:
        return []
    lines = ["", "sessions, per turn (query: the session so far; answer: the turn's target)",
             f"{'turn':<6} {'K':>3} {'recall':>8} {'text-blind':>10} {'chance':>8} {'gain':>8} {'queries':>8}",
             "-" * 58]
    for t, k, value in rows:
        blind = metrics.get(f"{stage}/turn_{t}/text_blind/recall_at_{k}", float("nan"))
        chance = metrics.get(f"{stage}/turn_{t}/chance/recall_at_{k}", float("nan"))
        queries = metrics.get(f"{stage}/turn_{t}/queries", float("nan"))
        lines.append(f"{t:<6} {k:>3} {value:>8.4f} {blind:>10.4f} {chance:>8.4f} {value - blind:>+8.4f} "
                     f"{queries:>8.0f}")
    return lines


class MetricsTable(Callback):
    """At the end of fit/validate/test, prints Recall@K per dataset beside text-blind and chance."""

    def __init__(self, stage: str = "val") -> None:
        self.stage = stage

    def _metrics(self, trainer: Trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    @rank_zero_only
    def _print(self, trainer: Trainer, stage: str) -> None:
        print(f"\nfinal {stage} metrics (epoch {trainer.current_epoch}):\n" +
              format_table(self._metrics(trainer), stage), flush=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.fast_dev_run:
            self._print(trainer, self.stage)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer, "test")
