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


LONGEST_MODULE_LINES = 400  # issue 17's rule for hand-written modules; the generated protobuf code is exempt


def test_no_hand_written_module_is_longer_than_the_rule() -> None:
    modules = [
        path
        for package in ("coordinator", "silo_agent", "fedmeki_core")
        for path in (ROOT / package).rglob("*.py")
        if "proto" not in path.relative_to(ROOT).parts
    ]
    assert len(modules) > 100
    too_long = {
        str(p.relative_to(ROOT)): n for p in modules if (n := len(p.read_text().splitlines())) > LONGEST_MODULE_LINES
    }
    assert too_long == {}
