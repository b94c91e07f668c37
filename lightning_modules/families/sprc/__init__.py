"""SPRC: BLIP-2 sentence-level prompts fused with the relative caption, its three losses, and the
one-cycle schedule it trains with."""

from .losses import SPRCLoss
from .model import SPRC
from .schedule import OneCycleSchedule

__all__ = ["SPRC", "OneCycleSchedule", "SPRCLoss"]
