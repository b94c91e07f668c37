"""A ModelCheckpoint whose "best" can never be a degenerate model.

Recall@K ranks ties pessimistically, so constant or zero embeddings score 0 and NaN embeddings
stop the evaluation; still, a run's first evaluation is always admitted into an empty top-k by
Lightning, whatever its score. A collapsed first epoch (ProCIR without warm-up, say) would then be
``best_model_path`` until something beats it, and ``cir validate --ckpt best`` would load it. Here a
checkpoint enters the top-k only when its monitored score is finite and above the floor metric of
the same evaluation (by default its own chance line), so a model that ranks no better than chance
is never called best; ``last.ckpt`` is written as before.

The check sits in ``_save_topk_checkpoint``, Lightning's own (private) step between the monitored
value and the top-k bookkeeping, so the rest of ModelCheckpoint's behaviour is untouched; the
tests run it through a real Trainer, so a Lightning release that renames it fails them loudly.
"""

from __future__ import annotations

import math

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) plus ``floor``: the logged metric a checkpoint's
    monitored value must exceed to enter the top-k (``None``: only a finite value is required)."""

    def __init__(self, *args: object, floor: str | None = "val/chance/score", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.floor = floor
        self.refused: list[str] = []
        self._warned = False  # why each refused evaluation was refused, for the run's logs and tests

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if self.monitor is not None and self.monitor in monitor_candidates:
            value = float(monitor_candidates[self.monitor])
            floor = monitor_candidates.get(self.floor) if self.floor else None
            if self.floor and floor is None and not self._warned:
                self._warned = True
                rank_zero_warn(f"BestCheckpoint: the floor metric {self.floor!r} was not logged; checkpoints are kept "
                               "on a finite score alone (set floor to a logged metric, or floor: null)")
            reason = ""
            if not math.isfinite(value):
                reason = f"{self.monitor} = {value} is not finite"
            elif floor is not None and self.mode == "max" and value <= float(floor):
                reason = f"{self.monitor} = {value:.4f} is not above {self.floor} = {float(floor):.4f}"
            if reason:
                self.refused.append(reason)
                rank_zero_info(f"BestCheckpoint: epoch {trainer.current_epoch} not kept as a best checkpoint: {reason}")
                return
        super()._save_topk_checkpoint(trainer, monitor_candidates)
