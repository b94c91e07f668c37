"""``cir``: one command, each subcommand routed to its module, shared handling of ``--``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cir.__main__ import COMMANDS, TRAINER_COMMANDS, main
from cir.args import split_passthrough


def test_every_subcommand_module_has_a_main() -> None:
    import importlib

    for name, module in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"cir {c}" in out for c in COMMANDS) and "fit|validate|test|predict" in out


def test_an_unknown_command_names_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="did you mean 'cir search'"):
        main(["serch"])
    assert "fit" in TRAINER_COMMANDS


def test_cir_data_writes_a_shard_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cir", "ignored"])
    main(["data", "synthetic", "--out", str(tmp_path / "gen"), "--products", "40", "--seed", "1"])
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["products"] + manifest["splits"]["val"]["products"] == 40
    assert sys.argv == ["cir data"]  # cleared for LightningCLI, which other commands build

    # The README's way to train on it as it is, whatever settings made it.
    from cir.lightning_cli import build_cli

    root = Path(__file__).resolve().parents[3]
    cli = build_cli(["fit", "--config", str(root / "experiments/demos/clip4cir.yaml"), "--data",
                     "datamodules.ShardDataModule", f"--data.init_args.data_dir={tmp_path / 'gen'}",
                     "--data.init_args.num_workers=0", "--data.init_args.batch_size=4", "--trainer.fast_dev_run=1",
                     f"--trainer.default_root_dir={tmp_path}"])
    assert type(cli.datamodule).__name__ == "ShardDataModule" and cli.trainer.state.finished


def test_passthrough_splits_at_the_first_double_dash() -> None:
    assert split_passthrough(["--a", "1", "--", "--data.x=2", "--", "y"]) == (["--a", "1"], ["--data.x=2", "--", "y"])
    assert split_passthrough(["--a"]) == (["--a"], [])


def test_a_command_without_config_overrides_refuses_them() -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--experiment", "x", "--", "--model.init_args.lr=1"])


def test_search_and_query_ask_which_gallery_by_its_option_name() -> None:
    from cir.search import choose_dataset

    assert choose_dataset(["a", "a"], None, "cir search query") == "a"
    with pytest.raises(SystemExit, match=r"cir search query: the gallery holds datasets \['a', 'b'\]: choose one "
                                         r"with --dataset"):
        choose_dataset(["a", "b"], None, "cir search query")
    with pytest.raises(SystemExit, match="--dataset c: not in the gallery"):
        choose_dataset(["a", "b"], "c", "cir search query")


def test_query_reads_piped_texts_without_a_prompt() -> None:
    # At a terminal the prompt loop reads with input() (tests/unit/cir/test_query_terminal.py); from a
    # pipe or --text it reads the lines as given, with no prompt in the output, and ends at their end.
    from cir.query import _lines

    read = _lines(iter(["make it red", "add a pocket"]))
    assert [read("query> "), read("query> ")] == ["make it red", "add a pocket"]
    with pytest.raises(EOFError):
        read("query> ")


def test_compare_writes_under_outputs_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its CSV and Markdown no longer land in the working directory."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    client = mlflow.MlflowClient(uri)  # explicit: an earlier test may have set mlflow's process-wide URI
    exp = client.create_experiment("e")
    run = client.create_run(exp, run_name="r", tags={"family": "CLIP4CIR", "stage": "fit"})
    client.log_metric(run.info.run_id, "val/d/recall_at_10", 0.5)
    client.set_terminated(run.info.run_id)
    main(["compare", "--experiment", "e", "--k", "10", "--tracking-uri", uri])
    assert sorted(p.name for p in (tmp_path / "outputs" / "compare").iterdir()) == ["compare.csv", "compare.md"]
    assert not (tmp_path / "compare.csv").exists()
