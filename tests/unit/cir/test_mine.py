"""``cir mine-negatives``: the k best same-dataset, same-split products per triplet, never the target,
never a product scoring too close to it (known duplicates), checked against brute force."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import cir.mine as mining
from cir.mine import Mined, main, mine
from cir.models import load_model_and_data
from datamodules.negatives import negatives_path, offsets_path
from datamodules.shards import gallery_key, iterate_shards, read_manifest, shard_urls

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"
SPLIT = "val"  # the smallest split: fewest products and queries to embed
# The random tiny model scores every product within a few percent of the target, so a margin of
# 0.99 leaves a handful of candidates per triplet: some lists are cut at k, others are shorter.
K, MARGIN = 3, 0.99


def brute_negatives(scores: list[float], datasets: list[str], dataset: str, target: int, k: int,
                    margin: float) -> tuple[list[int], float]:
    """Rows of the k best products of ``dataset`` scoring at most margin × the positive, by hand."""
    pos = scores[target]
    bound = pos - (1 - margin) * abs(pos)
    rows = [j for j, s in enumerate(scores) if datasets[j] == dataset and j != target and s <= bound]
    return sorted(rows, key=lambda j: -scores[j])[:k], bound


def test_mine_matches_brute_force_and_drops_duplicates_of_the_target() -> None:
    gen = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    gallery = torch.cat([gallery, gallery[:4]])  # rows 40-43 duplicate rows 0-3
    datasets = ["a" if i % 2 == 0 else "b" for i in range(40)] + ["a", "b", "a", "b"]
    targets = list(range(10)) + [-1, 1]
    queries = F.normalize(gallery[:10] + 0.1 * torch.randn(10, 16, generator=gen), dim=-1)
    # A query whose positive score is negative (-0.2 before normalising): the bound stays below it.
    v = torch.randn(16, generator=gen)
    away = F.normalize(v - (v @ gallery[1] + 0.2) * gallery[1], dim=0)
    queries = torch.cat([queries, queries[:1], away[None]])  # query 10 has no target
    q_datasets = [datasets[t] for t in range(10)] + ["a", "b"]
    got = mine(queries, q_datasets, torch.tensor(targets), gallery, datasets, k=5, margin=0.9)
    scores = (queries @ gallery.T).tolist()
    for i, (m, t) in enumerate(zip(got, targets, strict=True)):
        if t < 0:
            assert m.rows == [] and m.positive is None
            continue
        expected, _ = brute_negatives(scores[i], datasets, q_datasets[i], t, 5, 0.9)
        assert m.rows == expected and m.scores == pytest.approx([scores[i][j] for j in expected], abs=1e-6)
        assert m.positive == pytest.approx(scores[i][t], abs=1e-6)
    # The duplicate of the target scores as the target does: the best candidate, were it not filtered.
    assert scores[0][40] == pytest.approx(max(s for j, s in enumerate(scores[0]) if j != 0), abs=1e-6)
    assert 40 not in got[0].rows and got[0].dropped >= 1
    assert got[11].positive < 0 and 41 not in got[11].rows and got[11].rows


def add_duplicates(data: Path, split: str, n: int) -> dict[tuple[str, str], str]:
    """Write a copy of n of the split's targets under new ids in an extra gallery shard: true
    duplicates. Returns {(dataset, original id): duplicate id}."""
    manifest = read_manifest(data)
    targets = []
    for sample in iterate_shards(shard_urls(data, manifest, split, "triplets")):
        t = sample["json"]["triplet"]
        if (t["dataset"], t["target_id"]) not in targets:
            targets.append((t["dataset"], t["target_id"]))
    wanted = set(targets[:n])
    dups, name = {}, f"{split}-gallery-000099.tar"
    with tarfile.open(data / name, "w") as out:
        for shard in shard_urls(data, manifest, split, "gallery"):
            with tarfile.open(shard) as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            for member, payload in files.items():
                if not member.endswith(".json"):
                    continue
                meta, key = json.loads(payload), member[: -len(".json")]
                if (meta["dataset"], meta["product_id"]) not in wanted:
                    continue
                dup = f"dup-{meta['product_id']}"
                dups[(meta["dataset"], meta["product_id"])] = dup
                new_key = gallery_key(meta["dataset"], dup)
                copy = {f"{new_key}.json": json.dumps({**meta, "product_id": dup}).encode()}
                copy.update({f"{new_key}{m[len(key):]}": b for m, b in files.items()
                             if m.startswith(f"{key}.view")})
                for m, b in copy.items():
                    info = tarfile.TarInfo(m)
                    info.size = len(b)
                    out.addfile(info, io.BytesIO(b))
    manifest["splits"][split]["shards"]["gallery"].append(name)
    manifest["splits"][split]["products"] += len(dups)
    (data / "manifest.json").write_text(json.dumps(manifest))
    return dups


@pytest.fixture(scope="module")
def mined(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``cir mine-negatives`` run once on the val split (the smallest) of a copy of the generated
    data with duplicated targets; the embeddings it scored are kept for the brute-force check."""
    root = tmp_path_factory.mktemp("mine")
    data = root / "data"
    shutil.copytree(small_data, data)
    dups = add_duplicates(data, SPLIT, 8)
    overrides = [f"--data.init_args.data_dir={data}", "--data.init_args.num_workers=0"]
    model, _ = load_model_and_data([str(DEMO)], None, overrides)
    ckpt = root / "random.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)  # a random tiny CLIP4CIR: duplicates embed alike
    scored: dict[str, Any] = {}

    def keep_inputs(queries: torch.Tensor, query_datasets: list[str], target_rows: torch.Tensor,
                    gallery: torch.Tensor, gallery_datasets: list[str], k: int, margin: float) -> list[Mined]:
        scored.update(queries=queries, target_rows=target_rows, gallery=gallery, gallery_datasets=gallery_datasets)
        return mine(queries, query_datasets, target_rows, gallery, gallery_datasets, k, margin)

    def keep_ids(*args: Any) -> tuple[torch.Tensor, list[str], list[str]]:
        emb, ids, datasets = embed_gallery(*args)
        scored["gallery_ids"] = list(zip(datasets, ids, strict=True))
        return emb, ids, datasets

    embed_gallery = mining.embed_gallery
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mining, "mine", keep_inputs)
        patch.setattr(mining, "embed_gallery", keep_ids)
        main(["--config", str(DEMO), "--ckpt", str(ckpt), "--split", SPLIT, "--k", str(K), "--margin", str(MARGIN),
              "--num-workers", "0", "--batch-size", "64", "--", *overrides])
    return {"data": data, "dups": dups, "scored": scored,
            "sidecar": json.loads(negatives_path(data, SPLIT).read_text())}


