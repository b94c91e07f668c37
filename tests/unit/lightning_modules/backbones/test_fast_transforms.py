"""The fast CLIP / BLIP / Qwen preprocessing against the Hugging Face processors it replaces.

Tolerance of the ``fast`` path, on the normalised scale (one 8-bit level is 0.0146 at CLIP's std,
0.0078 at Qwen3.5's 0.5), measured on generated product views and on real photos (matplotlib's and
scikit-learn's sample JPEGs) of 427-1365 px:

- a view decoded at full size (PNG, small JPEG) differs only by torch's resize: its weights'
  rounding (≤ 2 levels) and, where bicubic overshoot is clipped between the two 1-D passes, their
  order (torch and PIL may run them in opposite orders: up to 8 levels on 0.04% of the values of
  one photo). Bounds: 99.9th percentile ≤ 0.035, ``max ≤ 0.2``;
- a JPEG decoded at 1/2-1/8 scale gets the DCT's own low-pass in place of part of the bicubic
  one: mean abs 0.006-0.013 on product views, 0.013-0.033 on the photos; the largest single
  differences (0.16-0.67) sit on hard edges, where two low-pass filters differ most. Bounds here:
  ``mean ≤ 0.02`` (product views) and ``max ≤ 0.75``.

The ``exact`` path must equal the processors within float32 rounding (measured ≤ 5e-7): ``1e-5``.
"""

from __future__ import annotations

import io
import math
import pickle
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from datamodules.fast_decode import Decoded, LazyJpeg, open_view
from datamodules.synthetic.generate import generate
from datamodules.synthetic.render import render_view
from lightning_modules.backbones.clip import CLIPBackbone, HFImageTransform
from lightning_modules.backbones.fast_transforms import Preprocessing
from lightning_modules.backbones.qwen import PatchedImage, QwenImageTransform, image_processor

EXACT = 1e-5
FULL_SIZE_P999, FULL_SIZE_MAX = 0.035, 0.2
DRAFT_MEAN, DRAFT_MAX = 0.02, 0.75
EMBEDDING_SHIFT = 0.02


