"""`cir compare` says what it found: its examples name experiments the configs log to, a store that
does not exist is refused (not created empty), an empty or recall-less experiment is described,
the paper's rows appear only beside data the paper reports, and an overall is never made of R@10
alone."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml
from support.mlflow_store import store as _store

import cir.compare
from cir.compare import main as compare

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module: creating an MLflow SQLite store costs seconds (its migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _refusal(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        compare(argv)
    message = str(exc.value.code)
    assert message.startswith("cir compare: ") and len(message.splitlines()) == 1, message
    return message


def _logged_experiments() -> set[str]:
    """The MLflow experiments this repository's configs and cir sweep log runs to."""
    names = set()
    for path in [*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("experiments/**/*.yaml")]:
        names |= set(re.findall(r"^\s*(?:mlflow_)?experiment_name:\s*([\w.-]+)", path.read_text(), re.MULTILINE))
        if path.parent.name == "sweeps" and (sweep := yaml.safe_load(path.read_text())).get("mlflow_experiment"):
            names.add(sweep["mlflow_experiment"])
    # cir sweep's default, read from its source (importing it loads Optuna and Lightning).
    names |= set(re.findall(r'mlflow_experiment: str = "([^"]+)"', (ROOT / "cir/sweep.py").read_text()))
    return names


def test_the_help_examples_name_experiments_the_configs_log_to() -> None:
    logged = _logged_experiments()
    assert "fashion-cir" in logged
    examples = set(re.findall(r"--experiment ([\w.-]+)", cir.compare.__doc__ or ""))
    assert examples and examples <= logged, examples - logged


@pytest.mark.parametrize("kind", ["sqlite", "folder", "file-uri"])
def test_a_store_that_does_not_exist_is_refused_not_created(tmp_path: Path, kind: str) -> None:
    missing = tmp_path / "nowhere" / ("mlflow.db" if kind == "sqlite" else "mlruns")
    given = {"sqlite": f"sqlite:///{missing}", "folder": str(missing), "file-uri": missing.as_uri()}[kind]
    message = _refusal(["--experiment", "fashion-cir", "--tracking-uri", given, "--out", str(tmp_path / "o")])
    assert f"no MLflow store at {missing} " in message and "--tracking-uri" in message
    assert not missing.exists() and not missing.parent.exists()


def test_the_default_store_is_named_when_it_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a fresh folder: no mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    message = _refusal(["--experiment", "fashion-cir"])
    assert f"no MLflow store at {Path.cwd() / 'mlflow.db'} (sqlite:///mlflow.db, from the default tracking URI)" \
        in message
    assert not (tmp_path / "mlflow.db").exists()


def test_an_experiment_without_runs_lists_what_the_store_holds(uri: str, tmp_path: Path) -> None:
    full = _store(uri, tmp_path / "full", [({}, {"val/a/recall_at_10": 0.5})])
    empty = _store(uri, tmp_path / "empty", [])
    message = _refusal(["--experiment", empty, "--tracking-uri", uri, "--out", str(tmp_path / "o")])
    assert f"no run of {empty!r}; the store's experiments: " in message
    assert f"{full} (1 run)" in message and f"{empty} (0 runs)" in message and "Default (0 runs)" in message
    message = _refusal(["--experiment", full, "--filter", "tags.family = 'SPRC'", "--tracking-uri", uri])
    assert f"no run of {full!r} matching --filter \"tags.family = 'SPRC'\"" in message


def test_runs_without_per_dataset_recalls_are_counted_and_their_metrics_named(uri: str, tmp_path: Path) -> None:
    experiment = _store(uri, tmp_path, [({}, {"train/loss": 1.0, "val/recall_at_10": 0.4}), ({}, {"train/loss": 2.0})])
    message = _refusal(["--experiment", experiment, "--tracking-uri", uri, "--out", str(tmp_path / "o")])
    assert f"none of the 2 runs of {experiment!r} logged a per-dataset recall (val/<dataset>/recall_at_<K>" in message
    assert message.endswith("they logged train/loss, val/recall_at_10")


def test_an_unknown_experiment_suggests_the_closest(uri: str, tmp_path: Path) -> None:
    experiment = _store(uri, tmp_path / "fashion-cir-x", [({}, {"val/a/recall_at_10": 0.5})])
    message = _refusal(["--experiment", experiment + "y", "--tracking-uri", uri])
    assert f"(did you mean {experiment!r}?)" in message and f"{experiment} (1 run)" in message


