"""Issue 25, items 2 and 3: no silent random model, no index queried by another model, no checkpoint
of one class evaluated under another's config, and every experiment writes under its own folder.

The command tests replace the model loader with one that fails the test: each refusal must come
before any model is built (and before any MLflow run is created).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from cir.lightning_cli import CIRCLI, _defaults_of, checkpoint_class, checkpoint_class_mismatch
from cir.models import FINGERPRINT, describe_transform, fingerprint_mismatch, load_weights_into, model_fingerprint
from lightning_modules.retrieval import GalleryIndex

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"
FP = {"family": "CLIP4CIR", "model_config": "aaaa", "checkpoint": "sha256:1111", "preprocessing": "fast",
      "image_transform": "HFImageTransform bbbb", "normalisation": "rescale 0.00392157; mean 0.5; std 0.5"}


class ModelBuilt(Exception):
    """Raised by the stand-in loader: the command got as far as building the model."""


def _no_model(*_: Any, **__: Any) -> Any:
    raise ModelBuilt


def _loader(fingerprint: dict[str, str]) -> Any:
    def load(*_: Any, **__: Any) -> tuple[None, None, dict[str, str]]:
        return None, None, fingerprint
    return load


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import cir.query
    import cir.search
    import cir.serve.command

    monkeypatch.setattr(cir.query, "load_model_and_data", _no_model)
    monkeypatch.setattr(cir.search, "load_with_fingerprint", _no_model)
    monkeypatch.setattr(cir.serve.command, "load_with_fingerprint", _no_model)


def _commands(tmp_path: Path) -> dict[str, tuple[Any, list[str]]]:
    import cir.query
    import cir.search
    import cir.serve.command

    index = _index(tmp_path / "index", FP)
    image = tmp_path / "front.png"
    Image.new("RGB", (8, 8)).save(image)
    return {
        "cir query": (cir.query.main, ["--config", str(DEMO), "--images", str(image), "--text", "red"]),
        "cir search build": (cir.search.main, ["build", "--config", str(DEMO), "--out", str(tmp_path / "out")]),
        "cir search query": (cir.search.main, ["query", "--config", str(DEMO), "--index", str(index), "--images",
                                               str(image), "--text", "red"]),
        "cir serve": (cir.serve.command.main, ["--config", str(DEMO)]),
    }


def _index(folder: Path, fingerprint: dict[str, str] | None) -> Path:
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    GalleryIndex.build(emb, [f"p{i}" for i in range(6)], ["synth_studio"] * 6, fingerprint=fingerprint).save(folder)
    return folder


def _one_line(error: pytest.ExceptionInfo[SystemExit]) -> str:
    message = str(error.value.code)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("command", ["cir query", "cir search build", "cir search query", "cir serve"])
def test_a_command_that_answers_queries_refuses_to_run_without_a_checkpoint(command: str, tmp_path: Path,
                                                                           no_model: None) -> None:
    main, argv = _commands(tmp_path)[command]
    with pytest.raises(SystemExit) as error:
        main(argv)
    message = _one_line(error)
    assert message.startswith(f"{command}: no --ckpt") and "--ckpt PATH" in message and "--untrained" in message
    with pytest.raises(ModelBuilt):  # told --untrained, it goes on to build the model
        main([*argv, "--untrained"])


@pytest.mark.parametrize("command", ["cir query", "cir search build", "cir search query", "cir serve"])
def test_a_missing_checkpoint_or_both_options_are_refused_before_the_model(command: str, tmp_path: Path,
                                                                          no_model: None) -> None:
    main, argv = _commands(tmp_path)[command]
    with pytest.raises(SystemExit) as error:
        main([*argv, "--ckpt", str(tmp_path / "missing.ckpt")])
    assert "missing.ckpt" in str(error.value.code) and "no such file" in str(error.value.code)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(SystemExit, match="--ckpt and --untrained exclude each other"):
        main([*argv, "--ckpt", str(ckpt), "--untrained"])


def test_an_index_keeps_the_fingerprint_it_was_built_with(tmp_path: Path) -> None:
    folder = _index(tmp_path / "index", FP)
    assert json.loads((folder / "gallery_index.json").read_text())["fingerprint"] == FP
    assert GalleryIndex.load(folder).fingerprint == FP
    old = _index(tmp_path / "old", None)  # as written before fingerprints were recorded
    assert "fingerprint" not in json.loads((old / "gallery_index.json").read_text())
    assert GalleryIndex.load(old).fingerprint is None


def test_a_mismatch_names_each_differing_field_with_both_values() -> None:
    assert fingerprint_mismatch(FP, dict(FP), "--index idx", "REBUILD") is None
    other = {**FP, "checkpoint": "untrained (seed 0)", "preprocessing": "exact"}
    message = fingerprint_mismatch(FP, other, "--index idx", "REBUILD")
    assert message is not None and "\n" not in message
    assert "checkpoint 'sha256:1111' (index) vs 'untrained (seed 0)' (this run)" in message
    assert "preprocessing 'fast' (index) vs 'exact' (this run)" in message
    assert "family" not in message and "model_config" not in message and "REBUILD" in message
    assert "rebuild it with REBUILD" in (fingerprint_mismatch(None, FP, "--index idx", "REBUILD") or "")


@pytest.mark.parametrize("field", FINGERPRINT)
def test_cir_search_query_refuses_an_index_of_another_model(field: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import cir.search

    commands = _commands(tmp_path)
    main, argv = commands["cir search query"]
    monkeypatch.setattr(cir.search, "load_with_fingerprint", _loader({**FP, field: "something else"}))
    monkeypatch.setattr(cir.search, "encode_query", _no_model)  # never embedded against the wrong space
    with pytest.raises(SystemExit) as error:
        main([*argv, "--untrained"])
    message = _one_line(error)
    assert message.startswith("cir search query: --index") and "was built by another model" in message
    assert f"{field} {FP[field]!r} (index) vs 'something else' (this run)" in message
    monkeypatch.setattr(cir.search, "load_with_fingerprint", _loader(dict(FP)))
    with pytest.raises(ModelBuilt):  # the same fingerprint: it goes on to embed the query
        main([*argv, "--untrained"])


def test_an_index_without_a_fingerprint_is_refused_before_the_model(tmp_path: Path, no_model: None) -> None:
    import cir.search
    import cir.serve.command

    old = _index(tmp_path / "old", None)
    image = tmp_path / "front.png"
    Image.new("RGB", (8, 8)).save(image)
    for prog, main, argv in [
        ("cir search query", cir.search.main, ["query", "--config", str(DEMO), "--index", str(old), "--images",
                                               str(image), "--text", "red", "--untrained"]),
        ("cir serve", cir.serve.command.main, ["--config", str(DEMO), "--index", str(old), "--untrained"]),
    ]:
        with pytest.raises(SystemExit) as error:
            main(argv)
        message = _one_line(error)
        assert message.startswith(f"{prog}: --index {old} records no model fingerprint")
        assert "rebuild it with cir search build" in message


def test_cir_serve_refuses_an_index_of_another_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cir.serve.command

    index = _index(tmp_path / "index", FP)
    monkeypatch.setattr(cir.serve.command, "load_with_fingerprint", _loader({**FP, "model_config": "cccc"}))
    monkeypatch.setattr(cir.serve.command, "SearchEngine", _no_model)
    with pytest.raises(SystemExit) as error:
        cir.serve.command.main(["--config", str(DEMO), "--index", str(index), "--untrained"])
    assert "model_config 'aaaa' (index) vs 'cccc' (this run)" in _one_line(error)


class _Processor:
    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def to_dict(self) -> dict[str, Any]:
        return dict(self.settings)


class _Transform:
    def __init__(self, processor: _Processor, preprocessing: str) -> None:
        self.processor, self.preprocessing = processor, preprocessing


class _Pad:
    def __init__(self, transform: Any) -> None:
        self.target_ratio, self.transform = 1.25, transform


CLIP_SETTINGS = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}


def test_the_fingerprint_records_preprocessing_settings_and_normalisation() -> None:
    mode, settings, norm = describe_transform(_Transform(_Processor(**CLIP_SETTINGS), "fast"))
    assert mode == "fast" and settings.startswith("_Transform ")
    assert norm == "rescale 0.00392157; mean 0.5,0.5,0.5; std 0.25,0.25,0.25"
    assert describe_transform(_Transform(_Processor(**CLIP_SETTINGS), "exact"))[0] == "exact"
    bigger = describe_transform(_Transform(_Processor(**{**CLIP_SETTINGS, "crop_size": {"height": 336}}), "fast"))
    assert bigger[1] != settings and bigger[2] == norm  # the geometry changes the settings' hash only
    other_std = describe_transform(_Transform(_Processor(**{**CLIP_SETTINGS, "image_std": [0.5] * 3}), "fast"))
    assert other_std[1] == settings and other_std[2] != norm
    padded = describe_transform(_Pad(_Transform(_Processor(**CLIP_SETTINGS), "fast")))  # FashionIQ's targetpad
    assert padded[0] == "fast" and padded[1].startswith("_Pad>_Transform ") and padded[2] == norm
    mode, chain, norm = describe_transform(None)
    assert (mode, norm) == ("n/a", "n/a") and chain.startswith("none ")


def test_the_fingerprint_hashes_the_checkpoint_bytes_and_names_an_untrained_seed(tmp_path: Path) -> None:
    model, transform = nn.Linear(2, 2), _Transform(_Processor(**CLIP_SETTINGS), "fast")
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, a)
    torch.save({"state_dict": {"w": torch.ones(3)}}, b)
    config = {"class_path": "x.Linear", "init_args": {"dim": 2}}
    fa, fb = model_fingerprint(model, transform, config, a), model_fingerprint(model, transform, config, b)
    assert set(fa) == set(FINGERPRINT) and fa["family"] == "Linear"
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", fa["checkpoint"]) and fa["checkpoint"] != fb["checkpoint"]
    assert model_fingerprint(model, transform, config, a) == fa  # stable
    assert model_fingerprint(model, transform, config, None, seed=0)["checkpoint"] == "untrained (seed 0)"
    other = model_fingerprint(model, transform, {**config, "init_args": {"dim": 3}}, a)
    assert other["model_config"] != fa["model_config"] and other["checkpoint"] == fa["checkpoint"]


def test_a_checkpoint_is_read_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import hashlib
    import os
    import time

    import cir.models
    from cir.models import file_digest

    ckpt, cache = tmp_path / "last.ckpt", tmp_path / "cache" / "digests.json"
    ckpt.write_bytes(b"weights of epoch 1" * 1000)
    reads: list[str] = []
    real_open = builtins.open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(ckpt) and "r" in mode:
            reads.append(mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    first = file_digest(ckpt, cache)
    assert first == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    reads.clear()
    assert file_digest(ckpt, cache) == first and reads == []  # the second start reads no checkpoint byte
    mtime, ctime = ckpt.stat().st_mtime_ns, ckpt.stat().st_ctime_ns
    ckpt.write_bytes(b"weights of epoch 2" * 1000)  # same size, and the old time put back (as cp -p would)
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, mtime))
    for _ in range(300):  # a file system with coarse times: wait until the change time has moved
        if ckpt.stat().st_ctime_ns != ctime:
            break
        time.sleep(0.01)
        os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, mtime))
    assert ckpt.stat().st_ctime_ns != ctime and ckpt.stat().st_mtime_ns == mtime
    second = file_digest(ckpt, cache)  # the change time, which no tool sets, still tells
    assert second == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16] != first and reads == ["rb"]
    gone = tmp_path / "gone.ckpt"
    gone.write_bytes(b"x")
    file_digest(gone, cache)
    assert str(gone) in cache.read_text()
    gone.unlink()
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"y")
    file_digest(other, cache)  # the next write drops the entry of the file that is gone
    assert str(gone) not in cache.read_text() and str(ckpt.resolve()) in cache.read_text()
    cache.write_text("{half a file")  # a damaged cache is ignored, then written whole again
    assert file_digest(ckpt, cache) == second and json.loads(cache.read_text())
    monkeypatch.delenv("CIR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("a file where the cache folder would be")
    assert cir.models.digest_cache() == tmp_path / "not-a-folder" / "fashion-cir" / "digests.json"
    assert file_digest(ckpt) == second  # an unwritable cache only costs the reading


def _checkpoint_of(path: Path, class_path: str | None) -> Path:
    hparams = {"_class_path": class_path, "seed": 0} if class_path else {}
    torch.save({"state_dict": {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, "hyper_parameters": hparams},
               path)
    return path


def test_a_checkpoint_of_another_class_is_refused_by_the_query_commands(tmp_path: Path) -> None:
    procir = _checkpoint_of(tmp_path / "procir.ckpt", "lightning_modules.ProCIR")
    assert checkpoint_class(procir) == "lightning_modules.ProCIR"
    with pytest.raises(SystemExit) as error:
        load_weights_into(nn.Linear(2, 2), procir)
    message = _one_line(error)
    assert "holds a ProCIR model (lightning_modules.ProCIR) but the config builds Linear" in message
    load_weights_into(nn.Linear(2, 2), _checkpoint_of(tmp_path / "plain.ckpt", None))  # no class recorded: loads
    load_weights_into(nn.Linear(2, 2), _checkpoint_of(tmp_path / "same.ckpt", "torch.nn.Linear"))


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_lightning_refuses_a_checkpoint_of_another_model_class_before_any_run(
        subcommand: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cir.lightning_cli import main

    monkeypatch.setattr(sys, "argv", ["lightning"])  # main hands LightningCLI its arguments through sys.argv
    monkeypatch.setattr(CIRCLI, "concise_errors", False)  # main sets it; restored after the test
    monkeypatch.setattr(CIRCLI, "instantiate_classes", _no_model)  # the model, the data, the MLflow logger
    sprc = _checkpoint_of(tmp_path / "sprc.ckpt", "lightning_modules.SPRC")
    with pytest.raises(SystemExit) as error:
        main([subcommand, "--config", str(DEMO), "--ckpt_path", str(sprc)])
    message = _one_line(error)
    assert message == (f"lightning {subcommand}: --ckpt_path {sprc} holds a SPRC model (lightning_modules.SPRC) "
                       "but the config builds CLIP4CIR (lightning_modules.CLIP4CIR): give the experiment that "
                       "checkpoint was trained with, or a checkpoint of CLIP4CIR")
    clip = tmp_path / "clip.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "lightning_modules.CLIP4CIR"}}, clip)
    with pytest.raises(ModelBuilt):  # the config's own class: it goes on
        main([subcommand, "--config", str(DEMO), "--ckpt_path", str(clip)])
    # The same class under its full module path is the same class; a class path read from a file is never imported.
    assert checkpoint_class_mismatch(sprc, "lightning_modules.families.sprc.model.SPRC", "p", "--ckpt") is None


def test_a_command_running_the_cli_refuses_another_class_in_one_line_and_a_library_gets_the_exception(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cir.lightning_cli import build_cli

    monkeypatch.delenv("CIR_DEBUG", raising=False)
    monkeypatch.setattr(CIRCLI, "instantiate_classes", _no_model)
    monkeypatch.setattr(CIRCLI, "concise_errors", False)  # as in a library, whatever ran before
    sprc = _checkpoint_of(tmp_path / "sprc.ckpt", "lightning_modules.SPRC")
    argv = ["validate", "--config", str(DEMO), "--ckpt_path", str(sprc)]
    with pytest.raises(SystemExit) as error:  # a cir command (prog given) that runs a subcommand
        build_cli(argv, prog="cir something")
    assert _one_line(error).startswith(f"cir something: --ckpt_path {sprc} holds a SPRC model")
    with pytest.raises(ValueError, match="holds a SPRC model"):  # a library caller
        build_cli(argv)


# -- item 3: every experiment writes under its own folder --------------------------------------------

EXPERIMENTS = sorted((ROOT / "experiments").rglob("*.yaml"))


def resolved_root_dir(experiment: Path) -> str | None:
    """``trainer.default_root_dir`` as LightningCLI resolves it: the ``defaults`` fragments in order,
    then the file; the last one that sets it wins. None for a file that is not a run (a sweep)."""
    root, is_run = None, False
    for path in [*_defaults_of(experiment.resolve()), experiment.resolve()]:
        config = yaml.safe_load(path.read_text()) or {}
        trainer = config.get("trainer") or {}
        is_run |= "trainer" in config or "model" in config
        root = trainer.get("default_root_dir", root)
    return root if is_run else None


def test_every_experiment_writes_under_its_own_folder() -> None:
    roots = {p.relative_to(ROOT).as_posix(): resolved_root_dir(p) for p in EXPERIMENTS}
    runs = {p: r for p, r in roots.items() if r is not None or "sweeps/" not in p}
    assert len(runs) > 50 and all(r and r.startswith("outputs/") for r in runs.values()), runs
    shared = {r: [p for p, q in runs.items() if q == r] for r, n in Counter(runs.values()).items() if n > 1}
    assert not shared, f"experiments sharing a default_root_dir (they overwrite each other's checkpoints): {shared}"


def _commands_with_checkpoints(text: str) -> list[tuple[str, str]]:
    """(experiment, checkpoint) of every command in ``text`` that names both as literal paths (a
    command continued over lines with a backslash, as in shell and docstrings, read as one)."""
    found = []
    for line in re.sub(r"\\+\n\s*(#\s*)?", " ", text).splitlines():
        config = re.search(r"--config (experiments/\S+\.yaml)", line)
        ckpt = re.search(r"--ckpt(?:_path)?[ =](outputs/\S+\.ckpt)", line)
        if config and ckpt and "..." not in ckpt.group(1):
            found.append((config.group(1), ckpt.group(1)))
    return found


def test_the_documented_commands_load_the_checkpoint_their_experiment_writes() -> None:
    commands = []
    docs = sorted((ROOT / "docs").rglob("*.md"))
    for doc in [ROOT / "README.md", ROOT / "Makefile", *docs, *sorted((ROOT / "cir").rglob("*.py")), *EXPERIMENTS]:
        commands += [(doc.relative_to(ROOT).as_posix(), *c) for c in _commands_with_checkpoints(doc.read_text())]
    assert any(doc == "Makefile" for doc, *_ in commands)  # `make serve`
    assert any(doc.startswith("docs/") for doc, *_ in commands)  # the serving and query pages
    for doc, experiment, ckpt in commands:
        # Its own checkpoint, or (an evaluation-only variant) one of the experiment it starts from.
        chain = [ROOT / experiment, *(p for p in _defaults_of((ROOT / experiment).resolve())
                                      if p.is_relative_to(ROOT / "experiments"))]
        roots = [r for r in map(resolved_root_dir, chain) if r]
        assert any(ckpt.startswith(f"{r}/checkpoints/") for r in roots), \
            f"{doc}: --config {experiment} --ckpt {ckpt}, but it writes under {roots[0]}/"


# -- end to end: the demo model, a real index -------------------------------------------------------

def _data_args(folder: Path) -> list[str]:
    return [f"--data.init_args.data_dir={folder}", "--data.init_args.products=120",
            "--data.init_args.generator_seed=3", "--data.init_args.val_fraction=0.25",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=8"]


def test_an_index_is_queried_only_by_the_model_that_built_it(small_data: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from cir.models import load_model_and_data
    from cir.search import main

    data = _data_args(small_data)
    index = tmp_path / "index"
    main(["build", "--config", str(DEMO), "--untrained", "--out", str(index), "--", *data])
    recorded = GalleryIndex.load(index).fingerprint
    assert recorded is not None and recorded["family"] == "CLIP4CIR" and recorded["checkpoint"] == "untrained (seed 0)"
    assert recorded["preprocessing"] == "fast" and recorded["normalisation"].startswith("rescale ")

    image = tmp_path / "front.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    query = ["query", "--config", str(DEMO), "--index", str(index), "--images", str(image), "--text", "make it red",
             "--dataset", "synth_studio", "-k", "3"]
    capsys.readouterr()
    main([*query, "--untrained", "--", *data])  # the same model: answered
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # the header and 3 products

    model, _ = load_model_and_data([str(DEMO)], None, data)
    ckpt = tmp_path / "trained.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)  # the same weights, but a checkpoint: another fingerprint
    with pytest.raises(SystemExit) as error:
        main([*query, "--ckpt", str(ckpt), "--", *data])
    message = _one_line(error)
    assert "was built by another model: checkpoint 'untrained (seed 0)' (index) vs 'sha256:" in message
    assert "model_config" not in message and "family" not in message


def test_settings_that_do_not_change_the_embedding_leave_the_fingerprint_alone() -> None:
    from torch import nn

    from cir.models import model_fingerprint

    base = {"class_path": "lightning_modules.CLIP4CIR",
            "init_args": {"view_strategy": "pooled", "evaluation": {"backend": "torch"}, "optimizer": "AdamW"}}
    evaluation = {**base, "init_args": {**base["init_args"], "evaluation": {"backend": "faiss"}, "optimizer": "SGD"}}
    strategy = {**base, "init_args": {**base["init_args"], "view_strategy": "maxsim"}}
    fp = [model_fingerprint(nn.Linear(1, 1), None, c, None, seed=0)["model_config"] for c in (base, evaluation,
                                                                                               strategy)]
    assert fp[0] == fp[1] != fp[2]
