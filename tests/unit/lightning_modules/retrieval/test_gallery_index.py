from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.retrieval.gallery_index import GalleryIndex
from lightning_modules.retrieval.search import topk

ROOT = Path(__file__).resolve().parents[4]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"


@pytest.fixture(scope="module")
def vectors():
    gen = torch.Generator().manual_seed(0)
    g = F.normalize(torch.randn(2000, 32, generator=gen), dim=-1)
    q = F.normalize(g[:50] + 0.3 * torch.randn(50, 32, generator=gen), dim=-1)
    return g, q


def test_flat_index_is_exact_and_round_trips(vectors, tmp_path: Path) -> None:
    g, q = vectors
    ids = [f"p{i}" for i in range(len(g))]
    datasets = ["a" if i % 3 else "b" for i in range(len(g))]
    index = GalleryIndex.build(g, ids, datasets, kind="flat")
    loaded = GalleryIndex.load(index.save(tmp_path / "idx"))
    rows_a = [i for i, d in enumerate(datasets) if d == "a"]
    _, ref = topk(q, g[rows_a], 10)
    for got in (index.search(q, 10, dataset="a"), loaded.search(q, 10, dataset="a")):
        assert [[pid for pid, _ in r] for r in got] == [[ids[rows_a[i]] for i in row] for row in ref.tolist()]
    with pytest.raises(ValueError, match="name one"):
        index.search(q, 10)
    with pytest.raises(KeyError, match="holds"):
        index.search(q, 10, dataset="c")


def test_an_index_killed_while_saved_over_another_leaves_the_old_one_whole(vectors, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_modules.retrieval.gallery_index as gallery_index

    g, q = vectors
    ids = [f"p{i}" for i in range(len(g))]
    old = GalleryIndex.build(g[:500], ids[:500], ["a"] * 250 + ["b"] * 250)
    old.save(tmp_path / "idx")
    expected = old.search(q, 5, dataset="b")
    new = GalleryIndex.build(g[500:], ids[500:], ["a"] * 750 + ["b"] * 750)
    real_write, written = gallery_index.faiss.write_index, []

    def killed_at_the_second_file(index, path: str) -> None:
        if written:
            raise KeyboardInterrupt  # as a kill: nothing after this line runs
        written.append(path)
        real_write(index, path)

    monkeypatch.setattr(gallery_index.faiss, "write_index", killed_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "idx")
    monkeypatch.undo()
    assert GalleryIndex.load(tmp_path / "idx").search(q, 5, dataset="b") == expected  # the old index, whole
    (tmp_path / "idx" / "gallery_index.json.tmp-12345").write_text("{")  # a save killed before its rename
    (tmp_path / "idx" / "someone-elses.faiss").write_text("not ours")
    new.save(tmp_path / "idx")  # saved again to the end: the new index, and only its files
    assert GalleryIndex.load(tmp_path / "idx").search(q, 5, dataset="b") == new.search(q, 5, dataset="b")
    left = sorted(f.name for f in (tmp_path / "idx").iterdir())
    assert len([n for n in left if n.endswith(".faiss")]) == 3 and "someone-elses.faiss" in left  # 2 + theirs
    assert not [n for n in left if ".tmp" in n]


@pytest.mark.parametrize("kind,min_recall", [("ivf", 0.9), ("hnsw", 0.9)])
def test_approximate_indexes_recall_against_exact(vectors, kind: str, min_recall: float) -> None:
    g, q = vectors
    ids = [str(i) for i in range(len(g))]
    exact = GalleryIndex.build(g, ids, ["x"] * len(g)).search(q, 10)
    approx = GalleryIndex.build(g, ids, ["x"] * len(g), kind=kind, nprobe=24).search(q, 10)
    overlap = [len({p for p, _ in a} & {p for p, _ in e}) / 10 for a, e in zip(approx, exact, strict=True)]
    assert sum(overlap) / len(overlap) >= min_recall


@pytest.mark.slow
def test_cir_search_build_and_query_from_a_checkpoint(small_data: Path, tmp_path: Path, capsys) -> None:
    from cir.lightning_cli import build_cli
    from cir.search import main

    cfg = ["--config", str(DEMO)]
    data = [f"--data.init_args.data_dir={small_data}", "--data.init_args.products=120",
            "--data.init_args.generator_seed=3", "--data.init_args.val_fraction=0.25",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=8"]
    cli = build_cli(["fit", *cfg, *data, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                     f"--trainer.default_root_dir={tmp_path}"])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    main(["build", *cfg, "--ckpt", ckpt, "--out", str(tmp_path / "index"), "--", *data])
    index = GalleryIndex.load(tmp_path / "index")
    assert sorted(index.indexes) == ["synth_street", "synth_studio"]
    sample = next(iter(cli.datamodule.example_queries("val", 1)))
    view = tmp_path / "src.jpg"
    sample["src0.jpg"].save(view)
    capsys.readouterr()
    main(["query", *cfg, "--ckpt", ckpt, "--index", str(tmp_path / "index"), "--images", str(view),
          "--text", sample["json"]["triplet"]["modification_short"],
          "--dataset", sample["json"]["triplet"]["dataset"], "-k", "5", "--", *data])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "product"] and len(lines) == 6
    assert all(line.split()[2] in index.ids[sample["json"]["triplet"]["dataset"]] for line in lines[1:])
