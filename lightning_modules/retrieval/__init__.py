"""Lightning-free retrieval: exact search, Recall@K, faiss gallery indexes, distributed gathers.

Nothing here knows about models or the Trainer, so a service or a script can search a gallery
with the same code that evaluation uses.
"""

from .distributed import gather_objects, gather_with_grad, is_distributed
from .gallery_index import GalleryIndex, IndexKind, build_faiss_index
from .recall import GalleryProtocol, RecallAtK
from .search import Backend, maxsim, resolve_backend, similarities, target_ranks, topk

__all__ = ["Backend", "GalleryIndex", "GalleryProtocol", "IndexKind", "RecallAtK", "build_faiss_index",
           "gather_objects", "gather_with_grad", "is_distributed", "maxsim", "resolve_backend", "similarities",
           "target_ranks", "topk"]
