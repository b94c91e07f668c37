"""The session shard format: written, counted in the manifest entry, read back turn by turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.schema import Product, SchemaError, Triplet
from datamodules.session_shards import SessionExample, SessionRecord, collate_sessions, write_session
from datamodules.shards import ShardSetWriter, encode_product, iterate_shards


def _product(pid: str, colour: tuple[int, int, int], views: int = 1) -> Product:
    return Product(pid, "gen", "dress", [Image.new("RGB", (16, 16), colour)] * views,
                   ["front", "back", "side_left"][:views])


def _record(chain: list[str], sid: str = "s0") -> SessionRecord:
    turns = [Triplet(a, b, "gen", f"{a} to {b}") for a, b in zip(chain, chain[1:], strict=False)]
    return SessionRecord(sid, "gen", turns)


def test_written_sessions_read_back_turn_by_turn(tmp_path: Path) -> None:
    colours = {"a": (250, 0, 0), "b": (0, 250, 0), "c": (0, 0, 250), "d": (250, 250, 0)}
    products = {pid: _product(pid, c, views=1 + n % 3) for n, (pid, c) in enumerate(colours.items())}
    writer = ShardSetWriter(tmp_path, "val")
    for sid, chain in (("s0", ["a", "b", "c", "d"]), ("s1", ["c", "a"])):
        write_session(writer, _record(chain, sid), [encode_product(products[p]) for p in chain])
    entry = writer.close()
    assert entry["sessions"] == 2 and entry["session_lengths"] == {"1": 1, "3": 1}
    assert entry["shards"]["sessions"] == ["val-sessions-000000.tar"]

    example = SessionExample(lambda img: torch.tensor(img.getpixel((8, 8)), dtype=torch.float), "short")
    read = [example(s) for s in iterate_shards([str(tmp_path / n) for n in entry["shards"]["sessions"]])]
    first = read[0]
    assert first["product_ids"] == ["a", "b", "c", "d"]
    assert first["texts"] == ["a to b", "b to c", "c to d"]
    # View counts and pixels survive per chain product (JPEG: colours within a few levels).
    for pid, views in zip(first["product_ids"], first["products"], strict=True):
        assert len(views) == len(products[pid].views)
        assert torch.allclose(views[0], torch.tensor(colours[pid], dtype=torch.float), atol=8)
    batch = collate_sessions(read)
    assert batch["session_id"] == ["s0", "s1"] and [len(t) for t in batch["texts"]] == [3, 1]


def test_a_broken_chain_is_refused() -> None:
    with pytest.raises(SchemaError, match="next turn's source"):
        SessionRecord("s", "gen", [Triplet("a", "b", "gen", "x"), Triplet("c", "d", "gen", "y")])
    with pytest.raises(SchemaError, match="visited twice"):
        _record(["a", "b", "a"])


def test_products_must_be_the_chain(tmp_path: Path) -> None:
    writer = ShardSetWriter(tmp_path, "val")
    with pytest.raises(SchemaError, match="not its chain"):
        write_session(writer, _record(["a", "b"]), [encode_product(_product("b", (0, 0, 0)))] * 2)


def test_a_writer_lists_only_its_own_shards(tmp_path: Path) -> None:
    # A chained folder's session tars (another name generation) and stray tars sit beside it.
    for stray in ("val-sessions-c1-000000.tar", "val-gallery-old.tar"):
        (tmp_path / stray).write_bytes(b"")
    writer = ShardSetWriter(tmp_path, "val")
    write_session(writer, _record(["a", "b"]), [encode_product(_product(p, (9, 9, 9))) for p in "ab"])
    writer.write_product(*encode_product(_product("a", (9, 9, 9))))
    entry = writer.close()
    assert entry["shards"]["sessions"] == ["val-sessions-000000.tar"]
    assert entry["shards"]["gallery"] == ["val-gallery-000000.tar"]
