"""`cir build` end to end on a generated catalogue with the oracle backend: exact counts per stage
against the ground truth, candidates inside their group, a kill -9 in two stages resumed to the
same bytes, the HTTP backend through a local server to the same bytes, and the release trains a
model above chance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from cir.build import main as cir_build
from datamodules.synthetic import generate
from datamodules.synthetic.attributes import change_views, differences
from datamodules.synthetic.catalogue import write_catalogue_layout
from lightning_modules.construction.journal import read_journal

ROOT = Path(__file__).resolve().parents[2]
PAPER_VIEW = {"front": "front", "back": "back", "side_left": "side", "side_right": "side", "detail": "detail"}
OPTIONS = ["--backend", "oracle", "--image-encoder", "clip:tiny", "--composite-height", "96", "--no-progress"]
RELEASE = ["train_captions.jsonl", "val_captions.jsonl", "train_triplets.jsonl", "val_triplets.jsonl"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalogue")
    write_catalogue_layout(root, generate(450, seed=3), seed=3)
    broken = root / "images" / "broken" / "b1"
    broken.mkdir(parents=True)
    (broken / "00.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def built(catalogue: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built")
    cir_build(["--catalogue", str(catalogue), "--out", str(out), *OPTIONS])
    return out


def _truth(catalogue: Path) -> dict[str, dict[str, Any]]:
    return {r["product_id"]: r for r in map(json.loads, (catalogue / "ground_truth.jsonl").read_text().splitlines())}


def _valid(src: dict[str, Any], cand: dict[str, Any]) -> bool:
    """Written apart from the oracle: a describable change (1-3 attributes, each visible in a view
    both products have) spanning at least 2 of the paper's view names."""
    if not cand["clothing"] or cand["attributes"]["category"] != src["attributes"]["category"]:
        return False
    changes = differences(src["attributes"], cand["attributes"])
    if not 1 <= len(changes) <= 3:
        return False
    views: set[str] = set()
    for name, (old, new) in changes.items():
        shared = [v for v in change_views(name, old, new) if v in src["view_names"] and v in cand["view_names"]]
        if not shared:
            return False
        views |= {PAPER_VIEW[v] for v in shared}
    return len(views) >= 2


def test_counts_per_stage_match_the_ground_truth(catalogue: Path, built: Path) -> None:
    truth = _truth(catalogue)
    summary = json.loads((built / "build_summary.json").read_text())
    clothing = [t for t in truth.values() if t["clothing"]]
    lr_errors = sum(t["lr_error"] for t in clothing)
    assert summary["catalogue"] == {"products_in": len(truth) + 1, "no_readable_images": 1, "unreadable_views": 1,
                                    "without_category": 0}  # the broken product, unlisted, is skipped first
    assert summary["captions"] == {"requested": len(truth), "non_clothing": len(truth) - len(clothing), "failed": 0,
                                   "clothing": len(clothing)}
    assert 0 < lr_errors < len(clothing)
    assert summary["verify"] == {"checked": len(clothing), "left_right_errors": lr_errors, "failed": 0,
                                 "retained": len(clothing) - lr_errors}

    split = {r["product_id"]: r.get("split") for r in map(json.loads, (catalogue / "products.jsonl").read_text()
                                                          .splitlines())}
    expected = {"train": 0, "val": 0}
    for record in read_journal(built / "build" / "triplets.jsonl"):
        src = truth[record["key"]]
        valid = [c for c in record["candidates"] if _valid(src, truth[c])]
        expected[split[record["key"]]] += min(2, len(valid))
        assert len(record["candidates"]) <= 10
        for c in record["candidates"]:  # same split, dataset and category as the source
            assert (split[c], truth[c]["dataset"], truth[c]["attributes"]["category"]) == \
                   (split[record["key"]], src["dataset"], src["attributes"]["category"])
        assert all(sel["target_id"] in record["candidates"] for sel in record["value"])
    assert summary["triplets"]["per_split"] == expected and expected["val"] > 10
    assert sum(c["count"] for c in summary["view_combinations"]) == sum(expected.values())

    released = {s: [json.loads(line) for line in (built / f"{s}_captions.jsonl").read_text().splitlines()]
                for s in ("train", "val")}
    ids = {s: {r["product_id"] for r in rows} for s, rows in released.items()}
    assert not ids["train"] & ids["val"]  # zero overlap
    assert not any(truth[p]["lr_error"] or not truth[p]["clothing"] for s in ids for p in ids[s])
    for rows in released.values():
        for r in rows:
            files = sorted(p.name for p in (built / "images" / r["dataset"] / r["product_id"]).iterdir())
            assert files == r["views"] and len(r["image_captions"]) == len(files)
    assert summary["models"] == {"captions": ["oracle"], "verify": ["oracle"], "triplets": ["oracle"]}
    assert summary["usage"]["captions"]["answers_by_model"] == {"oracle": len(truth)}
    assert set(summary["caption_words"]) == {"synth_studio", "synth_street"}
    for words in summary["caption_words"].values():  # the oracle pads to the paper's lower bounds
        assert words["per_image"] >= 50 and words["long_caption"] >= 200 and words["short_caption"] >= 40
    assert summary["usage"]["captions"]["answers"] == len(truth)


SLOW_BUILD = textwrap.dedent("""
    import sys, time
    from cir.build import build_parser, config_from
    from lightning_modules.construction.oracle import OracleChat
    from lightning_modules.construction.pipeline import build

    class Slow(OracleChat):
        def complete(self, requests, on_result):
            for i, r in enumerate(requests):
                time.sleep(0.01)
                super().complete([r], lambda _, c, i=i: on_result(i, c))

    args = build_parser().parse_args(sys.argv[1:])
    build(config_from(args), lambda stage: Slow(f"{args.catalogue}/ground_truth.jsonl"))
""")


