"""LLaVA-caption CIR: MLLM captions of the reference joined to the modification text, a frozen
caption encoder for targets, hybrid negatives, two stages; with its captioners, prompts, lexicon
and the offline caption job."""

from .captioners import Captioner, ChatCaptioner, LlavaCaptioner, OracleCaptioner, QwenCaptioner, ServedCaptioner
from .model import LLaVACaptionCIR

__all__ = ["Captioner", "ChatCaptioner", "LLaVACaptionCIR", "LlavaCaptioner", "OracleCaptioner", "QwenCaptioner",
           "ServedCaptioner"]
