"""Skip what is corrupt, stop on what is broken: ``SkipCounter``, ``KeyedStage`` and ``skip_budget``
through a plain WebDataset pipeline over shards with planted damage."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.batching import GalleryExample, TripletExample
from datamodules.shards import (
    CorruptSample,
    KeyedStage,
    SkipCounter,
    StageError,
    TooManyCorruptSamples,
    decode_sample,
    is_corrupt,
    skip_budget,
)

SAMPLES = 600
PER_SHARD = 200


def _jpeg(seed: int) -> bytes:
    """A real 32×32 noise JPEG (~1.5 kB): big enough that a truncated copy still has a whole header,
    so it opens lazily and fails only when the transform reads its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


GOOD = _jpeg(0)


def _meta(i: int) -> dict[str, Any]:
    return {"triplet": {"source_id": f"s{i}", "target_id": f"t{i}", "dataset": "toy",
                        "modification_short": "make it red"},
            "source": {"dataset": "toy", "product_id": f"s{i}"}, "target": {"dataset": "toy", "product_id": f"t{i}"}}


def _good(i: int) -> dict[str, bytes]:
    return {"json": json.dumps(_meta(i)).encode(), "src0.jpg": GOOD, "tgt0.jpg": GOOD}


def _damaged(i: int, kind: int) -> dict[str, bytes]:
    """Sample ``i`` damaged one of six ways, each a decode or format error of the sample."""
    members = _good(i)
    match kind % 6:
        case 0:  # truncated JPEG scan: opens (header intact), fails in the transform's decode
            members["src0.jpg"] = GOOD[: len(GOOD) * 2 // 3]
        case 1:  # bytes that are no image at all: fail when decoded
            members["tgt0.jpg"] = b"this is not an image, only text"
        case 2:  # JSON cut short
            members["json"] = members["json"][:-7]
        case 3:  # a missing member: no source view
            del members["src0.jpg"]
        case 4:  # a required metadata key missing
            meta = _meta(i)
            del meta["triplet"]["modification_short"]
            members["json"] = json.dumps(meta).encode()
        case 5:  # a text member that is not UTF-8
            members["note.txt"] = b"\xff\xfe\xfa not utf-8"
    return members


def _write_shards(folder: Path, damaged: set[int], n: int = SAMPLES, kind: int = 0) -> list[str]:
    """Triplet shards of ``n`` samples, ``PER_SHARD`` a shard, with samples ``damaged`` damaged (the
    k-th of them the way ``kind + k`` says)."""
    urls = []
    for start in range(0, n, PER_SHARD):
        path = folder / f"train-triplets-{start // PER_SHARD:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + PER_SHARD, n)):
                members = _damaged(i, kind + sum(d < i for d in damaged)) if i in damaged else _good(i)
                for name, payload in members.items():
                    info = tarfile.TarInfo(f"k{i:05d}.{name}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        urls.append(str(path))
    return urls


class Pixels:
    """A transform that reads every pixel (so a lazy view is decoded here, as a model's would be)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)))


class DividesByZero:
    """A planted bug: a transform that fails the same way on every sample."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.tensor([1.0 / 0])


def _stream(urls: list[str], counter: SkipCounter,
            example: Callable[[dict[str, Any]], Any]) -> Iterator[dict[str, Any]]:
    return iter(wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=counter),
        wds.map(decode_sample, handler=counter),
        wds.map(KeyedStage(example), handler=counter),
    ))


def _planted(rate: float) -> list[int]:
    """Evenly spread sample indices, ``rate`` of ``SAMPLES``."""
    n = round(rate * SAMPLES)
    return [int((k + 0.5) * SAMPLES / n) for k in range(n)]


def test_a_planted_transform_bug_stops_at_the_first_sample_naming_its_key(tmp_path: Path) -> None:
    urls = _write_shards(tmp_path, set())
    counter = SkipCounter("train", budget=skip_budget(SAMPLES, 0.01))
    stream = _stream(urls, counter, TripletExample(DividesByZero(), "short"))
    with pytest.raises(StageError) as caught:
        next(stream)
    assert str(caught.value).startswith(f"{urls[0]}:k00000: ZeroDivisionError")
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert counter.count == 0 and counter.first_errors == []  # not counted as corrupt data
    assert any("not a corrupt-sample error" in note for note in caught.value.__notes__)


def test_a_bare_key_error_from_code_is_a_bug_not_missing_metadata(tmp_path: Path) -> None:
    urls = _write_shards(tmp_path, set(), n=5)

    def buggy(sample: dict[str, Any]) -> dict[str, Any]:
        return {"x": sample["json"]["no such key"]}  # a typo in code, not damaged data

    counter = SkipCounter("val-queries")
    with pytest.raises(StageError, match=r"k00000: KeyError: 'no such key'"):
        list(_stream(urls, counter, buggy))
    assert counter.count == 0


