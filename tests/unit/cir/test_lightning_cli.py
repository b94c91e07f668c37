from __future__ import annotations

from pathlib import Path

import pytest

from cir.lightning_cli import build_cli, expand_defaults

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "experiments/demos/clip4cir.yaml"


def test_defaults_are_loaded_first_in_order(tmp_path: Path) -> None:
    (tmp_path / "frag").mkdir()
    (tmp_path / "frag" / "a.yaml").write_text("defaults: [b.yaml]\ntrainer: {max_epochs: 1}\n")
    (tmp_path / "frag" / "b.yaml").write_text("trainer: {max_epochs: 2}\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults: [frag/a.yaml]\ntrainer: {max_epochs: 3}\n")
    argv = expand_defaults(["fit", "--config", str(exp), "--trainer.max_epochs=4"])
    files = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert [Path(f).name for f in files] == ["b.yaml", "a.yaml", "exp.yaml"]
    assert argv[-1] == "--trainer.max_epochs=4"


def test_defaults_errors_name_the_file(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text("defaults: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml.*exp.yaml"):
        expand_defaults(["fit", "--config", str(exp)])
    exp.write_text("defaults: [exp.yaml]\n")
    with pytest.raises(ValueError, match="includes itself"):
        expand_defaults(["fit", "--config", str(exp)])


def test_demo_config_composes_and_interpolates(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  init_args:\n    eval_batch_size: ${.batch_size}\n")
    cli = build_cli(["--config", str(DEMO), "--config", str(extra),
                     "--data.init_args.batch_size=7", f"--data.init_args.data_dir={tmp_path / 'd'}"], run=False)
    assert cli.datamodule.hparams.eval_batch_size == 7
    assert type(cli.model).__name__ == "CLIP4CIR" and cli.trainer.max_epochs == 12


def test_wrong_key_is_reported_by_name() -> None:
    with pytest.raises(SystemExit):
        build_cli(["--config", str(DEMO), "--model.init_args.no_such_key=1"], run=False)




def test_expansion_loads_each_file_once_and_is_idempotent() -> None:
    """DDP's launcher restarts the other ranks with the expanded command line: expanding it again
    must give the same list, or those ranks would load fragments twice."""
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        if "sweeps" in path.parts:
            continue
        once = expand_defaults(["fit", "--config", str(path), "--trainer.max_epochs=1"])
        assert expand_defaults(once) == once, path
        configs = [once[i + 1] for i, a in enumerate(once) if a == "--config"]
        assert len(configs) == len(set(configs)), path
