"""ProCIR (FashionMV paper): Qwen3.5 embeds whole multi-view products at ``<emb_all>``; the
two-stage dialogue, caption alignment, CoT with progressive caption removal, the SFT stage and
KV-cached interactive queries and multi-turn sessions."""

from .dialogue import ProCIRDialogues, Turn, keep_tokens
from .interactive import InteractiveEncoder, SourceCache
from .model import ProCIR, procir_optimizer
from .schedule import CoTRatioSchedule
from .session_cache import SessionEncoder, SessionState, SessionTooLong
from .sft import ProCIRSFT

__all__ = ["CoTRatioSchedule", "InteractiveEncoder", "ProCIR", "ProCIRDialogues", "ProCIRSFT", "SessionEncoder",
           "SessionState", "SessionTooLong", "SourceCache", "Turn", "keep_tokens", "procir_optimizer"]