def test_mined_negatives_match_brute_force_and_never_hold_the_target_or_its_duplicates(mined: dict) -> None:
    data, dups, scored = mined["data"], mined["dups"], mined["scored"]
    gallery_ids = {(s["json"]["dataset"], s["json"]["product_id"])
                   for s in iterate_shards(shard_urls(data, read_manifest(data), SPLIT, "gallery"))}
    records = mined["sidecar"]["records"]
    triplets = read_manifest(data)["splits"][SPLIT]["triplets"]
    assert len(records) == triplets == len(scored["queries"]) and mined["sidecar"]["k"] == K
    g = scored["gallery"].double()
    checked, limited, dup_checked = 0, 0, 0
    for i, rec in enumerate(records.values()):  # written in query row order
        dataset, target = rec["dataset"], rec["target_id"]
        ids = rec["ids"]
        assert target not in ids and dups.get((dataset, target)) not in ids
        assert all((dataset, pid) in gallery_ids for pid in ids)  # the same split and dataset
        row = int(scored["target_rows"][i])
        scores = (g @ scored["queries"][i].double()).tolist()
        expected, bound = brute_negatives(scores, scored["gallery_datasets"], dataset, row, K, MARGIN)
        assert rec["positive"] == pytest.approx(scores[row], abs=1e-5)
        if (dataset, target) in dups:
            # A true duplicate embeds as its original, so it scores as the target: only the margin keeps it out.
            dup_row = scored["gallery_ids"].index((dataset, dups[(dataset, target)]))
            assert torch.allclose(g[dup_row], g[row], atol=1e-5) and scores[dup_row] > bound
            dup_checked += 1
        if any(abs(s - bound) < 1e-6 for s in scores):
            continue  # a candidate on the bound may fall either side of it in float32
        candidates = len(brute_negatives(scores, scored["gallery_datasets"], dataset, row, 10**6, MARGIN)[0])
        assert len(ids) == min(K, candidates)
        # Compared by score: duplicated products tie, and float32 may order a tie either way.
        got = [scores[scored["gallery_ids"].index((dataset, pid))] for pid in ids]
        assert got == pytest.approx([scores[j] for j in expected], abs=1e-5)
        assert rec["scores"] == pytest.approx(got, abs=1e-5)
        checked += 1
        limited += candidates > K
    # Both cases occur: lists cut at k, and lists shorter than k because few candidates pass.
    assert dup_checked >= 5 and checked >= triplets - 3 and 0 < limited < checked
    assert offsets_path(data, SPLIT).is_file() and not list(data.glob(".*.tmp"))


def test_bad_options_are_refused_before_any_model_is_built(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--config", "none.yaml", "--ckpt", "none.ckpt", "--k", "0", "--margin", "1.5"])
    err = capsys.readouterr().err
    assert "--k 0: must be >= 1" in err and "--margin 1.5: must be in (0, 1]" in err
    assert "--ckpt none.ckpt: no such file" in err
