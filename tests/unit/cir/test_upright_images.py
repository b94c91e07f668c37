"""A phone photo (landscape pixels plus EXIF Orientation=6) reaches the model upright through every
path a user's image takes: ``cir serve`` uploads, ``cir query`` / ``cir search query`` files and
ProCIR's cached interactive queries. "Upright" is the same JPEG's decoded pixels turned by hand, so
the comparisons are exact."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from support.photos import ROTATED_CW, phone_jpeg

from cir.models import query_batch
from cir.serve.limits import BadInput, Limits
from lightning_modules.backbones import CLIPBackbone
from lightning_modules.backbones.images import open_upright, orientation, upright
from lightning_modules.families.procir import InteractiveEncoder


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Image.Image]:
    data, want = phone_jpeg(45, 71)
    path = tmp_path_factory.mktemp("phone") / "front.jpg"
    path.write_bytes(data)
    return path, want


@pytest.fixture(scope="module")
def clip() -> CLIPBackbone:
    return CLIPBackbone("tiny")


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def test_the_helper_turns_the_picture_and_only_once(photo: tuple[Path, Image.Image]) -> None:
    path, want = photo
    with Image.open(path) as raw:
        assert raw.size == (71, 45) and orientation(raw) == ROTATED_CW  # as stored: on its side
    img = open_upright(path)
    assert img.mode == "RGB" and same_pixels(img, want) and orientation(img) == 1
    assert same_pixels(upright(img), want)  # the tag is gone: a second pass changes nothing
    plain, plain_want = phone_jpeg(45, 71, tag=1)
    assert same_pixels(open_upright(io.BytesIO(plain)), plain_want)


def test_a_serve_upload_is_embedded_upright(photo: tuple[Path, Image.Image], clip: CLIPBackbone) -> None:
    path, want = photo
    img = Limits().image("front.jpg", path.read_bytes())
    assert same_pixels(img, want)
    assert torch.equal(clip.image_transform(img), clip.image_transform(want))


def test_serve_limits_measure_the_upright_picture() -> None:
    # 10 × 400 upright, stored 400 × 10: too thin either way, refused before decoding.
    thin, _ = phone_jpeg(10, 400)
    with pytest.raises(BadInput, match="at most 20 times the other"):
        Limits().image("thin.jpg", thin)
    big, _ = phone_jpeg(40, 60)
    with pytest.raises(BadInput, match="at most 2399 pixels") as caught:
        Limits(max_pixels=2399).image("big.jpg", big)
    assert caught.value.status == 413
    assert Limits(max_pixels=2400).image("big.jpg", big).size == (40, 60)


def test_cir_query_files_are_embedded_upright(photo: tuple[Path, Image.Image], clip: CLIPBackbone) -> None:
    path, want = photo
    dm = SimpleNamespace(image_transform=clip.image_transform)
    batch = query_batch(dm, [str(path)], "make it red")  # type: ignore[arg-type]
    assert torch.equal(batch["source_images"][0, 0], clip.image_transform(want))


def test_procir_interactive_queries_read_files_upright(photo: tuple[Path, Image.Image]) -> None:
    encoder = InteractiveEncoder.from_checkpoint(None)
    path, want = photo
    got, = encoder.views([path])
    expected = encoder.backbone.image_transform(want)
    assert torch.equal(got.grid_thw, expected.grid_thw) and torch.equal(got.pixel_values, expected.pixel_values)
