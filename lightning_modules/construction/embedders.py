"""The encoders behind stage 3's three retrieval paths: one image path, two caption paths.

``clip:<preset, hub id or folder>`` embeds images (a product is the normalised mean of its
normalised views) or texts; ``tfidf`` embeds texts as hashed TF-IDF vectors, which needs no weights
and reads a 400-word caption whole (CLIP's text tower stops at 77 tokens).
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..backbones.clip import CLIPBackbone
from .requests import load_view

TOKEN = re.compile(r"[a-z0-9]+")


class ImageEncoder(Protocol):
    name: str

    def encode(self, products: list[list[Path]]) -> np.ndarray: ...


class TextEncoder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class ClipEncoder:
    def __init__(self, name_or_path: str, device: str | None = None, batch_size: int = 64) -> None:
        self.name = f"clip:{name_or_path}"
        with torch.random.fork_rng():  # a random-weight preset (tests, demos) is the same model every run
            torch.manual_seed(0)
            self.clip = CLIPBackbone(name_or_path).eval()
        if device:
            self.clip.to(device)
        self.device = device or "cpu"
        self.batch_size = batch_size
        self.transform = self.clip.image_transform

    @torch.no_grad()
    def encode(self, products: list[list[Path]]) -> np.ndarray:
        flat = [(i, p) for i, views in enumerate(products) for p in views]
        feats = np.zeros((len(products), self.clip.dim), dtype=np.float32)
        for lo in range(0, len(flat), self.batch_size):
            chunk = flat[lo:lo + self.batch_size]
            pixels = []
            for _, path in chunk:
                pixels.append(self.transform(load_view(path)))
            out = self.clip.encode_images(torch.stack(pixels).to(self.device)).float().cpu().numpy()
            for (i, _), row in zip(chunk, _normalise(out), strict=True):
                feats[i] += row
        return _normalise(feats)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = [self.clip.encode_texts(texts[lo:lo + self.batch_size]).float().cpu().numpy()
                for lo in range(0, len(texts), self.batch_size)]
        return _normalise(np.concatenate(rows)) if rows else np.zeros((0, self.clip.dim), np.float32)


class ClipTextEncoder:
    def __init__(self, clip: ClipEncoder) -> None:
        self.clip, self.name = clip, clip.name

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.clip.encode_texts(texts)


class TfidfEncoder:
    """Hashed TF-IDF (sublinear term frequency), the document frequencies taken from the texts
    encoded together: a split's captions."""

    name = "tfidf"

    def __init__(self, dim: int = 2048) -> None:
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        docs = [Counter(TOKEN.findall(t.lower())) for t in texts]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        out = np.zeros((n, self.dim), dtype=np.float32)
        for i, doc in enumerate(docs):
            for w, tf in doc.items():
                out[i, zlib.crc32(w.encode()) % self.dim] += (1 + math.log(tf)) * math.log((1 + n) / (1 + df[w]))
        return _normalise(out)


def _load_clip(flag: str, spec: str, device: str | None) -> ClipEncoder:
    """A hub id (the default ``clip:clip-vit-b32`` is one) needs the network or the local cache, even
    for the oracle backend: offline, the one useful line is which option to change and to what."""
    try:
        return ClipEncoder(spec.removeprefix("clip:"), device)
    except OSError as exc:
        cause = exc.__cause__ or exc  # the loader's own error, not the backbone's paragraph around it
        first = str(cause).strip().split("\n")[0].split(". ")[0][:200]  # its first sentence says what failed
        reason = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
        raise OSError(f"{flag} {spec}: could not be loaded ({reason}); without network, pass {flag} "
                      "clip:<local folder written with save_pretrained>, or clip:tiny (random weights) for an "
                      "offline smoke run") from exc


def build_encoders(image_spec: str, text_spec: str, device: str | None) -> tuple[ImageEncoder, TextEncoder]:
    if not image_spec.startswith("clip:"):
        raise ValueError(f"--image-encoder {image_spec!r}: use clip:<preset, hub id or folder>, e.g. clip:clip-vit-b32")
    if text_spec != "tfidf" and not text_spec.startswith("clip:"):
        raise ValueError(f"--text-encoder {text_spec!r}: use tfidf or clip:<preset, hub id or folder>")
    image = _load_clip("--image-encoder", image_spec, device)
    if text_spec == "tfidf":
        return image, TfidfEncoder()
    same = text_spec == image_spec
    return image, ClipTextEncoder(image if same else _load_clip("--text-encoder", text_spec, device))
