"""Model families, losses, metrics and backbones of fashion-cir."""

from .clip4cir import CLIP4CIR
from .fusion import Combiner, SumFusion
from .losses import SymmetricInfoNCE
from .metrics import RecallAtK
from .retrieval import RetrievalModule

__all__ = ["CLIP4CIR", "Combiner", "RecallAtK", "RetrievalModule", "SumFusion", "SymmetricInfoNCE"]
