"""docs/architecture.md's package tree names every package of the code, and the contracts it lists are those that
`lint-imports` enforces (pyproject.toml's [tool.importlinter])."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _tree() -> str:
    found = re.search(r"## The code, package by package\n\n```\n(.*?)```", DOC, re.S)
    assert found, "docs/architecture.md has no package tree"
    return found.group(1)


def test_the_tree_names_every_package() -> None:
    tree = _tree()
    packages = ["proto/", "coordinator/", "silo_agent/", "fedmeki_core/", "deploy/", "tests/"]
    packages += [f"{p.parent.name}/" for p in (ROOT / "fedmeki_core").glob("*/__init__.py") if p.parent.name != "proto"]
    assert [p for p in packages if not re.search(rf"(^|\s){re.escape(p)}", tree, re.M)] == []


def test_the_contracts_listed_are_those_enforced() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = next(c for c in contracts if c["type"] == "forbidden")
    listed = DOC[DOC.index("The import contracts") :]
    assert all(
        f"`{module}`" in listed or module in listed.split("\n\n")[0] for module in forbidden["forbidden_modules"]
    )
    for contract in contracts:
        if contract["type"] == "acyclic_siblings":
            assert all(f"`{ancestor}/`" in listed for ancestor in contract["ancestors"])
        if contract["type"] == "independence":
            assert all(f"`{module}`" in listed for module in contract["modules"])
