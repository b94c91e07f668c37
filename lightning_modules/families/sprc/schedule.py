"""The one-cycle learning-rate schedule SPRC trains with, its length taken from the Trainer."""

from __future__ import annotations

import math

import torch

from ...core.schedules import CosineSchedule


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * progress) + 1)


class OneCycleSchedule(CosineSchedule):
    """torch's ``OneCycleLR`` with cosine annealing, as SPRC's script sets it up, without its need to
    know the run's length when the config is read.

    The LR rises from ``lr / div_factor`` to the optimizer's ``lr`` over the first ``pct_start`` of the
    run, then falls to ``lr / (div_factor · final_div_factor)``, both along half cosines; with
    ``cycle_momentum`` the first Adam beta (or SGD momentum) moves the opposite way between
    ``max_momentum`` and ``base_momentum``. It extends ``CosineSchedule`` for one reason: the model
    fills ``total_steps`` from the Trainer for that class (``core.optimisation.optimizer_config``).

    Args:
        total_steps: optimizer steps of the run (None: the Trainer's estimate).
        pct_start: share of the run spent rising (SPRC: 1.5 / epochs).
        div_factor: initial LR = lr / div_factor (SPRC: 100).
        final_div_factor: final LR = initial LR / final_div_factor (torch's default, 1e4).
        cycle_momentum, base_momentum, max_momentum: torch's defaults, which SPRC's script keeps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None, pct_start: float = 0.05,
                 div_factor: float = 100.0, final_div_factor: float = 1e4, cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95) -> None:
        problems = [f"pct_start={pct_start}: must be in (0, 1)"] if not 0 < pct_start < 1 else []
        problems += [f"{k}={v}: must be > 0" for k, v in (("div_factor", div_factor),
                                                          ("final_div_factor", final_div_factor)) if v <= 0]
        if problems:
            raise ValueError("model.init_args.scheduler.init_args: " + "; ".join(problems))
        self.pct_start = pct_start
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor
        self.cycle_momentum = cycle_momentum
        self.base_momentum = base_momentum
        self.max_momentum = max_momentum
        super().__init__(optimizer, total_steps=total_steps)

    def _phase(self, step: int) -> tuple[bool, float]:
        """(rising, progress within the phase) at ``step``, with torch's phase boundaries."""
        if self.total_steps is None:  # built before the model knows the run's length: the start
            return True, 0.0
        total = self.total_steps
        peak = float(self.pct_start * total) - 1
        if step <= peak:
            return True, step / peak if peak > 0 else 1.0
        return False, min(1.0, (step - peak) / max(total - 1 - peak, 1e-12))

    def factor(self, step: int) -> float:
        rising, progress = self._phase(step)
        initial = 1.0 / self.div_factor
        if rising:
            return _cosine(initial, 1.0, progress)
        return _cosine(1.0, initial / self.final_div_factor, progress)

    def momentum(self, step: int) -> float:
        rising, progress = self._phase(step)
        if rising:
            return _cosine(self.max_momentum, self.base_momentum, progress)
        return _cosine(self.base_momentum, self.max_momentum, progress)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if not self.cycle_momentum:
            return
        m = self.momentum(self.last_epoch)
        for group in self.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (m, *group["betas"][1:])
            elif "momentum" in group:
                group["momentum"] = m
