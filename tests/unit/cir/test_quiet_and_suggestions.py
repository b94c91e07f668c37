"""Issue 25, item 8 (parts): model commands without Lightning's chatter unless asked; a ``class_path``
typo and a key given at the wrong depth are answered with the nearest thing that exists."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest

from cir.errors import closest_class, concise
from cir.lightning_cli import CIRCLI, config_tree, main, quiet_lightning

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"


def config_error(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """The detail line of ``lightning fit --config DEMO ARGS``'s config error."""
    monkeypatch.setattr(CIRCLI, "concise_errors", False)  # main() turns it on; restored after the test
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DEMO), *args])
    err = capsys.readouterr().err.strip().splitlines()
    start = next(i for i, line in enumerate(err) if line.endswith("error in the configuration"))
    assert len(err) - start <= 3
    return err[start + 1].strip()


# -- a key at the wrong depth ---------------------------------------------------------------------

def test_a_key_at_the_wrong_depth_points_at_the_nested_key(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    detail = config_error(["--model.init_args.temprature=0.1"], monkeypatch, capsys)
    assert detail == ("model.init_args.temprature: no such key of lightning_modules.CLIP4CIR "
                      "(did you mean model.init_args.loss.init_args.temperature?)")


def test_the_config_tree_follows_the_files_and_class_path_overrides(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  class_path: x.A\n  init_args:\n    loss:\n      class_path: x.L\n")
    b.write_text("model:\n  init_args:\n    loss:\n      init_args:\n        temperature: 0.1\n")
    tree = config_tree(["fit", "--config", str(a), f"--config={b}", "--model.init_args.fusion.class_path=x.F"])
    assert tree == {"model": {"class_path": "x.A", "init_args": {
        "loss": {"class_path": "x.L", "init_args": {"temperature": 0.1}}, "fusion": {"class_path": "x.F"}}}}


def test_a_message_without_the_config_is_unchanged() -> None:
    message = """Parser key "model":
  Errors:
    - Problem with given class_path 'lightning_modules.CLIP4CIR':
        Option 'temprature' is not accepted"""
    assert concise(message) == "model.init_args.temprature: no such key of lightning_modules.CLIP4CIR"


# -- a class_path typo ----------------------------------------------------------------------------

def _class_error(path: str, leaf: str) -> str:
    return f"""Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path '{path}':
        {leaf}
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>"""


def test_a_class_path_typo_names_the_nearest_registered_class() -> None:
    detail = concise(_class_error("lightning_modules.CLIP4CIRR", "module 'lightning_modules' has no attribute "
                                  "'CLIP4CIRR'"))
    assert detail == ("model: module 'lightning_modules' has no attribute 'CLIP4CIRR' "
                      "(did you mean lightning_modules.CLIP4CIR?)")
    detail = concise(_class_error("lightning_module.SPRC", "No module named 'lightning_module'"))
    assert detail.endswith("(did you mean lightning_modules.SPRC?)")
    detail = concise(_class_error("lightning_modules.losses.SymetricInfoNCE",
                                  "module 'lightning_modules' has no attribute 'losses'"))
    assert detail.endswith("(did you mean lightning_modules.SymmetricInfoNCE?)")
    assert closest_class("datamodules.ShardDataModul") == "datamodules.ShardDataModule"


def test_a_class_path_typo_on_the_command_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    detail = config_error(["--model.class_path=lightning_modules.CLIP4CIRR"], monkeypatch, capsys)
    assert detail.endswith("(did you mean lightning_modules.CLIP4CIR?)")
    detail = config_error(["--model=CLIP4CIRR"], monkeypatch, capsys)
    assert detail.endswith("(did you mean lightning_modules.CLIP4CIR?)")


def test_nothing_is_suggested_for_a_class_that_exists_but_fails_to_import() -> None:
    detail = concise(_class_error("lightning_modules.CLIP4CIR", "No module named 'peft'"))
    assert "did you mean" not in detail


# -- quiet by default -----------------------------------------------------------------------------

class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("verbose", [None, "CIR_VERBOSE", "CIR_DEBUG"])
def test_a_trainer_says_nothing_of_accelerators_or_tips_unless_asked(verbose: str | None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIR_VERBOSE", raising=False)
    monkeypatch.delenv("CIR_DEBUG", raising=False)
    if verbose:
        monkeypatch.setenv(verbose, "1")
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(log, "filters", [])  # restored after the test
    handler = Lines()
    log.addHandler(handler)
    try:
        quiet_lightning()  # what every model command's CLI does
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    finally:
        log.removeHandler(handler)
    chatter = [line for line in handler.lines if line.startswith(("GPU available", "TPU available", "💡"))]
    assert len(chatter) >= 2 if verbose else chatter == [], handler.lines
