"""Lightning-free retrieval: exact search, Recall@K, faiss gallery indexes (exact, approximate,
multi-vector), distributed gathers.

Nothing here knows about models or the Trainer, so a service or a script can search a gallery
with the same code that evaluation uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.lazy import lazy_namespace

if TYPE_CHECKING:
    from .ann import PRESETS, IndexKind, build_faiss_index, factory_for
    from .distributed import gather_objects, gather_with_grad, is_distributed
    from .gallery_index import GalleryIndex
    from .recall import GalleryProtocol, RecallAtK
    from .search import Backend, maxsim, resolve_backend, similarities, target_ranks, topk

_EXPORTS = {
    "Backend": ".search",
    "GalleryIndex": ".gallery_index",
    "GalleryProtocol": ".recall",
    "IndexKind": ".ann",
    "PRESETS": ".ann",
    "RecallAtK": ".recall",
    "build_faiss_index": ".ann",
    "factory_for": ".ann",
    "gather_objects": ".distributed",
    "gather_with_grad": ".distributed",
    "is_distributed": ".distributed",
    "maxsim": ".search",
    "resolve_backend": ".search",
    "similarities": ".search",
    "target_ranks": ".search",
    "topk": ".search",
}
__all__ = ["Backend", "GalleryIndex", "GalleryProtocol", "IndexKind", "PRESETS", "RecallAtK", "build_faiss_index",
           "factory_for", "gather_objects", "gather_with_grad", "is_distributed", "maxsim", "resolve_backend",
           "similarities", "target_ranks", "topk"]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
