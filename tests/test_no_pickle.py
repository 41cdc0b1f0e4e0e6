"""No pickle anywhere: not imported, no torch.load without weights_only=True, no allow_pickle=True."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedmeki_core", "coordinator", "silo_agent", "benchmarks", "tests")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import …")
        elif isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append("allow_pickle=True")
            name = ast.unparse(node.func)
            if name.endswith("torch.load") or (name == "load" and "weights_only" in keywords):
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{name}(…) without weights_only=True")
    return found


def test_the_checker_catches_each_pattern() -> None:
    bad = "import pickle\nfrom joblib import dump\nnp.load(f, allow_pickle=True)\ntorch.load(p)\n"
    assert len(_violations(bad)) == 4
    assert _violations("torch.load(p, weights_only=True)\nnp.load(f)\n") == []


def test_no_pickle_in_the_code() -> None:
    problems = {
        str(path.relative_to(ROOT)): found
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "proto/v1" not in str(path) and (found := _violations(path.read_text()))
    }
    assert problems == {}