def _kill_during(stage: str, lines: int, argv: list[str], out: Path, script: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(script), *argv], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / "build" / f"{stage}.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= lines:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_9_in_two_stages_then_rerun_gives_the_same_files(catalogue: Path, built: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD)
    argv = ["--catalogue", str(catalogue), "--out", str(out), *OPTIONS]
    _kill_during("captions", 50, argv, out, script)
    done = len(read_journal(out / "build" / "captions.jsonl"))
    assert 50 <= done < 450 and not (out / "build" / "verify.jsonl").exists()
    _kill_during("triplets", 40, argv, out, script)
    assert 40 <= len(read_journal(out / "build" / "triplets.jsonl")) < 200
    cir_build(argv)
    for name in RELEASE:
        assert (out / name).read_bytes() == (built / name).read_bytes(), name
    images = sorted(p.relative_to(out) for p in (out / "images").rglob("*") if p.is_file())
    assert images == sorted(p.relative_to(built) for p in (built / "images").rglob("*") if p.is_file())
    assert not list(out.rglob(".*.tmp"))
    resumed, whole = (json.loads((d / "build_summary.json").read_text()) for d in (out, built))
    assert {k: v for k, v in resumed.items() if k != "usage"} == {k: v for k, v in whole.items() if k != "usage"}
    # The oracle answers one request at a time, so a kill lost none in flight: every answer on file once.
    assert resumed["usage"]["captions"]["answers"] == whole["usage"]["captions"]["answers"] == len(_truth(catalogue))


def test_the_http_backend_through_a_local_server_builds_the_same_files(catalogue: Path, built: Path,
                                                                      tmp_path: Path) -> None:
    from cir.build import build_parser, config_from
    from lightning_modules.construction.oracle import OracleChat
    from lightning_modules.construction.pipeline import build
    from lightning_modules.generation import OpenAIChat
    from lightning_modules.generation.local_server import serve_backend

    out = tmp_path / "out"
    args = build_parser().parse_args(["--catalogue", str(catalogue), "--out", str(out), *OPTIONS])
    with serve_backend(OracleChat(catalogue / "ground_truth.jsonl"), refuse_every=9) as (url, app):
        summary = build(config_from(args), lambda stage: OpenAIChat(url, "oracle", concurrency=16, backoff_s=0.01,
                                                                    send_tag=True))
    for name in RELEASE:
        assert (out / name).read_bytes() == (built / name).read_bytes(), name
    assert app.refused > 0 and summary["usage"]["captions"]["http_requests"] > summary["usage"]["captions"]["answers"]


@pytest.mark.slow
def test_the_release_converts_and_trains_above_chance(built: Path, tmp_path: Path) -> None:
    import lightning as L
    import torch

    from datamodules import ShardDataModule
    from datamodules.converters import convert_fashionmv
    from lightning_modules import CLIP4CIR, Combiner
    from lightning_modules.backbones import CLIPBackbone

    summary = convert_fashionmv(built, tmp_path / "shards")
    released = json.loads((built / "build_summary.json").read_text())["triplets"]["per_split"]
    assert sum(c["val"]["triplets_written"] for c in summary.values() if "val" in c) == released["val"]
    L.seed_everything(0)
    dm = ShardDataModule(str(tmp_path / "shards"), batch_size=32, eval_batch_size=64, num_workers=0)
    model = CLIP4CIR(CLIPBackbone("tiny"), Combiner(48), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer = L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # Small galleries (~25-30 products each) make one dataset's recall noisy: pool the queries of
    # both, and compare with the chance rate of those same queries.
    hits = chance = queries = 0.0
    for ds in ("synth_studio", "synth_street"):
        n, size = metrics[f"val/{ds}/queries"], metrics[f"val/{ds}/gallery_size"]
        print(ds, n, size, {k: round(metrics[f"val/{ds}/recall_at_{k}"], 3) for k in (1, 5, 10)},
              {k: round(metrics[f"val/{ds}/text_blind/recall_at_{k}"], 3) for k in (1, 5, 10)})
        hits += n * metrics[f"val/{ds}/recall_at_5"]
        chance += n * 5 / size
        queries += n
    # This checks that the built release is usable training data, not that a tiny model composes
    # (tests/integration/test_training_quality.py does, against the text-blind line). Measured with
    # training seeds 0/1/2 (generator version 5, epoch permutation sampling): pooled R@5 hits 37/46/37
    # against a chance of 19.8 (1.87-2.32x); its text-blind line scored 29/39/37, and with the source
    # removed from the ranking 47/52/45 against 37/46/50: 8 epochs on ~440 triplets do not beat
    # ignoring the text, so no text-blind margin is asserted here. 1.5x chance stays under the
    # lowest of the three seeds by a fifth.
    assert queries > 50 and hits > 1.5 * chance


def test_a_rerun_asks_nothing_and_other_settings_are_refused(catalogue: Path, built: Path) -> None:
    before = {name: (built / name).read_bytes() for name in RELEASE}
    usage = json.loads((built / "build_summary.json").read_text())["usage"]
    cir_build(["--catalogue", str(catalogue), "--out", str(built), *OPTIONS])
    assert {name: (built / name).read_bytes() for name in RELEASE} == before
    assert json.loads((built / "build_summary.json").read_text())["usage"] == usage
    with pytest.raises(SystemExit, match=r"other settings \(neighbours, val_fraction; see"):
        cir_build(["--catalogue", str(catalogue), "--out", str(built), *OPTIONS, "--val-fraction", "0.3",
                   "--neighbours", "5"])
