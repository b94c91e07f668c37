"""The catalogue exporter (`lightning predict` + `callbacks.EmbeddingWriter` over
`datamodules.CatalogueDataModule`): its vectors equal evaluation's for the same products and model,
from a shard folder and from the same products laid out as the FashionMV release; a multi-vector
model's views keep their index; a killed export resumes to the same bytes without redoing finished
parts; 2 processes write the same files as 1; an export is refused to another model by `cir index`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from support.ports import free_port

from callbacks import EmbeddingWriter
from datamodules import CatalogueDataModule, ShardDataModule
from datamodules.embedding_parts import EXPORT_FILE, finished_parts, read_export
from datamodules.shards import iterate_shards, read_manifest, shard_urls
from lightning_modules import CLIP4CIR, Combiner
from lightning_modules.backbones import CLIPBackbone

ROOT = Path(__file__).resolve().parents[2]
LIGHTNING = str(Path(sys.executable).parent / "lightning")
DEMO = str(ROOT / "experiments/demos/clip4cir.yaml")
EXPORT = str(ROOT / "configs/export/catalogue.yaml")


def _trainer(*callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                     enable_model_summary=False, callbacks=list(callbacks))


def _evaluation_vectors(model: CLIP4CIR, data: Path) -> dict[tuple[str, str], torch.Tensor]:
    """What evaluation embeds for every gallery product of the val split (its own gallery hook)."""
    seen: dict[tuple[str, str], torch.Tensor] = {}

    def record(products, embedding, split, ids, datasets) -> None:  # noqa: ANN001
        for meta, row in zip(products.meta, embedding, strict=True):
            seen[(meta["dataset"], meta["product_id"])] = row.detach().float().cpu().clone()

    model.after_gallery_batch = record
    _trainer().validate(model, datamodule=ShardDataModule(str(data), eval_batch_size=7, num_workers=0),
                        verbose=False)
    del model.after_gallery_batch
    return seen


def _exported(out: Path) -> dict[tuple[str, str], np.ndarray]:
    export = read_export(out)
    vectors = export.per_product()
    return {(d, i): vectors[n] for n, (d, i) in enumerate(zip(export.datasets, export.ids, strict=True))}


def _release_layout(data: Path, root: Path) -> int:
    """The val gallery's products as the FashionMV release lays out images: images/<dataset>/<id>/, the
    shards' own JPEG bytes."""
    urls = shard_urls(data, read_manifest(data), "val", "gallery")
    n = 0
    for sample in iterate_shards(urls, lazy=True):
        meta = json.loads(sample["json"]) if isinstance(sample["json"], bytes | str) else sample["json"]
        folder = root / "images" / meta["dataset"] / meta["product_id"]
        folder.mkdir(parents=True)
        for key, value in sample.items():
            if key.startswith("view") and key.endswith(".jpg"):
                (folder / key).write_bytes(value if isinstance(value, bytes) else value.fp.getvalue())
        n += 1
    return n


@pytest.fixture(scope="module")
def model() -> CLIP4CIR:
    torch.manual_seed(0)
    return CLIP4CIR(CLIPBackbone("tiny"), Combiner(48))


