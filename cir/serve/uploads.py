"""Photos of products added through ``POST /products``, kept where the page can show them.

Each product has a folder named by a hash of (dataset, id), so an id (slashes, ``..`` and all)
never becomes a path. A write puts the views and ``product.json`` in a new version folder inside
it, each file synced, and then points ``current`` at that version (an atomic rename): a kill
leaves the product's previous photos or its new ones, never a mixture. Folders without a
``current`` (a first upload killed midway, a removal cut short) and versions nothing points at
are removed when the store opens.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.atomic import atomic_write, fsync_path, write_json_atomic, write_text_atomic
from lightning_modules.backbones.images import open_upright

from .gallery import MEDIA_TYPES, UnknownProduct

CURRENT = "current"


@dataclass(frozen=True)
class Uploaded:
    dataset: str
    pid: str
    version: str
    views: list[str]  # file names inside the version folder, in view order
    category: str = ""
    title: str = ""


class UploadStore:
    """Uploaded products by (dataset, id). Writes are the caller's to serialise (one at a time)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._entries: dict[tuple[str, str], Uploaded] = {}
        self._lock = threading.Lock()
        if self.root.is_dir():
            for folder in self.root.iterdir():
                self._open(folder)

    def _open(self, folder: Path) -> None:
        pointer = folder / CURRENT
        try:
            version = pointer.read_text().strip()
            meta = json.loads((folder / version / "product.json").read_text())
            entry = Uploaded(meta["dataset"], meta["id"], version, list(meta["views"]), meta.get("category", ""),
                             meta.get("title", ""))
        except (OSError, ValueError, KeyError, TypeError):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)  # never pointed at: nothing was acknowledged
            return
        self._entries[(entry.dataset, entry.pid)] = entry
        for other in folder.iterdir():
            if other.is_dir() and other.name != version:
                shutil.rmtree(other, ignore_errors=True)

    def forget_unless(self, held: Callable[[str, str], bool]) -> int:
        """Removes the photos of products the store does not hold (a first upload killed after its
        photos were saved, before the store's write); returns how many."""
        orphans = [key for key in list(self._entries) if not held(*key)]
        for dataset, pid in orphans:
            self.remove(dataset, pid)
        return len(orphans)

    def folder(self, dataset: str, pid: str) -> Path:
        return self.root / hashlib.sha256(f"{dataset}\0{pid}".encode()).hexdigest()[:32]

    def has(self, dataset: str, pid: str) -> bool:
        return (dataset, pid) in self._entries

    def get(self, dataset: str, pid: str) -> Uploaded | None:
        return self._entries.get((dataset, pid))

    def ids(self, dataset: str) -> list[str]:
        return [pid for d, pid in list(self._entries) if d == dataset]

    def datasets(self) -> list[str]:
        return sorted({d for d, _ in list(self._entries)})

    def save(self, dataset: str, pid: str, files: list[tuple[bytes, str]], category: str = "",
             title: str = "") -> Uploaded | None:
        """The views (bytes as uploaded, and the format's extension) as the product's current
        photos, synced to disk; returns the entry they replace, for ``restore``."""
        folder = self.folder(dataset, pid)
        version = uuid.uuid4().hex[:12]
        target = folder / version
        target.mkdir(parents=True)
        for made in (self.root.parent, self.root, folder):  # each new folder's entry, durable
            fsync_path(made)
        names = []
        for n, (data, ext) in enumerate(files):
            names.append(f"view{n}.{ext}")
            atomic_write(target / names[-1], lambda f, data=data: f.write(data))
        entry = Uploaded(dataset, pid, version, names, category, title)
        write_json_atomic(target / "product.json", {"dataset": dataset, "id": pid, "views": names,
                                                    "category": category, "title": title})
        previous = self._entries.get((dataset, pid))
        write_text_atomic(folder / CURRENT, version)
        with self._lock:
            self._entries[(dataset, pid)] = entry
        return previous

    def restore(self, dataset: str, pid: str, previous: Uploaded | None) -> None:
        """Back to ``previous`` (None: no photos) after the write they were for failed."""
        if previous is None:
            self.remove(dataset, pid)
            return
        write_text_atomic(self.folder(dataset, pid) / CURRENT, previous.version)
        with self._lock:
            self._entries[(dataset, pid)] = previous

    def prune(self, dataset: str, pid: str, keep: Uploaded | None) -> None:
        """Removes versions but the current one and ``keep`` (the one a reader may still be reading)."""
        entry = self._entries.get((dataset, pid))
        folder = self.folder(dataset, pid)
        wanted = {e.version for e in (entry, keep) if e is not None}
        if folder.is_dir():
            for other in folder.iterdir():
                if other.is_dir() and other.name not in wanted:
                    shutil.rmtree(other, ignore_errors=True)

    def remove(self, dataset: str, pid: str) -> None:
        folder = self.folder(dataset, pid)
        with self._lock:
            self._entries.pop((dataset, pid), None)
        (folder / CURRENT).unlink(missing_ok=True)
        if folder.is_dir():
            fsync_path(folder)
            shutil.rmtree(folder, ignore_errors=True)

    def _paths(self, dataset: str, pid: str) -> tuple[Uploaded, list[Path]]:
        entry = self._entries.get((dataset, pid))
        if entry is None:
            raise UnknownProduct(f"no product {pid!r} in {dataset}")
        folder = self.folder(dataset, pid) / entry.version
        return entry, [folder / name for name in entry.views]

    def source(self, dataset: str, pid: str) -> tuple[list[Image.Image], str]:
        _, paths = self._paths(dataset, pid)
        try:
            return [open_upright(p) for p in paths], ""
        except FileNotFoundError:
            raise UnknownProduct(f"product {pid!r} of {dataset} was replaced meanwhile; retry") from None

    def describe(self, dataset: str, pid: str) -> dict[str, Any]:
        entry, _ = self._paths(dataset, pid)
        return {"id": pid, "dataset": dataset, "product_id": pid, "category": entry.category, "title": entry.title,
                "view_names": [Path(n).stem for n in entry.views], "attributes": {}, "uploaded": True,
                "captions": {"short": "", "long": "", "views": [], "query": ""}, "views": len(entry.views)}

    def view_image(self, dataset: str, pid: str, n: int) -> tuple[bytes, str]:
        _, paths = self._paths(dataset, pid)
        if not 0 <= n < len(paths):
            raise UnknownProduct(f"product {pid!r} of {dataset} has no view {n}")
        try:
            return paths[n].read_bytes(), MEDIA_TYPES[paths[n].suffix.lstrip(".")]
        except FileNotFoundError:
            raise UnknownProduct(f"product {pid!r} of {dataset} was replaced meanwhile; retry") from None
