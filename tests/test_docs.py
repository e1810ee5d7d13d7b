"""The docs cannot drift: every command has a guide, the README's links resolve, the heads
table is the registry's. (`make docs` builds the site with --strict: links and anchors inside
docs/, the CLI reference from the click commands, the API reference from the docstrings.)"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from featx.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# a command documented on another command's page
GUIDE_OF = {"weights": "models"}


def _hooks():
    spec = importlib.util.spec_from_file_location("featx_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_a_guide_in_the_nav(command):
    page = f"commands/{GUIDE_OF.get(command, command)}.md"
    assert (DOCS / page).is_file(), page
    nav = re.compile(rf"^\s*- (.+: )?{re.escape(page)}$", re.M)
    assert nav.search((ROOT / "mkdocs.yml").read_text()), f"{page} is not in mkdocs.yml's nav"
    assert f"featx {command}" in (DOCS / page).read_text()


def test_every_relative_link_of_the_readme_resolves():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len(local) > 10  # the README is mostly links into the docs
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def test_the_heads_table_is_rendered_from_the_registry():
    from featx.heads import get_head, list_heads
    table = _hooks().heads_table().splitlines()
    rows = {line.split("|")[1].strip(" `"): line for line in table[2:]}
    assert list(rows) == list(list_heads())
    for name, line in rows.items():
        for param, values in get_head(name).grid.items():
            assert f"`{param}` " in line, (name, param)
        assert type(get_head(name).build(0, None)).__name__ in line
    page = (DOCS / "commands" / "fit-heads.md").read_text()
    assert _hooks().HEADS_MARK in page


def _options(command) -> set[str]:
    import click
    found = {"--help"}
    for p in command.params:
        if isinstance(p, click.Option):
            found.update(p.opts + p.secondary_opts)
    for sub in getattr(command, "commands", {}).values():
        found |= _options(sub)
    return found


@pytest.mark.parametrize("page", ["README.md", "docs/tour.md", "docs/recipes.md",
                                  *sorted(p.relative_to(ROOT).as_posix()
                                          for p in (DOCS / "commands").glob("*.md"))])
def test_every_option_a_guide_names_exists(page):
    """A renamed or removed option cannot linger in the guides (the reference is generated)."""
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", (ROOT / page).read_text()))
    unknown = sorted(named - _options(main))
    assert not unknown, f"{page} names options no featx command has: {unknown}"
