from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from datamodules.shards import SkipCounter, decode_sample, iterate_shards, read_manifest, shard_urls


def test_round_trip_matches_manifest_and_generator(small_data: Path) -> None:
    from datamodules.synthetic.generate import generate

    manifest = read_manifest(small_data)
    data = generate(120, seed=3, val_fraction=0.25)
    for split in ("train", "val"):
        gallery = list(iterate_shards(shard_urls(small_data, manifest, split, "gallery")))
        triplets = list(iterate_shards(shard_urls(small_data, manifest, split, "triplets")))
        assert len(gallery) == manifest["splits"][split]["products"] == len(data.split_products(split))
        assert len(triplets) == manifest["splits"][split]["triplets"] == len(data.triplets[split])
        for sample in gallery:
            meta = sample["json"]
            spec = data.products[meta["product_id"]]
            assert meta["view_names"] == spec.view_names
            assert {k: v for k, v in spec.attributes.items() if k != "category"} == meta["attributes"]
            views = [sample[f"view{i}.jpg"] for i in range(len(spec.view_names))]
            size = data.styles[spec.dataset].size
            assert all(isinstance(v, Image.Image) and v.size == (size, size) for v in views)
            assert "." not in sample["__key__"]
        expected = {(t.source_id, t.target_id) for t in data.triplets[split]}
        got = {(s["json"]["triplet"]["source_id"], s["json"]["triplet"]["target_id"]) for s in triplets}
        assert got == expected


def test_missing_manifest_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cir data synthetic"):
        read_manifest(tmp_path)


class _Payload:
    """Unpickling this writes a marker file: proof that a loader ran pickle on shard data."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_decode_never_unpickles_members(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    sample = {"__key__": "k", "json": json.dumps({"a": 1}).encode(), "view0.jpg": buf.getvalue(),
              "extra.pyd": pickle.dumps(_Payload(str(marker))), "obj.pickle": pickle.dumps(_Payload(str(marker)))}
    out = decode_sample(sample)
    assert set(out) == {"__key__", "json", "view0.jpg"}
    assert not marker.exists()


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(good, format="JPEG")
    flipped = bytearray(good.getvalue())
    for i in range(20, len(flipped) - 2):
        flipped[i] ^= 0xFF
    members = {}
    for key, img in [("a", good.getvalue()), ("b", bytes(flipped)), ("c", b""), ("d", good.getvalue())]:
        members[f"{key}.json"] = b'{"product_id": "x"}'
        members[f"{key}.view0.jpg"] = img
    _write_tar(tmp_path / "s.tar", members)
    counter = SkipCounter("test")
    keys = [s["__key__"] for s in iterate_shards([str(tmp_path / "s.tar")], handler=counter)]
    assert keys == ["a", "d"]
    assert counter.count == 2
