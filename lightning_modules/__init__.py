"""Model families, losses, metrics and backbones of fashion-cir."""

from .clip4cir import CLIP4CIR
from .fusion import Combiner, SumFusion, TransformerFusion
from .llava_caption_cir import LLaVACaptionCIR
from .losses import HybridNegativesLoss, StaticBankLoss, SymmetricInfoNCE
from .metrics import RecallAtK
from .retrieval import RetrievalEval, RetrievalModule

__all__ = ["CLIP4CIR", "Combiner", "HybridNegativesLoss", "LLaVACaptionCIR", "RecallAtK", "RetrievalEval",
           "RetrievalModule", "StaticBankLoss", "SumFusion", "SymmetricInfoNCE", "TransformerFusion"]
