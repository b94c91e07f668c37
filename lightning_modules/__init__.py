"""Model families, losses, metrics and backbones of fashion-cir."""

from .clip4cir import CLIP4CIR
from .fusion import Combiner, SumFusion, TransformerFusion
from .llava_caption_cir import LLaVACaptionCIR
from .losses import HybridNegativesLoss, StaticBankLoss, SymmetricInfoNCE
from .metrics import RecallAtK
from .procir import ProCIR
from .procir_sft import ProCIRSFT
from .retrieval import RetrievalEval, RetrievalModule
from .schedules import CosineSchedule

__all__ = ["CLIP4CIR", "Combiner", "CosineSchedule", "HybridNegativesLoss", "LLaVACaptionCIR", "ProCIR", "ProCIRSFT",
           "RecallAtK", "RetrievalEval", "RetrievalModule", "StaticBankLoss", "SumFusion", "SymmetricInfoNCE",
           "TransformerFusion"]