def test_the_export_equals_evaluation_from_shards_and_from_the_release_layout(model: CLIP4CIR, small_data: Path,
                                                                              tmp_path: Path) -> None:
    reference = _evaluation_vectors(model, small_data)
    assert len(reference) > 20

    out = tmp_path / "shards"
    writer = EmbeddingWriter(str(out))
    _trainer(writer).predict(model, datamodule=CatalogueDataModule(str(small_data), split="val", batch_size=3,
                                                                   num_workers=0), return_predictions=False)
    got = _exported(out)
    assert set(got) == set(reference)
    for key, vector in got.items():
        assert np.allclose(vector, reference[key].numpy(), atol=1e-5), key
    plan = json.loads((out / EXPORT_FILE).read_text())
    assert plan["family"] == "CLIP4CIR" and plan["layout"] == "shards" and plan["checkpoint"].startswith("untrained")
    assert sorted(writer.written) == list(range(plan["parts"]))

    release = tmp_path / "release"
    products = _release_layout(small_data, release)
    out = tmp_path / "release_export"
    data = CatalogueDataModule(str(release), layout="fashionmv", batch_size=4, part_size=5, num_workers=2)
    _trainer(EmbeddingWriter(str(out))).predict(model, datamodule=data, return_predictions=False)
    got = _exported(out)
    assert len(got) == products == len(reference)
    assert json.loads((out / EXPORT_FILE).read_text())["parts"] == -(-products // 5)
    for key, vector in got.items():  # read from files as from shards: the same pixels, the same vectors
        assert np.allclose(vector, reference[key].numpy(), atol=1e-5), key


def test_unreadable_views_are_counted_and_a_product_without_one_is_reported(model: CLIP4CIR, small_data: Path,
                                                                           tmp_path: Path) -> None:
    release = tmp_path / "release"
    _release_layout(small_data, release)
    folders = sorted(p for p in (release / "images").glob("*/*") if p.is_dir())
    whole = folders[0] / "view0.jpg"
    (folders[0] / "view0.jpg").write_bytes(whole.read_bytes()[:300])  # truncated: its only view
    for extra in sorted(folders[0].glob("view[1-9].jpg")):
        extra.unlink()
    (folders[1] / "view9.jpg").write_bytes(b"not a jpeg")  # one bad view beside good ones
    out = tmp_path / "export"
    _trainer(EmbeddingWriter(str(out))).predict(
        model, datamodule=CatalogueDataModule(str(release), layout="fashionmv", batch_size=4, part_size=4,
                                              num_workers=0), return_predictions=False)
    export = read_export(out)
    assert export.unreadable_views == 2
    assert [s["product_id"] for s in export.skipped] == [folders[0].name]
    assert len(export.ids) == len(folders) - 1 and folders[1].name in export.ids

    nothing = tmp_path / "nothing"  # every product unreadable: refused in one line, naming where they are listed
    for folder in folders:
        for view in folder.iterdir():
            view.write_bytes(b"not a jpeg")
    _trainer(EmbeddingWriter(str(nothing))).predict(
        model, datamodule=CatalogueDataModule(str(release), layout="fashionmv", part_size=8, num_workers=0),
        return_predictions=False)
    with pytest.raises(ValueError, match=r"holds no product: all \d+ were skipped") as refused:
        read_export(nothing)
    assert len(str(refused.value).splitlines()) == 1


@pytest.mark.parametrize("batch_size", [2, 32])
def test_multi_vector_products_keep_their_view_index(small_data: Path, tmp_path: Path, batch_size: int) -> None:
    # Batches of 2 hold no product with the most views (the model's width): the NaN slots of the
    # views a product lacks must still be left out.
    torch.manual_seed(0)
    model = CLIP4CIR(CLIPBackbone("tiny"), Combiner(48), view_strategy="maxsim")
    reference = _evaluation_vectors(model, small_data)
    out = tmp_path / "export"
    data = CatalogueDataModule(str(small_data), split="val", num_workers=0, batch_size=batch_size)
    _trainer(EmbeddingWriter(str(out))).predict(model, datamodule=data, return_predictions=False)
    export = read_export(out)
    assert export.multi_vector
    got = _exported(out)
    for key, vectors in got.items():
        expected = reference[key].numpy()  # [V, D]: NaN rows where the product has fewer views
        views = int(np.isfinite(expected).all(-1).sum())
        assert np.allclose(vectors[:views], expected[:views], atol=1e-5), key
        assert not np.abs(vectors[views:]).any()
    assert export.views.max() >= 1  # some product has more than one view


def _predict(args: list[str], env: dict[str, str], killed: bool = False) -> None:
    proc = subprocess.run([LIGHTNING, "predict", *args], env={**env, "MASTER_PORT": str(free_port())},
                          capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == (-9 if killed else 0), proc.stderr[-3000:]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*"))}


@pytest.mark.slow
def test_a_killed_export_resumes_to_the_same_files_and_two_processes_write_them_too(small_data: Path,
                                                                                    tmp_path: Path) -> None:
    # One thread: a multi-threaded CPU reduction may split its sums differently from run to run (a
    # last-bit difference), and these files are compared byte for byte.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    release = tmp_path / "release"
    _release_layout(small_data, release)
    common = ["--config", DEMO, "--config", EXPORT, f"--data.init_args.source={release}",
              "--data.init_args.layout=fashionmv", "--data.init_args.part_size=4", "--data.init_args.batch_size=2",
              "--data.init_args.num_workers=0"]
    _predict([*common, f"--trainer.callbacks.init_args.out_dir={tmp_path / 'ref'}"], env)
    reference = _files(tmp_path / "ref")
    parts = json.loads((tmp_path / "ref" / EXPORT_FILE).read_text())["parts"]
    assert parts >= 3 and len(reference) == 2 * parts

    crash = tmp_path / "crash"
    out = f"--trainer.callbacks.init_args.out_dir={crash}"
    killer = "--trainer.callbacks+=" + json.dumps({"class_path": "support.kill.KillAt",
                                                   "init_args": {"predict_batch": 5}})
    _predict([*common, out, killer], env, killed=True)
    before = {n: (crash / f"part-{n:06d}.npy").stat().st_mtime_ns for n in finished_parts(crash)}
    assert 0 < len(before) < parts
    _predict([*common, out], env)
    assert _files(crash) == reference
    for n, stamp in before.items():  # finished parts were not redone
        assert (crash / f"part-{n:06d}.npy").stat().st_mtime_ns == stamp

    _predict([*common, f"--trainer.callbacks.init_args.out_dir={tmp_path / 'ddp'}", "--trainer.strategy=ddp",
              "--trainer.devices=2", "--trainer.accelerator=cpu"], env)
    assert _files(tmp_path / "ddp") == reference

    # cir index builds from the export, and refuses it to another model.
    from cir.index import main as cir_index

    cir_index(["--config", DEMO, "--untrained", "--embeddings", str(crash), "--out", str(tmp_path / "index"), "--",
               f"--data.init_args.data_dir={small_data}"])
    assert json.loads((tmp_path / "index" / "catalogue_summary.json").read_text())["indexed"]
    with pytest.raises(SystemExit, match="exported by another model: .*preprocessing 'fast' .export. vs 'exact'"):
        cir_index(["--config", DEMO, "--untrained", "--embeddings", str(crash), "--out", str(tmp_path / "index2"),
                   "--", f"--data.init_args.data_dir={small_data}",
                   "--model.init_args.backbone.init_args.preprocessing=exact"])
