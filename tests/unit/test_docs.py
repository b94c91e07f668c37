"""The documentation site's structure without building it (`make docs` builds it with --strict in
`make test`; `make check` runs only this): every page under docs/ is in mkdocs.yml's nav and every
nav entry has its page, and the README's links into docs/ reach an existing page and heading (they
are relative so they work on GitHub and in the site; MkDocs never reads the README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def nav_pages(nav: list) -> list[str]:
    """The page paths of a MkDocs nav: entries are "page.md", {title: "page.md"} or {title: [...]}."""
    pages = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def nav_mismatch(config: Path, docs: Path) -> tuple[set[str], set[str]]:
    """(pages under docs/ missing from the nav, nav entries without a page)."""
    listed = nav_pages(yaml.safe_load(config.read_text())["nav"])
    on_disk = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")}
    return on_disk - set(listed), set(listed) - on_disk


def slug(heading: str) -> str:
    """A heading's anchor as both MkDocs' toc and GitHub write it for our headings: lower case,
    punctuation dropped, spaces as hyphens."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def broken_links(markdown: Path) -> list[str]:
    """Relative links to .md files (with an optional #anchor) that reach no file or no heading."""
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#:\s]+\.md)(?:#([^)\s]+))?\)", markdown.read_text()):
        page = markdown.parent / target
        if not page.is_file():
            broken.append(target)
        elif anchor and anchor not in {slug(h) for h in re.findall(r"^#{1,6} (.+)$", page.read_text(), re.M)}:
            broken.append(f"{target}#{anchor}")
    return broken


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    missing_from_nav, without_page = nav_mismatch(ROOT / "mkdocs.yml", ROOT / "docs")
    assert not missing_from_nav, f"docs/ pages missing from mkdocs.yml's nav: {sorted(missing_from_nav)}"
    assert not without_page, f"mkdocs.yml's nav names pages that docs/ lacks: {sorted(without_page)}"
    assert len(nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])) >= 20


def test_the_readme_links_reach_existing_pages_and_headings() -> None:
    readme = ROOT / "README.md"
    assert len(re.findall(r"\]\(docs/", readme.read_text())) >= 15  # the front page links into the docs
    assert broken_links(readme) == []


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "models").mkdir(parents=True)
    for page in ("index.md", "orphan.md", "models/a.md"):
        (docs / page).write_text("# A page\n\n## Two words\n")
    config = tmp_path / "mkdocs.yml"
    nav = [{"Home": "index.md"}, {"Models": ["models/a.md", {"B": "models/b.md"}]}]
    config.write_text(yaml.safe_dump({"nav": nav}))
    assert nav_mismatch(config, docs) == ({"orphan.md"}, {"models/b.md"})

    readme = tmp_path / "README.md"
    readme.write_text("[ok](docs/models/a.md#two-words) [no page](docs/x.md) [no heading](docs/index.md#three)\n"
                      "[site](https://example.com/a.md)\n")
    assert broken_links(readme) == ["docs/x.md", "docs/index.md#three"]


@pytest.mark.parametrize(("heading", "anchor"), [
    ("What the demo does, and what it reaches", "what-the-demo-does-and-what-it-reaches"),
    ("Saved indexes: `cir search`", "saved-indexes-cir-search"),
    ("View strategies: Joint, MeanPool, MaxSim", "view-strategies-joint-meanpool-maxsim"),
])
def test_anchors_are_written_as_the_site_writes_them(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
