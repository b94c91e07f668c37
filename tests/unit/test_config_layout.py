"""``configs/`` mirrors the code: each fragment sets only its own section, and experiments are
overrides that start from fragments or from other experiments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# Folder of configs/ → the top-level keys its fragments may set.
# export/: a run mode given after an experiment (lightning predict as the catalogue exporter): it
# swaps the data for the exporter's and the callbacks for its writer, and keeps the model.
SECTIONS = {"trainer": {"trainer"}, "callbacks": {"trainer"}, "logger": {"trainer"}, "data": {"data"},
            "model": {"model"}, "eval": {"model"}, "export": {"data", "trainer", "return_predictions"}}
FRAGMENTS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_a_fragment_sets_only_its_own_section(path: Path) -> None:
    folder = path.relative_to(ROOT / "configs").parts[0]
    config = yaml.safe_load(path.read_text()) or {}
    keys = set(config) - {"defaults"}
    assert keys <= SECTIONS[folder], f"{path.name} sets {sorted(keys - SECTIONS[folder])}"
    trainer = config.get("trainer", {})
    if folder == "callbacks":
        assert set(trainer) == {"callbacks"}
    elif folder in ("trainer", "logger"):
        assert "callbacks" not in trainer  # callback lists live in configs/callbacks/ only
    if folder == "export":
        assert set(trainer) <= {"callbacks", "logger"} and "model" not in config
        assert config["data"]["class_path"] == "datamodules.CatalogueDataModule"
    if folder == "eval":  # a protocol owns model.init_args.evaluation and nothing else of the model
        assert set(config["model"]) == {"init_args"} and set(config["model"]["init_args"]) == {"evaluation"}
    if folder == "model":
        assert "evaluation" not in config["model"].get("init_args", {})  # protocols live in configs/eval/


def test_every_folder_of_configs_is_a_known_section() -> None:
    assert {p.relative_to(ROOT / "configs").parts[0] for p in FRAGMENTS} == set(SECTIONS)
