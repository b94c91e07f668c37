"""`cir` help: every subcommand's --help answers without model code, shows the defaults, has no
reStructuredText markup; `cir --version` prints the installed version; the README and the docs list
every command."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cir.__main__ import COMMANDS, TRAINER_COMMANDS, main

ROOT = Path(__file__).resolve().parents[3]
MODEL_CODE = ("torch", "transformers", "lightning", "lightning_modules", "datamodules", "callbacks", "mlflow", "optuna")
# Prints the help of the command in argv, then which of MODEL_CODE it imported, on stderr's last line.
_PROBE = f"""
import json, sys
from cir.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({{"code": code, "imported": sorted(m for m in {MODEL_CODE!r} if m in sys.modules)}}), file=sys.stderr)
"""

# (argv, a default its help must show)
HELPS = [
    (["data"], None),
    (["data", "synthetic"], "(default: 1500)"),
    (["data", "fashionmv"], "(default: train val)"),
    (["caption"], "(default: llava)"),
    (["build"], "the paper's 8192"),
    (["search"], None),
    (["search", "build"], "(default: flat)"),
    (["search", "query"], "(default: 10)"),
    (["index"], "(default: catalogue)"),
    (["query"], "(default: val)"),
    (["serve"], "(default: 8000)"),
    (["sweep"], None),
    (["compare"], "(default: outputs/compare)"),
    (["export"], None),
    (["mine-negatives"], "(default: 0.95)"),
]


def _help(argv: list[str]) -> tuple[str, dict[str, object], float]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv, "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    seconds = time.perf_counter() - t0
    return done.stdout, json.loads(done.stderr.strip().splitlines()[-1]), seconds


def test_every_command_has_a_help_case() -> None:
    assert {argv[0] for argv, _ in HELPS} == set(COMMANDS)


@pytest.mark.parametrize(("argv", "default"), HELPS, ids=[" ".join(a) for a, _ in HELPS])
def test_help_is_quick_plain_and_shows_defaults(argv: list[str], default: str | None) -> None:
    out, probe, seconds = _help(argv)
    assert probe["code"] in (0, None), out
    assert out.startswith(f"usage: cir {' '.join(argv)}")
    assert "``" not in out
    if default:
        assert default in " ".join(out.split())
    assert probe["imported"] == [], f"cir {' '.join(argv)} --help imported {probe['imported']}"
    assert seconds < 30  # a few tenths of a second idle; the model imports took 5-12 s


def test_build_help_reads_the_stages_without_the_model_package() -> None:
    # Its parser reads the pipeline's stages and the paper's token budgets: the one stdlib-only
    # module that holds them is imported for real, nothing else of the model code.
    out, probe, _ = _help(["build"])
    text = " ".join(out.split())
    assert "(default: clip:clip-vit-b32)" in text
    assert all(f"--{stage}-max-tokens" in text for stage in ("captions", "verify", "triplets"))
    assert "the paper's 16384" in text and probe["imported"] == []


def test_search_subcommands_describe_themselves_and_every_option() -> None:
    from cir.search import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert parser.description, name
        assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    assert {a.dest: a.help for a in sub._choices_actions}.keys() == {"build", "query"}


def test_top_level_help_is_plain(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "cir --version" in out
    assert all(f"cir {c}" in out for c in COMMANDS)


def test_version_is_the_installed_one() -> None:
    done = subprocess.run([sys.executable, "-m", "cir", "--version"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"cir (fashion-cir) {importlib.metadata.version('fashion-cir')}"


def _command_table(doc: Path) -> str:
    text = doc.read_text()
    table = text[text.index("| command | what it does |"):]
    return table[:table.index("\n\n")]


@pytest.mark.parametrize("doc", ["README.md", "docs/getting-started.md"])
def test_the_command_table_lists_every_command(doc: str) -> None:
    table = _command_table(ROOT / doc)
    listed = set(re.findall(r"^\| `cir ([\w-]+)", table, re.MULTILINE))
    assert set(COMMANDS) <= listed and TRAINER_COMMANDS[0] in listed and "--version" in table


def test_the_front_page_and_the_docs_show_the_same_command_table() -> None:
    assert _command_table(ROOT / "README.md") == _command_table(ROOT / "docs/getting-started.md")


def test_help_falls_back_to_the_real_imports_when_the_parser_reads_model_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A parser that reads a name of a deferred module (here a list of choices) gets the real one:
    the help is slower then, never wrong; one that does not read it never imports it."""
    (tmp_path / "fake_model_code.py").write_text("STAGES = ('captions', 'verify')\n")
    command = """
from fake_model_code import STAGES

from cir.args import command_parser, parse


def main(argv):
    p = command_parser("fake", "A ``fake`` command.")
    p.add_argument("--stage", choices=%s, default="verify")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true")
    parse(p, argv)
"""
    (tmp_path / "fake_reads.py").write_text(command % "STAGES")
    (tmp_path / "fake_light.py").write_text(command % "['captions', 'verify']")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "reads", "fake_reads")
    monkeypatch.setitem(COMMANDS, "light", "fake_light")

    with pytest.raises(SystemExit) as exc:
        main(["light", "--help"])
    assert exc.value.code == 0 and "fake_model_code" not in sys.modules and "fake_light" not in sys.modules
    out = capsys.readouterr().out
    assert "A fake command." in out and "(default: 0)" in out and "(default: verify)" in out
    assert "--fast" in out and "(default: False)" not in out

    with pytest.raises(SystemExit) as exc:
        main(["reads", "--help"])
    assert exc.value.code == 0 and "{captions,verify}" in capsys.readouterr().out
    assert sys.modules["fake_model_code"].STAGES == ("captions", "verify")  # imported for real
    for name in ("fake_model_code", "fake_reads"):
        sys.modules.pop(name)
