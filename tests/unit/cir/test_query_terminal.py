"""Issue 25, item 6: ``cir query`` at a terminal. The prompt loop runs with a fake input function:
``:help`` and ``:quit`` (and EOF, Ctrl-C) are commands, not queries; results are a table with what
the catalogue knows; one default ``k`` for ``cir query`` and ``cir search query``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import cir.query
from cir.query import BANNER, DEFAULT_K, PROMPT, describe, read_products, repl, results_table

CATALOGUE = {"p1": {"category": "dress", "title": "Red midi dress"},
             "p22": {"category": "top", "title": "Striped shirt"}}
RESULTS = [("p1", 0.9512), ("p22", 0.8)]


def fake_input(lines: Iterable[str | BaseException]) -> tuple[Callable[[str], str], list[str]]:
    """An ``input`` that answers ``lines`` in turn (an exception item is raised: Ctrl-C), then
    EOF (Ctrl-D); the prompts it was shown are recorded."""
    it, prompts = iter(lines), []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        item = next(it, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    return read, prompts


class Searches:
    """A stand-in for the model: records each (text, k) it is asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def __call__(self, text: str, k: int) -> tuple[list[tuple[str, float]], float]:
        self.asked.append((text, k))
        return RESULTS[:k], 12.34


def run(lines: list[str | BaseException], **kwargs: Any) -> tuple[list[str], Searches, list[str]]:
    read, prompts = fake_input(lines)
    out: list[str] = []
    search = Searches()
    repl(search, read, CATALOGUE, write=out.append, **kwargs)
    return "\n".join(out).splitlines(), search, prompts


def test_the_start_says_how_to_get_help_and_quit() -> None:
    out, search, prompts = run([])
    assert out[0] == BANNER and ":help" in BANNER and ":quit" in BANNER
    assert prompts == [PROMPT] and search.asked == []


@pytest.mark.parametrize("word", [":help", "help", ":h", "?"])
def test_help_is_a_command_not_a_query(word: str) -> None:
    out, search, _ = run([word])
    assert search.asked == []
    assert any(":quit" in line for line in out) and any(":k N" in line for line in out)


@pytest.mark.parametrize("end", [":quit", "quit", ":q", "exit", EOFError(), KeyboardInterrupt()])
def test_quit_eof_and_ctrl_c_end_the_session_without_a_query(end: str | BaseException) -> None:
    out, search, prompts = run([end, "never read"])
    assert search.asked == [] and len(prompts) == 1


def test_ctrl_c_during_a_query_ends_the_session_cleanly() -> None:
    read, _ = fake_input(["make it red", "never read"])

    def interrupted(text: str, k: int) -> tuple[list[tuple[str, float]], float]:
        raise KeyboardInterrupt

    repl(interrupted, read, CATALOGUE, write=lambda _: None)  # returns: no KeyboardInterrupt escapes


def test_a_text_is_answered_as_a_table_with_what_the_catalogue_knows() -> None:
    out, search, _ = run(["  make it red  ", "", "quit please"])
    assert search.asked == [("make it red", DEFAULT_K), ("quit please", DEFAULT_K)]  # a sentence is a query
    start = out.index("[12.3 ms] 'make it red'")
    assert out[start + 1:start + 4] == [
        "rank  id     score  category  title",
        "   1  p1    0.9512  dress     Red midi dress",
        "   2  p22   0.8000  top       Striped shirt",
    ]


def test_k_changes_at_the_prompt_and_an_unknown_command_is_named() -> None:
    out, search, _ = run([":k 1", "make it red", ":nonsense", ":k zero"])
    assert search.asked == [("make it red", 1)]
    assert "showing 1 results per query" in out
    assert sum("unknown command" in line and ":help" in line for line in out) == 2


def test_the_table_leaves_out_what_nobody_knows_and_cuts_long_titles() -> None:
    assert results_table([("p1", 0.5)], {}).splitlines() == ["rank  id    score", "   1  p1   0.5000"]
    long = results_table([("p1", 0.5)], {"p1": {"category": "", "title": "x" * 100}}).splitlines()[1]
    assert long.endswith("x…") and len(long) < 100


def test_the_catalogue_comes_from_products_jsonl_then_the_shards(tmp_path: Path) -> None:
    products = tmp_path / "products.jsonl"
    products.write_text(json.dumps({"product_id": "p1", "title": "Red  midi dress", "category": "dress"}) + "\n{bad\n")
    listed = read_products(products)
    assert describe({"category": "dresses", "short_caption": "a dress"}, listed.get("p1")) == \
        {"category": "dress", "title": "Red midi dress"}
    assert describe({"category": "tops", "short_caption": "a striped shirt"}, listed.get("p2")) == \
        {"category": "tops", "title": "a striped shirt"}  # no title: the gallery's caption
    assert read_products(tmp_path / "none.jsonl") == {}


def test_one_default_k_for_cir_query_and_cir_search_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cir.search import build_parser

    search_query = build_parser()._subparsers._group_actions[0].choices["query"]  # type: ignore[union-attr]
    assert search_query.get_default("k") == DEFAULT_K == 10
    image = tmp_path / "front.png"
    Image.new("RGB", (8, 8)).save(image)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cir.query, "_run", lambda args, extra: seen.update(k=args.k))
    cir.query.main(["--config", str(Path(__file__).resolve().parents[3] / "experiments/demos/clip4cir.yaml"),
                    "--untrained", "--images", str(image)])
    assert seen == {"k": DEFAULT_K}
    assert run(["red"])[1].asked == [("red", DEFAULT_K)]


def test_readline_is_imported_for_line_editing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    pytest.importorskip("readline")
    monkeypatch.delitem(sys.modules, "readline", raising=False)
    history = tmp_path / "cache" / "query_history"
    cir.query._line_editing(history)  # input() edits lines and keeps history once readline is imported
    assert "readline" in sys.modules and history.parent.is_dir()


def test_bare_words_are_queries_when_the_texts_are_given() -> None:
    # --text help or a piped "q": outside a terminal only ":"-commands are commands.
    _, searches, _ = run(["help", "q", ":quit", "never read"], banner=False)
    assert [t for t, _ in searches.asked] == ["help", "q"]
