"""``preprocessing: exact|fast`` on every backbone that hands an image transform to the DataModule.

``exact`` must give the Hugging Face processor's own values (within float32 rounding, 1e-5) and
``fast`` something else on a JPEG large enough for a reduced decode; the setting travels from the
constructor (and a config file) into the transform. The tiny LLaVA (``backbones.tiny_llava``) is no
such backbone: its images only ever go through ``LlavaProcessor`` itself, which is exact by
definition.
"""

from __future__ import annotations

import contextlib
import inspect
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.fast_decode import LazyJpeg, decode_now, open_view
from lightning_modules.backbones import Blip2Backbone, CLIPBackbone, QwenBackbone, VLEmbedderBackbone
from lightning_modules.backbones.clip import HFImageTransform
from lightning_modules.backbones.qwen import PatchedImage, QwenImageTransform

ROOT = Path(__file__).resolve().parents[4]
EXACT = 1e-5
# An odd size on both sides, large enough that every tiny model's input is covered by a 1/2-1/8 DCT decode.
WIDTH, HEIGHT = 1203, 1605

BACKBONES: dict[str, Callable[..., Any]] = {
    "clip": lambda mode: CLIPBackbone("tiny", preprocessing=mode),
    "blip2": lambda mode: Blip2Backbone("tiny", preprocessing=mode),
    "qwen3.5": lambda mode: QwenBackbone("tiny", preprocessing=mode),
    "qwen3-vl-embedding": lambda mode: VLEmbedderBackbone("tiny", family="qwen3-vl-embedding", preprocessing=mode),
    "gme": lambda mode: VLEmbedderBackbone("tiny", family="gme", preprocessing=mode),
}


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    """A photo-like view: smooth colour fields (upsampled random blocks) with pixel noise on top."""
    rng = np.random.default_rng(0)
    blocks = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT),
                                                                                   Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(blocks, np.int16) + rng.integers(-12, 13, (HEIGHT, WIDTH, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def reference(backbone: Any, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the backbone's own Hugging Face processor makes of ``img`` (pixels, Qwen's grid)."""
    out = backbone.processor(images=img, return_tensors="pt")
    if "image_grid_thw" in out:
        return out["pixel_values"], out["image_grid_thw"][0]
    return out["pixel_values"][0], None


def pixels(view: torch.Tensor | PatchedImage) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (view.pixel_values, view.grid_thw) if isinstance(view, PatchedImage) else (view, None)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_exact_equals_the_processor_and_fast_does_not(name: str, jpeg: bytes) -> None:
    exact, fast = BACKBONES[name]("exact"), BACKBONES[name]("fast")
    assert (exact.preprocessing, fast.preprocessing) == ("exact", "fast")
    assert (exact.image_transform.preprocessing, fast.image_transform.preprocessing) == ("exact", "fast")
    view = open_view(jpeg)
    assert isinstance(view, LazyJpeg) and view.size == (WIDTH, HEIGHT)
    want, grid = reference(exact, decode_now(jpeg))
    got, got_grid = pixels(exact.image_transform(view))
    assert got.shape == want.shape and (got - want).abs().max() <= EXACT
    quick, quick_grid = pixels(fast.image_transform(open_view(jpeg)))
    # Same geometry (shapes, Qwen's patch grid), other values: the reduced decode and torch's resize.
    assert quick.shape == want.shape
    if grid is not None:
        assert torch.equal(got_grid, grid) and torch.equal(quick_grid, grid)
    assert (quick - want).abs().max() > 10 * EXACT


@pytest.mark.parametrize("cls", [CLIPBackbone, Blip2Backbone, QwenBackbone, VLEmbedderBackbone],
                         ids=lambda c: c.__name__)
def test_the_default_is_fast(cls: type) -> None:
    assert inspect.signature(cls).parameters["preprocessing"].default == "fast"
    assert cls("tiny").image_transform.preprocessing == "fast"


@pytest.mark.parametrize("make", [
    lambda: CLIPBackbone("tiny", preprocessing="Exact"),
    lambda: Blip2Backbone("tiny", preprocessing="slow"),
    lambda: QwenBackbone("tiny", preprocessing=""),
    lambda: VLEmbedderBackbone("tiny", preprocessing="EXACT"),
    lambda: HFImageTransform(CLIPBackbone("tiny").processor, "exactly"),  # type: ignore[arg-type]
    lambda: QwenImageTransform(QwenBackbone("tiny").processor, None),  # type: ignore[arg-type]
], ids=["clip", "blip2", "qwen3.5", "vl-embedder", "hf-transform", "qwen-transform"])
def test_a_wrong_value_is_one_line_naming_the_choices(make: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match="preprocessing=") as caught:
        make()
    message = str(caught.value)
    assert "'fast'" in message and "'exact'" in message and "\n" not in message


def test_the_setting_reaches_the_datamodule_from_a_config(tmp_path: Path) -> None:
    from cir.lightning_cli import build_cli

    override = tmp_path / "exact.yaml"
    override.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {"init_args": {
        "preprocessing": "exact"}}}}}))
    cli = build_cli(["--config", str(ROOT / "experiments/demos/clip4cir.yaml"), "--config", str(override),
                     f"--data.init_args.data_dir={tmp_path / 'data'}", "--trainer.logger=false"], run=False)
    transform = cli.model.image_transform()
    assert cli.model.backbone.preprocessing == "exact" and transform.preprocessing == "exact"
    cli.datamodule.set_image_transform(transform)
    assert cli.datamodule.image_transform.preprocessing == "exact"


def paper_experiments() -> Iterator[Path]:
    yield from sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "sweeps" not in p.parts)


def resolved_backbone(experiment: Path) -> dict[str, Any]:
    """The experiment's backbone as ``lightning fit --config FILE --print_config`` resolves it."""
    from cir.lightning_cli import build_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(experiment), "--print_config"])
    return yaml.safe_load(out.getvalue())["model"]["init_args"]["backbone"]


@pytest.mark.parametrize("experiment", list(paper_experiments()), ids=lambda p: str(p.relative_to(ROOT)))
def test_paper_experiments_preprocess_exactly_and_demos_and_scale_runs_fast(experiment: Path) -> None:
    """Reproductions of reported numbers (FashionIQ / FashionMV runs of every family, the zero-shot
    baselines, the released checkpoint) use the processors' own pixels; demos and throughput runs
    keep the fast default."""
    quick = {"demos", "scale"} & set(experiment.relative_to(ROOT / "experiments").parts)
    assert resolved_backbone(experiment)["init_args"]["preprocessing"] == ("fast" if quick else "exact")
