"""Inputs that would build or convert nothing, and an encoder the hub cannot give, are refused in
one line that says why and names the option the user gave (issue 25, items 5 and 9)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from cir.build import main as cir_build
from cir.data import main as cir_data
from datamodules.synthetic import generate
from datamodules.synthetic.catalogue import write_catalogue_layout

ORACLE = ["--backend", "oracle", "--composite-height", "96", "--no-progress"]


def stopped(command: object, argv: list[str]) -> str:
    """The message a command exits with; it must be an error of one to three lines."""
    with pytest.raises(SystemExit) as exit_info:
        command(argv)  # type: ignore[operator]
    message = exit_info.value.code
    assert isinstance(message, str), f"exited {message!r} without a message"
    assert 1 <= len(message.strip().splitlines()) <= 3, message
    return message


@pytest.fixture(autouse=True)
def _one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)


# --- cir build: a catalogue with nothing to build from -----------------------------------------


def test_an_empty_images_folder_is_an_error_not_a_summary_of_zeros(tmp_path: Path) -> None:
    (tmp_path / "cat" / "images").mkdir(parents=True)
    message = stopped(cir_build, ["--catalogue", str(tmp_path / "cat"), "--out", str(tmp_path / "out"), *ORACLE])
    assert "images/ holds no image files" in message and "<product_id>" in message
    assert not (tmp_path / "out" / "build_summary.json").exists()


def test_product_folders_without_a_readable_image_are_an_error(tmp_path: Path) -> None:
    for pid in ("p1", "p2"):
        folder = tmp_path / "cat" / "images" / pid
        folder.mkdir(parents=True)
        (folder / "00.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        (folder / "notes.txt").write_text("not an image")
    message = stopped(cir_build, ["--catalogue", str(tmp_path / "cat"), "--out", str(tmp_path / "out"), *ORACLE])
    assert "none of its 2 products has a readable image" in message and "00.jpg" in message
    assert not (tmp_path / "out" / "build_summary.json").exists()


# --- cir build --backend oracle: the image encoder still needs the hub -------------------------


def test_an_encoder_the_hub_cannot_give_names_image_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPModel

    def offline(*args: object, **kwargs: object) -> None:  # what transformers raises without network
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck your internet connection or see how to run the library in "
                      "offline mode at 'https://huggingface.co/docs/transformers/installation#offline-mode'.")

    monkeypatch.setattr(CLIPModel, "from_pretrained", offline)
    write_catalogue_layout(tmp_path / "cat", generate(10, seed=4), seed=4, accessories=0)
    start = time.monotonic()
    # No --image-encoder: the default, clip:clip-vit-b32, is a hub id.
    message = stopped(cir_build, ["--catalogue", str(tmp_path / "cat"), "--out", str(tmp_path / "out"), *ORACLE])
    assert "--image-encoder clip:clip-vit-b32" in message, message
    # Offline (the tests' HF_HUB_OFFLINE=1) the registry refuses an uncached id before the loader runs;
    # with the weights cached the loader's OSError comes through: either way the line says why.
    assert "could not be loaded (OSError: " in message and ("couldn't connect" in message or "cache" in message)
    assert "clip:tiny" in message and "local folder" in message
    assert time.monotonic() - start < 20


# --- cir data fashionmv: layouts that hold nothing to convert ----------------------------------


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def _release(root: Path, triplets: list[dict], images: bool = True) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "images").mkdir()
    for split in ("train", "val"):
        (root / "data" / f"{split}_triplets.jsonl").write_text("".join(json.dumps(t) + "\n" for t in triplets))
    if images:
        for t in triplets:
            for pid in (t["source_id"], t["target_id"]):
                _img(root / "images" / t["dataset"] / pid / "0.jpg")
    return root


TRIPLET = {"source_id": "a", "target_id": "b", "dataset": "f200k", "modification_text_short": "is red"}


def test_data_dir_without_triplets_names_data_dir_and_its_layout_only(tmp_path: Path) -> None:
    empty = tmp_path / "annotations"
    empty.mkdir()
    (tmp_path / "images").mkdir()
    message = stopped(cir_data, ["fashionmv", "--data-dir", str(empty), "--image-root", str(tmp_path / "images"),
                                 "--out", str(tmp_path / "out")])
    assert f"--data-dir {empty}" in message and "train_triplets.jsonl" in message
    assert "{split}_triplets.jsonl" in message  # the layout --data-dir accepts
    assert "--root" not in message and "ROOT" not in message and "data/" not in message
    assert not (tmp_path / "out").exists()


def test_data_dir_given_the_release_folder_points_at_its_data_folder(tmp_path: Path) -> None:
    root = _release(tmp_path / "release", [TRIPLET])
    message = stopped(cir_data, ["fashionmv", "--data-dir", str(root), "--image-root", str(root / "images"),
                                 "--out", str(tmp_path / "out")])
    assert f"pass --data-dir {root / 'data'}" in message and "--root" not in message


def test_root_without_triplets_names_root_and_the_layouts_it_accepts(tmp_path: Path) -> None:
    (tmp_path / "release").mkdir()
    message = stopped(cir_data, ["fashionmv", "--root", str(tmp_path / "release"), "--out", str(tmp_path / "out")])
    assert f"--root {tmp_path / 'release'}" in message
    assert "ROOT/data/{split}_triplets.jsonl" in message and "ROOT/{split}_triplets.jsonl" in message
    assert "ROOT/images/" in message


def test_empty_triplet_files_write_no_shard_folder(tmp_path: Path) -> None:
    root = _release(tmp_path / "release", [])
    message = stopped(cir_data, ["fashionmv", "--root", str(root), "--out", str(tmp_path / "out")])
    assert "hold no triplets" in message and "train_triplets.jsonl" in message
    assert not (tmp_path / "out").exists()


def test_triplets_without_images_write_no_shard_folder(tmp_path: Path) -> None:
    root = _release(tmp_path / "release", [TRIPLET], images=False)
    elsewhere = tmp_path / "images"
    elsewhere.mkdir()
    message = stopped(cir_data, ["fashionmv", "--data-dir", str(root / "data"), "--image-root", str(elsewhere),
                                 "--out", str(tmp_path / "out")])
    assert "none of the 2 triplets" in message and "--image-root" in message and "--root" not in message
    assert not (tmp_path / "out").exists()
    message = stopped(cir_data, ["fashionmv", "--root", str(root), "--out", str(tmp_path / "out")])
    assert "check --root" in message


def test_a_release_that_converts_still_converts(tmp_path: Path) -> None:
    root = _release(tmp_path / "release", [TRIPLET])
    cir_data(["fashionmv", "--root", str(root), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["f200k"]["val"]["triplets_written"] == 1 and (tmp_path / "out" / "manifest.json").is_file()
