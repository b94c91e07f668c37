"""Lightning-free retrieval: exact search, Recall@K, faiss gallery indexes (exact, approximate,
multi-vector), distributed gathers.

Nothing here knows about models or the Trainer, so a service or a script can search a gallery
with the same code that evaluation uses.
"""

from .ann import PRESETS, IndexKind, build_faiss_index, factory_for
from .distributed import gather_objects, gather_with_grad, is_distributed
from .gallery_index import GalleryIndex
from .recall import GalleryProtocol, RecallAtK
from .search import Backend, maxsim, resolve_backend, similarities, target_ranks, topk

__all__ = ["PRESETS", "Backend", "GalleryIndex", "GalleryProtocol", "IndexKind", "RecallAtK", "build_faiss_index",
           "factory_for", "gather_objects", "gather_with_grad", "is_distributed", "maxsim", "resolve_backend",
           "similarities", "target_ranks", "topk"]
