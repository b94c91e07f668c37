"""The interface of CoT's keep-ratio schedule, declared here so the model never imports a callback."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class CoTRatioSchedule(Protocol):
    """Sets ``cot_keep_ratio`` on the model before every training step (``callbacks.CoTSchedule``)."""

    removal_fraction: float

    def keep_ratio_at(self, step: int, total_steps: int) -> float:
        """ρ at optimizer step ``step`` of a run of ``total_steps``."""
        ...
