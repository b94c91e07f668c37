"""Issue 25, item 4: a user's mistake is one to three lines and a non-zero exit, never a traceback.

Each mistake runs through the command's own ``main`` as the console script would (a ``SystemExit``
message is what Python prints to stderr), with the model loader (or LightningCLI's instantiation)
replaced by one that fails the test: every file named is checked before any model is built, and
before any MLflow run exists. ``CIR_DEBUG=1`` keeps the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

import cir.mine
import cir.models
import cir.query
import cir.search
import cir.serve.command
from cir.lightning_cli import CIRCLI
from cir.lightning_cli import main as lightning_main

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"


class ModelBuilt(Exception):
    """The command got as far as building the model (or, for ``lightning``, anything at all)."""


def _no_model(*_: Any, **__: Any) -> Any:
    raise ModelBuilt


@pytest.fixture(autouse=True)
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["cir"])
    monkeypatch.setattr(cir.query, "load_model_and_data", _no_model)
    monkeypatch.setattr(cir.mine, "load_model_and_data", _no_model)
    monkeypatch.setattr(CIRCLI, "instantiate_classes", _no_model)  # the model, the data, the MLflow logger
    monkeypatch.setattr(CIRCLI, "concise_errors", False)  # lightning's main sets it; restored after the test


def stderr_of(main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The lines a user sees on stderr when ``main(argv)`` fails; asserts a non-zero exit status."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # Python prints the message and exits with 1
        err, code = err + code + "\n", 1
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3, err
    assert "Traceback" not in err
    return lines


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "front.png"
    Image.new("RGB", (8, 8), "red").save(path)
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"weights")
    return path


def _shard_experiment(tmp_path: Path, data_dir: Path) -> Path:
    """An experiment over a shard folder (ShardDataModule) at ``data_dir``."""
    exp = tmp_path / "shards.yaml"
    exp.write_text(f"defaults:\n  - {ROOT}/configs/trainer/cpu.yaml\n  - {ROOT}/configs/data/fashionmv.yaml\n"
                   f"  - {ROOT}/configs/model/clip4cir/tiny.yaml\n"
                   f"data:\n  init_args:\n    data_dir: {data_dir}\n")
    return exp


# -- a wrong --config path ------------------------------------------------------------------------

def test_a_wrong_config_path_is_one_line_in_every_command(tmp_path: Path, image: Path, ckpt: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.yaml")
    commands: dict[str, tuple[Callable[[list[str]], None], list[str]]] = {
        "cir query": (cir.query.main, ["--config", missing, "--ckpt", str(ckpt), "--images", str(image)]),
        "cir search build": (cir.search.main, ["build", "--config", missing, "--untrained", "--out",
                                               str(tmp_path / "index")]),
        "cir serve": (cir.serve.command.main, ["--config", missing, "--ckpt", str(ckpt)]),
        "cir mine-negatives": (cir.mine.main, ["--config", missing, "--ckpt", str(ckpt)]),
        "lightning validate": (lightning_main, ["validate", "--config", missing]),
    }
    for command, (main, argv) in commands.items():
        lines = stderr_of(main, argv, capsys)
        assert "nope.yaml" in lines[0] and ("no such file" in lines[0] or "not found" in lines[0]), (command, lines)


def test_a_missing_fragment_of_a_config_is_one_line(tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cir.query, "load_model_and_data", cir.models.load_model_and_data)  # reads the fragments
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults: [missing.yaml]\n")
    for main, argv in [(cir.query.main, ["--config", str(exp), "--untrained", "--images", str(image)]),
                       (cir.search.main, ["build", "--config", str(exp), "--untrained", "--out", str(tmp_path)]),
                       (lightning_main, ["validate", "--config", str(exp)])]:
        lines = stderr_of(main, argv, capsys)
        assert "missing.yaml" in lines[0] and "exp.yaml" in lines[0]


# -- a missing checkpoint -------------------------------------------------------------------------

def test_a_missing_checkpoint_is_one_line_before_the_model(tmp_path: Path, image: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    lines = stderr_of(cir.query.main, ["--config", str(DEMO), "--ckpt", str(tmp_path / "missing.ckpt"),
                                       "--images", str(image)], capsys)
    assert lines == [f"cir query: --ckpt {tmp_path / 'missing.ckpt'}: no such file"]


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_lightning_refuses_a_missing_ckpt_path_before_any_mlflow_run(subcommand: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # instantiate_classes (which creates the MLflow run) fails the test with ModelBuilt if reached.
    lines = stderr_of(lightning_main, [subcommand, "--config", str(DEMO), "--ckpt_path", "missing.ckpt"], capsys)
    assert lines == [f"lightning {subcommand}: --ckpt_path missing.ckpt: no such file"]


# -- a missing data folder ------------------------------------------------------------------------

def test_a_missing_shard_folder_is_one_line_before_the_model(tmp_path: Path, image: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    exp = _shard_experiment(tmp_path, tmp_path / "no-shards")
    monkeypatch.setattr(cir.query, "load_model_and_data", cir.models.load_model_and_data)  # the real loader
    for main, argv in [(lightning_main, ["validate", "--config", str(exp)]),
                       (cir.query.main, ["--config", str(exp), "--untrained", "--images", str(image)])]:
        lines = stderr_of(main, argv, capsys)
        assert len(lines) == 1 and f"{tmp_path / 'no-shards'} is not a shard folder" in lines[0], lines
        assert lines[0].startswith(("lightning validate: ", "cir query: "))


# -- --images -------------------------------------------------------------------------------------

def test_a_missing_or_non_image_file_is_one_line_before_the_model(tmp_path: Path, image: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    base = ["--config", str(DEMO), "--untrained", "--text", "red", "--images", str(image)]
    lines = stderr_of(cir.query.main, [*base, str(tmp_path / "back.png")], capsys)
    assert lines == [f"cir query: --images {tmp_path / 'back.png'}: no such file"]
    lines = stderr_of(cir.query.main, [*base, str(not_image)], capsys)
    assert lines == [f"cir query: --images {not_image}: not an image PIL can read"]
    with pytest.raises(ModelBuilt):  # readable images: it goes on to the model
        cir.query.main(base)


def test_a_non_image_reaching_the_model_is_still_one_line(tmp_path: Path) -> None:
    """A command that does not check --images first still ends in one line, after the model."""
    from cir.models import query_batch

    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(SystemExit) as exit_info:
        query_batch(SimpleNamespace(image_transform=lambda x: x), [str(not_image)], "red")  # type: ignore[arg-type]
    assert "\n" not in str(exit_info.value.code) and "notes.png" in str(exit_info.value.code)


# -- Ctrl-C ---------------------------------------------------------------------------------------

def test_ctrl_c_while_loading_is_a_clean_exit(image: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cir.query, "load_model_and_data", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cir.query.main(["--config", str(DEMO), "--untrained", "--images", str(image)])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["cir query: interrupted"]


# -- CIR_DEBUG keeps the traceback ----------------------------------------------------------------

def test_debug_keeps_the_exception(tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIR_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cir.query.main(["--config", str(tmp_path / "nope.yaml"), "--untrained", "--images", str(image)])
    with pytest.raises(FileNotFoundError):
        lightning_main(["validate", "--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(FileNotFoundError):
        lightning_main(["validate", "--config", str(DEMO), "--ckpt_path", "missing.ckpt"])


@pytest.mark.slow
def test_the_console_script_prints_one_line(tmp_path: Path) -> None:
    """The real entry point, in a fresh process: no traceback, one line, a non-zero status."""
    env = {k: v for k, v in os.environ.items() if k != "CIR_DEBUG"}
    for argv in (["query", "--config", str(tmp_path / "nope.yaml"), "--untrained", "--images", "x.png"],
                 ["validate", "--config", str(DEMO), "--ckpt_path", str(tmp_path / "missing.ckpt")]):
        done = subprocess.run([sys.executable, "-m", "cir", *argv], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=300)
        assert done.returncode != 0 and 1 <= len(done.stderr.strip().splitlines()) <= 3, done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "outputs").exists()  # no MLflow run was made
