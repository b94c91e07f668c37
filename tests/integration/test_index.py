"""`cir index`: a catalogue of photos with no triplets becomes a gallery index. A catalogue of
real-world JPEGs (mixed sizes, a phone photo stored sideways with its EXIF orientation, a truncated
view, a product whose only view is truncated) goes through to `cir search query`. The index's
answers are checked against a brute-force ranking of embeddings computed here by hand, through the
model's own encoder, from pixels turned upright by hand."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support.photos import phone_jpeg

from cir.index import main as cir_index
from cir.search import main as cir_search
from datamodules.batching import stack_views, views_of
from datamodules.shards import decode_sample
from datamodules.synthetic import generate
from datamodules.synthetic.catalogue import write_catalogue_layout
from lightning_modules.core import Products
from lightning_modules.retrieval import GalleryIndex
from lightning_modules.retrieval.mutable import MutableGallery

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "experiments/demos/clip4cir.yaml")
SPRC = str(ROOT / "experiments/demos/sprc_demo.yaml")
NOWHERE = ["--", "--data.init_args.data_dir=/nonexistent/shards"]  # the experiment's data is not needed


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shop")
    write_catalogue_layout(root, generate(10, seed=4), seed=4, accessories=1)
    images = root / "images"
    first = sorted(images.rglob("*.jpg"))[0]
    big = images / "big" / "x1"  # the same picture at 7x the size, as a studio shot would be
    big.mkdir(parents=True)
    with Image.open(first) as img:
        img.resize((img.width * 7, img.height * 7)).save(big / "00_front.jpg", quality=90)
    stored, upright_pixels = phone_jpeg(300, 500, seed=3)
    (images / "phone" / "sideways").mkdir(parents=True)
    (images / "phone" / "sideways" / "00_front.jpg").write_bytes(stored)
    (images / "phone" / "upright").mkdir(parents=True)
    upright_pixels.save(images / "phone" / "upright" / "00_front.png")  # lossless: the same pixels
    truncated = first.read_bytes()[: len(first.read_bytes()) // 2]
    (images / "broken" / "half").mkdir(parents=True)
    (images / "broken" / "half" / "00_front.jpg").write_bytes(truncated)  # no readable view at all
    (images / "broken" / "partly").mkdir()
    shutil.copy(first, images / "broken" / "partly" / "00_front.jpg")
    (images / "broken" / "partly" / "01_back.jpg").write_bytes(truncated)  # one of two views unreadable
    return root


def _index(catalogue: Path, out: Path, *extra: str) -> None:
    cir_index(["--config", DEMO, "--untrained", "--catalogue", str(catalogue), "--out", str(out), *extra, *NOWHERE])


def test_a_catalogue_without_triplets_is_indexed_and_searched(catalogue: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from cir.models import load_with_fingerprint
    from lightning_modules.backbones.images import open_upright

    out = tmp_path / "index"
    _index(catalogue, out)
    printed = capsys.readouterr()
    summary = json.loads((out / "catalogue_summary.json").read_text())
    products_in = 10 + 1 + 4 + 1  # generated, the accessory, big + 2 phone + partly, half
    assert summary["catalogue"]["products_in"] == products_in
    assert summary["catalogue"]["unreadable_views"] == 2 and summary["without_readable_view"] == 1
    assert sum(summary["indexed"].values()) == products_in - 1
    assert "1 of 16 products have no readable view" in printed.err

    # The reference: every product embedded here, each view opened by hand (EXIF applied by
    # open_upright, checked on the phone pair below), in one batch per product.
    model, dm, _ = load_with_fingerprint([DEMO], None, NOWHERE[1:], needs_data=False)
    index = GalleryIndex.load(out)
    assert set(index.ids) == {"catalogue", "synth_street"}  # the 10 generated products are all street

    def embed(pid: str) -> torch.Tensor:
        """As evaluation embeds a gallery product of a shard: its view members through the shard
        decoder (lazy JPEGs) and the data's view reader, then the model's transform. A phone photo's
        pixels are turned upright by hand first (a shard holds what cir build wrote: upright)."""
        sample: dict[str, object] = {"__key__": pid, "__url__": "catalogue", "json": b"{}"}
        files = [v for v in sorted((catalogue / "images" / pid).iterdir()) if not v.name.startswith("01_back")
                 or "broken" not in pid]  # the truncated view of broken/partly is what cir index skips
        for n, view in enumerate(files):
            data = view.read_bytes()
            if pid == "phone/sideways":
                buf = io.BytesIO()
                upright_pixels.save(buf, "PNG")
                data = buf.getvalue()
            sample[f"view{n}.{view.suffix.lstrip('.')}"] = data
        decoded = decode_sample(sample)
        views = stack_views(views_of(decoded, "view"), dm.image_transform)
        with torch.no_grad():
            return model.encode_target(Products(views[None], torch.ones(1, len(views), dtype=torch.bool))).float()[0]

    upright_pixels = open_upright(catalogue / "images/phone/upright/00_front.png")
    sideways, upright = embed("phone/sideways"), embed("phone/upright")
    assert torch.allclose(sideways, upright, atol=1e-5)  # the same pixels both ways, by construction
    rotated = Image.open(io.BytesIO((catalogue / "images/phone/sideways/00_front.jpg").read_bytes())).convert("RGB")
    with torch.no_grad():
        as_stored = model.encode_target(Products(dm.image_transform(rotated)[None, None],
                                                 torch.ones(1, 1, dtype=torch.bool))).float()[0]
    assert not torch.allclose(as_stored, upright, atol=1e-3)  # reading the photo as stored would differ
    noise = torch.Generator().manual_seed(0)
    for dataset, ids in index.ids.items():  # the index ranks as brute force over the hand-made embeddings
        gallery = F.normalize(torch.stack([embed(pid) for pid in ids]), dim=-1)
        queries = F.normalize(gallery + 0.05 * torch.randn(gallery.shape, generator=noise), dim=-1)
        k = min(3, len(ids))
        stored = torch.from_numpy(index.indexes[dataset].reconstruct_n(0, len(ids)))
        assert torch.allclose(stored, gallery, atol=1e-5), dataset  # cir index embeds as evaluation does
        scores = queries @ gallery.T
        best = scores.topk(k, dim=1).values
        # Compared by score: the phone pair embeds within 1e-5, so its order is a tie either way.
        for q, row in enumerate(index.search(queries, k, dataset=dataset)):
            assert [s for _, s in row] == pytest.approx(best[q].tolist(), abs=1e-4)
            assert [float(scores[q, ids.index(pid)]) for pid, _ in row] == pytest.approx([s for _, s in row], abs=1e-4)

    # cir search query answers from it, under the model that built it.
    capsys.readouterr()
    cir_search(["query", "--index", str(out), "--config", DEMO, "--untrained", "--dataset", "synth_street",
                "--images", str(catalogue / "images/phone/sideways/00_front.jpg"), "--text", "make it red",
                *NOWHERE])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "product"]
    assert len(table) == 1 + min(10, len(index.ids["synth_street"]))

    # Changes a server made since the build are seen: the top product replaced by a copy of itself
    # under a new id, read from the log without writing to it.
    top, score = table[1].split()[2], float(table[1].split()[1])
    writer = MutableGallery.open(out)
    row = index.vectors("synth_street")[index.ids["synth_street"].index(top)]
    writer.upsert("synth_street", ["added_copy"], row[None])
    writer.delete("synth_street", [top])
    writer.close()
    log_bytes = (out / "changes.log").read_bytes()
    cir_search(["query", "--index", str(out), "--config", DEMO, "--untrained", "--dataset", "synth_street",
                "--images", str(catalogue / "images/phone/sideways/00_front.jpg"), "--text", "make it red",
                *NOWHERE])
    lines = capsys.readouterr().out.splitlines()
    assert "2 change(s)" in lines[0]
    after = lines[lines.index(table[0]) + 1:]
    assert after[0].split()[2] == "added_copy" and float(after[0].split()[1]) == pytest.approx(score, abs=1e-4)
    assert top not in [row.split()[2] for row in after]
    assert (out / "changes.log").read_bytes() == log_bytes


def test_index_refusals_are_one_line(catalogue: Path, tmp_path: Path) -> None:
    cases = [
        (["--config", DEMO, "--untrained", "--catalogue", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
         "no images/ folder"),
        (["--config", DEMO, "--untrained", "--catalogue", str(catalogue), "--out", str(tmp_path / "o"),
          "--kind", "IVF4096,PQ8"], "IVF4096"),  # more cells than the catalogue can train
        (["--config", DEMO, "--catalogue", str(catalogue), "--out", str(tmp_path / "o")], "--untrained"),
        (["--config", DEMO, "--untrained", "--catalogue", str(catalogue), "--out", str(tmp_path / "o"),
          "--batch-size", "0"], "--batch-size 0: at least 1"),
        (["--config", DEMO, "--untrained", "--catalogue", str(catalogue), "--out", str(catalogue / "products.jsonl")],
         "a file, not a folder"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as stopped:
            cir_index(argv)
        message = str(stopped.value.code)
        assert message.startswith("cir index: ") and len(message.splitlines()) == 1 and words in message, message
    assert not (tmp_path / "o" / "gallery_index.json").exists()


def test_a_multi_vector_model_indexes_every_view_and_searches_by_maxsim(catalogue: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """CLIP4CIR under the maxsim view strategy: each product is its views; the index's answer to a
    query equals brute-force MaxSim over the model's own per-view embeddings."""
    from cir.models import load_with_fingerprint
    from datamodules.catalogue_data import CatalogueDataModule, PartStream
    from lightning_modules.retrieval.search import maxsim

    maxsim_args = [*NOWHERE, "--model.init_args.view_strategy=maxsim"]
    out = tmp_path / "index"
    cir_index(["--config", DEMO, "--untrained", "--catalogue", str(catalogue), "--out", str(out), *maxsim_args])
    index = GalleryIndex.load(out)
    model, dm, _ = load_with_fingerprint([DEMO], None, maxsim_args[1:], needs_data=False)
    data = CatalogueDataModule(str(catalogue))
    data.set_image_transform(dm.image_transform)
    by_id: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for part in data.parts:
            for batch in PartStream([part], data.image_transform, 4):
                if batch["meta"]:
                    emb = model.encode_target(Products(batch["images"], batch["mask"]))
                    by_id.update(zip(batch["product_id"], emb, strict=True))
    ids = index.ids["synth_street"]
    gallery = torch.stack([by_id[i] for i in ids])  # [N, V, D], NaN rows for absent views
    assert gallery.ndim == 3
    queries = gallery[:3, :2].nan_to_num(0.0) + 0.01  # two query vectors each
    expected = maxsim(torch.nn.functional.normalize(queries, dim=-1), gallery)
    for q, row in enumerate(index.search(torch.nn.functional.normalize(queries, dim=-1), 3, dataset="synth_street")):
        best = expected[q].topk(3)
        assert [i for i, _ in row] == [ids[j] for j in best.indices.tolist()]
        assert [s for _, s in row] == pytest.approx(best.values.tolist(), abs=1e-4)