def product_view(width: int, height: int, seed: int) -> Image.Image:
    """A generated product view rendered at full resolution (pixel noise included), cut to size."""
    spec = list(generate(10, seed=0).products.values())[seed]
    img = render_view(spec.attributes, "front", height, random.Random(seed))
    left = (height - width) // 2
    return img.crop((left, 0, left + width, height))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as in a DataLoader worker (and no thread contention on a shared CI core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def views() -> dict[str, bytes]:
    """Encoded views: two JPEGs large enough for a reduced decode (``DRAFTED``), a PNG (never
    reduced) and a JPEG smaller than any model input here."""
    return {"jpeg 512x682": encode(product_view(512, 682, 0), "JPEG"),
            "jpeg 1024x1365": encode(product_view(1024, 1365, 1), "JPEG"),
            "png 512x682": encode(product_view(512, 682, 2), "PNG"),
            "jpeg 40x52 (under the model size)": encode(product_view(40, 52, 3), "JPEG")}


DRAFTED = {"jpeg 512x682", "jpeg 1024x1365"}


def qwen35_processor() -> Any:
    """The tiny preset's processor (16-px patches, merge 2, 2 frames, 128²..512² pixels) with the
    Qwen3.5 checkpoint's mean/std."""
    proc = image_processor(16, 2, 2)
    proc.image_mean, proc.image_std = [0.5] * 3, [0.5] * 3
    return proc


def gme_like_processor() -> Any:
    proc = image_processor(14, 2, 2)  # 14-px patches (Qwen2-VL), a smaller pixel range to stay fast
    proc.size = {"shortest_edge": 64 * 28 * 28, "longest_edge": 256 * 28 * 28}
    return proc


PROCESSORS: dict[str, Callable[[], Any]] = {
    "clip": CLIPImageProcessorPil,
    "blip": lambda: BlipImageProcessorPil(size={"height": 224, "width": 224}),
    "qwen3.5": qwen35_processor,
    "gme-like": gme_like_processor,
}


def transform(name: str, proc: Any, preprocessing: Preprocessing = "fast") -> HFImageTransform | QwenImageTransform:
    cls = HFImageTransform if name in ("clip", "blip") else QwenImageTransform
    return cls(proc, preprocessing)


def reference(name: str, proc: Any, data: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The processor on the fully decoded view: (pixel values, grid or None)."""
    out = proc(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")
    if name in ("clip", "blip"):
        return out["pixel_values"][0], None
    return out["pixel_values"], out["image_grid_thw"][0]


def as_pair(out: torch.Tensor | PatchedImage) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (out.pixel_values, out.grid_thw) if isinstance(out, PatchedImage) else (out, None)


@pytest.fixture(scope="module")
def references(views: dict[str, bytes]) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]]:
    procs = {name: make() for name, make in PROCESSORS.items()}
    return {(p, v): reference(p, procs[p], data) for p in procs for v, data in views.items()}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_both_paths_match_the_processor(name: str, views: dict[str, bytes], references: dict) -> None:
    proc = PROCESSORS[name]()
    for view, data in views.items():
        want, grid = references[(name, view)]
        exact, exact_grid = as_pair(transform(name, proc, "exact")(open_view(data)))
        fast, fast_grid = as_pair(transform(name, proc)(open_view(data)))
        assert exact.shape == fast.shape == want.shape, view
        if grid is not None:
            assert torch.equal(exact_grid, grid) and torch.equal(fast_grid, grid), view
        assert (exact - want).abs().max() <= EXACT, view
        diff = (fast - want).abs()
        if view in DRAFTED:
            assert diff.mean() <= DRAFT_MEAN and diff.max() <= DRAFT_MAX, (view, diff.mean(), diff.max())
        else:
            assert diff.quantile(0.999) <= FULL_SIZE_P999 and diff.max() <= FULL_SIZE_MAX, (view, diff.max())


@pytest.mark.parametrize("name", ["clip", "qwen3.5"])
def test_views_are_never_decoded_below_the_model_input(name: str, views: dict[str, bytes], references: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    returned: list[tuple[tuple[int, int], Decoded]] = []
    original = LazyJpeg.decode_at_least

    def spy(self: LazyJpeg, width: int, height: int) -> Decoded:
        returned.append((self.size, original(self, width, height)))
        return returned[-1][1]

    monkeypatch.setattr(LazyJpeg, "decode_at_least", spy)
    proc = PROCESSORS[name]()
    for view, data in views.items():
        returned.clear()
        transform(name, proc)(open_view(data))
        if view.startswith("png"):
            assert not returned  # decoded at once: nothing to reduce
            continue
        (full, decoded), = returned
        grid = references[(name, view)][1]
        # The resize target: Qwen's patch grid; CLIP's shortest edge 224 with the aspect ratio kept.
        need = (int(grid[2]) * 16, int(grid[1]) * 16) if grid is not None else (224, int(224 * full[1] / full[0]))
        # Covered (a view smaller than that is decoded whole) ...
        assert decoded.box[2] >= min(need[0], full[0]) and decoded.box[3] >= min(need[1], full[1]), view
        # ... at the deepest reduction that still covers it (brute force over libjpeg's scales).
        scale = max([s for s in (1, 2, 4, 8) if full[0] / s >= need[0] and full[1] / s >= need[1]], default=1)
        assert decoded.image.size == (math.ceil(full[0] / scale), math.ceil(full[1] / scale)), view
        if view.startswith("jpeg 40x52"):
            assert decoded.image.size == full


def test_transforms_pickle_and_accept_images_opened_from_files(views: dict[str, bytes], references: dict) -> None:
    data = views["jpeg 512x682"]
    for name in ("clip", "qwen3.5"):
        fast = pickle.loads(pickle.dumps(transform(name, PROCESSORS[name]())))
        from_file = as_pair(fast(Image.open(io.BytesIO(data))))[0]  # not lazy: decoded whole, as `cir query` does
        want = references[(name, "jpeg 512x682")][0]
        assert (from_file - want).abs().quantile(0.999) <= FULL_SIZE_P999
        assert torch.equal(as_pair(fast(open_view(data)))[0], as_pair(transform(name, PROCESSORS[name]())(
            open_view(data)))[0])


def test_settings_not_reproduced_go_through_the_processor(views: dict[str, bytes]) -> None:
    proc = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 80, "width": 80})  # crop pads
    view = Image.open(io.BytesIO(views["jpeg 512x682"])).convert("RGB")
    assert torch.equal(HFImageTransform(proc)(view), proc(images=view, return_tensors="pt")["pixel_values"][0])


def test_tiny_clip_embeddings_move_far_less_than_between_products(views: dict[str, bytes]) -> None:
    torch.manual_seed(0)
    backbone = CLIPBackbone("tiny").eval()  # 64-px input: the deepest reduction (1/8) for these views
    data = [views[v] for v in ("jpeg 512x682", "jpeg 1024x1365", "png 512x682")]
    fast = torch.stack([backbone.image_transform(open_view(d)) for d in data])
    old = torch.stack([backbone.processor(images=Image.open(io.BytesIO(d)).convert("RGB"),
                                          return_tensors="pt")["pixel_values"][0] for d in data])
    with torch.no_grad():
        new_emb, old_emb = backbone.encode_images(fast), backbone.encode_images(old)
    moved = 1 - torch.cosine_similarity(new_emb, old_emb)
    between = 1 - torch.cosine_similarity(old_emb[[0, 0, 1]], old_emb[[1, 2, 2]])
    # A random tiny CLIP maps every image close together (measured: 0.003-0.015 between these
    # products), so the bound is relative: preprocessing moves an embedding < 2% of that.
    assert moved.max() <= EMBEDDING_SHIFT * between.min(), (moved, between)
