"""`cir build --chain`: the built release's triplets chained into multi-turn sessions
(``{split}_sessions.jsonl``), kept by a rerun, removed by a build without --chain, and written as
session shards, the same sessions turn for turn, by `cir data fashionmv --sessions`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cir.build import main as cir_build
from datamodules.schema import safe_key
from datamodules.shards import iterate_shards, read_manifest
from datamodules.synthetic import generate
from datamodules.synthetic.catalogue import write_catalogue_layout

OPTIONS = ["--backend", "oracle", "--image-encoder", "clip:tiny", "--composite-height", "96", "--no-progress"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_build_chain_writes_sessions_of_its_own_triplets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cir.data import main as cir_data

    catalogue, out = tmp_path / "catalogue", tmp_path / "built"
    write_catalogue_layout(catalogue, generate(160, seed=4), seed=4)
    cir_build(["--catalogue", str(catalogue), "--out", str(out), *OPTIONS, "--chain", "--max-turns", "4"])
    summary = json.loads((out / "build_summary.json").read_text())
    written = {}
    for split in ("train", "val"):
        triplets = _rows(out / f"{split}_triplets.jsonl")
        sessions = _rows(out / f"{split}_sessions.jsonl")
        used: list[int] = []
        for s in sessions:
            turns = s["turns"]
            assert 2 <= len(turns) <= 4 and all(t["dataset"] == s["dataset"] for t in turns)
            assert all(a["target_id"] == b["source_id"] for a, b in zip(turns, turns[1:], strict=False))
            chain = [turns[0]["source_id"]] + [t["target_id"] for t in turns]
            assert len(set(chain)) == len(chain)
            used += [triplets.index(t) for t in turns]  # each turn is a row of the release, as it is there
        assert len(used) == len(set(used))  # no row is a turn twice (identical rows are not expected here)
        lengths = {str(k): v for k, v in summary["sessions"][split]["sessions"].items()}
        assert lengths == {str(n): sum(len(s["turns"]) == n for s in sessions)
                           for n in range(2, 5) if any(len(s["turns"]) == n for s in sessions)}
        written[split] = sessions
    assert written["train"], "the oracle's triplets (two targets per source) hold chains"
    print({s: summary["sessions"][s] for s in ("train", "val")})

    before = {s: (out / f"{s}_sessions.jsonl").read_bytes() for s in ("train", "val")}
    usage = summary["usage"]
    cir_build(["--catalogue", str(catalogue), "--out", str(out), *OPTIONS, "--chain", "--max-turns", "4"])
    assert {s: (out / f"{s}_sessions.jsonl").read_bytes() for s in ("train", "val")} == before
    assert json.loads((out / "build_summary.json").read_text())["usage"] == usage  # nothing asked again

    shards = tmp_path / "shards"
    capsys.readouterr()
    cir_data(["fashionmv", "--root", str(out), "--out", str(shards), "--sessions"])
    assert "dropped" not in capsys.readouterr().out
    manifest = read_manifest(shards)
    assert manifest["source"]["sessions"]["given"] == ["train", "val"]
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        got = [[(t["source_id"], t["target_id"], t["modification_short"]) for t in s["json"]["session"]["turns"]]
               for s in iterate_shards([str(shards / n) for n in entry["shards"].get("sessions", [])])]
        expected = [[(safe_key(t["source_id"]), safe_key(t["target_id"]), t["modification_text_short"])
                     for t in s["turns"]] for s in written[split]]
        assert got == expected

    cir_build(["--catalogue", str(catalogue), "--out", str(out), *OPTIONS])  # without --chain: sessions go
    assert not list(out.glob("*_sessions.jsonl"))
    assert "sessions" not in json.loads((out / "build_summary.json").read_text())
