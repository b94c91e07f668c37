"""Config mistakes and unbuildable runs are reported in a few lines that name the key or id."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cir.errors import concise
from cir.lightning_cli import CIRCLI, main

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"


def run(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> list[str]:
    monkeypatch.setattr(CIRCLI, "concise_errors", False)  # main() turns it on; restored after the test
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO), "--data.init_args.data_dir=/nonexistent", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    start = next(i for i, line in enumerate(err) if line.endswith(("error in the configuration",
                                                                   "could not build the run")))
    return err[start:]  # from our report on (other libraries may log before it)


def test_a_misspelt_key_names_the_closest(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    err = run(["--model.init_args.loss.init_args.temperatur=0.1"], monkeypatch, capsys)
    assert len(err) <= 15
    assert "model.init_args.loss.init_args.temperatur: no such key" in err[1]
    assert "did you mean model.init_args.loss.init_args.temperature?" in err[1]


def test_a_misspelt_trainer_key_is_not_taken_as_an_abbreviation(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    err = run(["--trainer.max_epoch=3"], monkeypatch, capsys)
    assert len(err) <= 15 and "trainer.max_epoch: no such key (did you mean trainer.max_epochs?)" in err[1]


def test_a_wrong_type_names_the_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    err = run(["--data.init_args.batch_size=many"], monkeypatch, capsys)
    assert len(err) <= 15 and err[1].strip().startswith("data.init_args.batch_size:") and "many" in err[1]


def test_an_unreachable_hub_id_fails_fast_and_names_it(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    t0 = time.perf_counter()
    err = run(["--model.init_args.backbone.init_args.name_or_path=someorg/no-such-clip"], monkeypatch, capsys)
    assert time.perf_counter() - t0 < 20
    assert len(err) <= 15 and "'someorg/no-such-clip'" in err[1] and "cannot be reached" in err[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = run(["--model.init_args.backbone.init_args.name_or_path=someorg/no-such-clip"], monkeypatch, capsys)
    assert "HF_HUB_OFFLINE is set" in err[1]


def test_debug_prints_the_full_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(CIRCLI, "concise_errors", False)
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        main(["fit", "--debug", "--config", str(DEMO), "--model.init_args.loss.init_args.temperatur=0.1"])
    err = capsys.readouterr().err
    assert "Does not validate against any of the Union subtypes" in err and len(err.splitlines()) > 15


def test_concise_keeps_the_leaf_of_a_nested_union_error() -> None:
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'lightning_modules.ProCIR':
        Parser key "backbone":
          Errors:
            - Problem with given class_path 'lightning_modules.backbones.QwenBackbone':
                Option 'name_or_pat' is not accepted
            - Expected a <class 'NoneType'>
    - Expected a <class 'NoneType'>"""
    assert concise(message) == ("model.init_args.backbone.init_args.name_or_pat: no such key of "
                                "lightning_modules.backbones.QwenBackbone (did you mean "
                                "model.init_args.backbone.init_args.name_or_path?)")
