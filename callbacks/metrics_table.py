"""Prints the final evaluation metrics as a small table, with the chance level next to each recall."""

from __future__ import annotations

import re

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

_RECALL = re.compile(r"^(?P<stage>\w+)/(?:(?P<ds>[\w\-]+)/)?recall_at_(?P<k>\d+)$")


def chance_recall(k: int, gallery_size: float) -> float:
    """Expected hit rate of a random ranking: K / |gallery| (capped at 1)."""
    return min(1.0, k / gallery_size) if gallery_size > 0 else float("nan")


def format_table(metrics: dict[str, float], stage: str = "val") -> str:
    rows = []
    for name, value in metrics.items():
        m = _RECALL.match(name)
        if not m or m["stage"] != stage:
            continue
        ds, k = m["ds"], int(m["k"])
        if ds is not None:
            chance = chance_recall(k, metrics.get(f"{stage}/{ds}/gallery_size", 0.0))
        else:  # all queries: chance is the query-weighted mean over datasets
            sizes = {n.split("/")[1]: v for n, v in metrics.items()
                     if n.startswith(f"{stage}/") and n.endswith("/gallery_size")}
            counts = {d: metrics.get(f"{stage}/{d}/queries", 0.0) for d in sizes}
            total = sum(counts.values())
            chance = (sum(counts[d] * chance_recall(k, sizes[d]) for d in sizes) / total) if total else float("nan")
        rows.append((ds or "all", k, value, chance))
    if not rows:
        return f"(no {stage} recall metrics were logged)"
    rows.sort(key=lambda r: (r[0] != "all", r[0], r[1]))
    lines = [f"{'dataset':<16} {'K':>3} {'recall':>8} {'chance':>8} {'× chance':>9}", "-" * 48]
    for ds, k, value, chance in rows:
        ratio = value / chance if chance and chance == chance else float("nan")
        lines.append(f"{ds:<16} {k:>3} {value:>8.4f} {chance:>8.4f} {ratio:>9.1f}")
    return "\n".join(lines)


class MetricsTable(Callback):
    """At the end of fit/validate/test, prints Recall@K per dataset against chance."""

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
