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