def _table(out: Path) -> list[list[str]]:
    with (out / "compare.csv").open() as f:
        return list(csv.reader(f))


def test_reported_adds_no_blank_paper_rows_beside_other_data(uri: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    tags = {"model": "CLIP4CIR (tiny)", "parameters": "1000", "strategy": "maxsim"}
    experiment = _store(uri, tmp_path, [(tags, {"val/synth_studio/recall_at_5": 0.2,
                                                "val/synth_studio/recall_at_10": 0.3})])
    out = tmp_path / "o"
    compare(["--experiment", experiment, "--tracking-uri", uri, "--layout", "table2", "--reported", "--out", str(out)])
    header, *rows = _table(out)
    assert [r[0] for r in rows] == ["CLIP4CIR (tiny)"]  # no "(paper)" rows of nothing but blanks
    printed = capsys.readouterr().out
    assert ("note: --reported: no paper rows added: the FashionMV paper's Table 2 reports deepfashion, f200k, "
            "fashiongen_val; these runs evaluated synth_studio") in printed
    assert "no paper rows added" in (out / "compare.md").read_text()


def test_reported_beside_a_partial_overlap_says_what_the_paper_lacks(uri: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    recalls = {f"val/{ds}/recall_at_{k}": 0.5 for ds in ("deepfashion", "synth_studio") for k in (5, 10)}
    experiment = _store(uri, tmp_path, [({"model": "ours", "strategy": "joint"}, recalls)])
    out = tmp_path / "o"
    compare(["--experiment", experiment, "--tracking-uri", uri, "--layout", "table2", "--reported", "--out", str(out)])
    header, *rows = _table(out)
    paper = [r for r in rows if r[0].endswith("(paper)")]
    assert len(paper) == 17 and all(r[3] for r in paper)  # their deepfashion R@5
    assert all(r[header.index("overall")] == "" for r in paper)  # no average over deepfashion alone
    assert "the paper's rows have no numbers for synth_studio" in capsys.readouterr().out


def test_fashioniq_without_r50_says_so_instead_of_an_overall_of_r10(uri: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    tags = {"model": "LLaVACaptionCIR (tiny)", "parameters": "2500", "strategy": "single"}
    experiment = _store(uri, tmp_path, [(tags, {"val/fashioniq_dress/recall_at_10": 0.3,
                                                "val/fashioniq_shirt/recall_at_10": 0.2})])
    out = tmp_path / "o"
    compare(["--experiment", experiment, "--tracking-uri", uri, "--layout", "fashioniq", "--out", str(out)])
    header, row = _table(out)
    cells = dict(zip(header, row, strict=True))
    assert cells["avg R@10"] == "25.0*"
    assert cells["avg R@50"] == "" and cells["overall"] == ""  # not 25.0 from R@10 alone
    printed = capsys.readouterr().out
    assert "note: no run logged R@50 (val/<dataset>/recall_at_50;" in printed
    assert "avg R@50 and overall are blank" in printed


def test_a_run_missing_one_value_gets_no_average_and_is_named(uri: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    complete = {f"val/{ds}/recall_at_{k}": 0.5 for ds in ("fashioniq_dress", "fashioniq_shirt") for k in (10, 50)}
    partial = {k: v for k, v in complete.items() if k != "val/fashioniq_shirt/recall_at_50"}
    experiment = _store(uri, tmp_path, [({"model": "full"}, complete), ({"model": "part"}, partial)])
    out = tmp_path / "o"
    compare(["--experiment", experiment, "--tracking-uri", uri, "--layout", "fashioniq", "--out", str(out)])
    header, *rows = _table(out)
    by_model = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by_model["full"]["overall"] == "50.0*"
    assert by_model["part"]["avg R@10"] == "50.0*"
    assert by_model["part"]["avg R@50"] == "" and by_model["part"]["overall"] == ""
    assert "not logged, so the averages that need them are blank: part: fashioniq_shirt R@50" in capsys.readouterr().out


def test_reported_is_refused_outside_table2(uri: str, tmp_path: Path) -> None:
    message = _refusal(["--experiment", "x", "--tracking-uri", uri, "--reported"])
    assert "--reported holds the FashionMV paper's Table 2 only (--layout table2)" in message
