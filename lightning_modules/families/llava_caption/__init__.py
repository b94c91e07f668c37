"""LLaVA-caption CIR: MLLM captions of the reference joined to the modification text, a frozen
caption encoder for targets, hybrid negatives, two stages; with its captioners, prompts, lexicon
and the offline caption job."""

from .captioners import Captioner, ChatCaptioner, LlavaCaptioner, OracleCaptioner, QwenCaptioner, ServedCaptioner
from .model import LLaVACaptionCIR
from .prompted_text import SentencePromptEncoder

__all__ = ["Captioner", "ChatCaptioner", "LLaVACaptionCIR", "LlavaCaptioner", "OracleCaptioner", "QwenCaptioner",
           "SentencePromptEncoder", "ServedCaptioner"]