def test_half_a_percent_corrupt_within_a_one_percent_budget_completes(tmp_path: Path) -> None:
    planted = _planted(0.005)
    assert len(planted) == 3
    urls = _write_shards(tmp_path, set(planted))
    counter = SkipCounter("train", budget=skip_budget(SAMPLES, 0.01))
    examples = list(_stream(urls, counter, TripletExample(Pixels(), "short")))
    assert counter.count == len(planted) and len(examples) == SAMPLES - len(planted)
    assert {e["__key__"] for e in examples}.isdisjoint({f"k{i:05d}" for i in planted})
    # Each skipped error names its sample's key.
    assert [f"k{i:05d}" in e for i, e in zip(planted, counter.first_errors, strict=True)] == [True] * 3


def test_every_kind_of_damage_is_skipped_and_named(tmp_path: Path) -> None:
    planted = [10, 20, 30, 40, 50, 60]  # one of each of the six kinds, in order
    urls = _write_shards(tmp_path, set(planted), n=70)
    counter = SkipCounter("val-queries")
    examples = list(_stream(urls, counter, TripletExample(Pixels(), "short")))
    assert counter.count == 6 and len(examples) == 64
    # Alone in a shard, with a budget of 0, each kind's error names the sample and what is wrong.
    expected = ["truncated", "does not decode", "member 'json'", "no 'src0.jpg' member",
                "'modification_short'", "member 'note.txt'"]
    for kind, words in enumerate(expected):
        folder = tmp_path / f"kind{kind}"
        folder.mkdir()
        one = SkipCounter("one", budget=0)
        with pytest.raises(TooManyCorruptSamples) as caught:
            list(_stream(_write_shards(folder, {0}, n=1, kind=kind), one, TripletExample(Pixels(), "short")))
        cause = caught.value.__cause__
        assert isinstance(cause, CorruptSample) and is_corrupt(cause)
        assert str(cause).startswith(f"{folder / 'train-triplets-000000.tar'}:k00000: ") and words in str(cause)


def test_five_percent_corrupt_over_a_one_percent_budget_stops_naming_the_first_errors(tmp_path: Path) -> None:
    planted = _planted(0.05)
    assert len(planted) == 30
    urls = _write_shards(tmp_path, set(planted))
    budget = skip_budget(SAMPLES, 0.01)
    counter = SkipCounter("train", budget=budget)
    with pytest.raises(TooManyCorruptSamples) as caught:
        list(_stream(urls, counter, TripletExample(Pixels(), "short")))
    message = str(caught.value)
    assert counter.count == budget + 1 == 7
    assert "'train'" in message and "7 corrupt samples" in message and "budget of 6" in message
    assert "data.init_args.max_skip_rate" in message
    for i in planted[:3]:
        assert f"k{i:05d}" in message
    assert f"k{planted[3]:05d}" not in message  # only the first three are quoted


def test_a_damaged_tar_stream_is_skipped_and_the_next_shard_is_read(tmp_path: Path) -> None:
    urls = _write_shards(tmp_path, set(), n=2 * PER_SHARD)
    first = Path(urls[0])
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # cut mid-member
    counter = SkipCounter("train")
    examples = list(_stream(urls, counter, TripletExample(Pixels(), "short")))
    assert counter.count >= 1 and PER_SHARD <= len(examples) < 2 * PER_SHARD
    assert "ReadError" in counter.first_errors[0]


def test_a_missing_shard_file_is_not_corrupt_data(tmp_path: Path) -> None:
    counter = SkipCounter("train")
    with pytest.raises(FileNotFoundError):
        list(_stream([str(tmp_path / "nowhere.tar")], counter, GalleryExample(Pixels())))
    assert counter.count == 0


def test_gallery_samples_missing_their_product_id_are_corrupt() -> None:
    sample = {"__url__": "u.tar", "__key__": "g1", "json": {"dataset": "toy"}, "view0.jpg": GOOD}
    with pytest.raises(CorruptSample, match=r"u.tar:g1: its json has no 'product_id' key"):
        KeyedStage(GalleryExample(Pixels()))(sample)


def test_skip_budget() -> None:
    assert skip_budget(600, 0.01) == 6 and skip_budget(99, 0.01) == 0 and skip_budget(0, 0.5) == 0
    assert skip_budget(100, 0.29) == 29  # not 28: 0.29 * 100 is 28.999… in binary
    assert skip_budget(1000, 0.0) == 0
    with pytest.raises(ValueError, match="max_skip_rate"):
        skip_budget(100, -0.1)


def test_stages_counters_and_errors_survive_pickling() -> None:
    """DataLoader workers pickle the stage and the handler, and re-raise a worker's error as
    ``type(message)``: every error here takes one message argument."""
    stage = pickle.loads(pickle.dumps(KeyedStage(TripletExample(Pixels(), "short"))))
    assert isinstance(stage.for_epoch(3), KeyedStage) and stage.for_epoch(3).fn.epoch == 3
    counter = SkipCounter("train", budget=2)
    counter(CorruptSample("u:k1: bad"))
    copy = pickle.loads(pickle.dumps(counter))
    assert (copy.name, copy.budget, copy.count, copy.first_errors) == ("train", 2, 1, ["CorruptSample: u:k1: bad"])
    for kind in (CorruptSample, StageError, TooManyCorruptSamples):
        assert str(kind("message")) == "message"
