"""The operations guides stay true: every fedmeki command in them parses with the real command line, their YAML
loads as the code reads it, and their Python runs (the reflection client against a real coordinator, the
coordinator certificate's rotation on a provisioned project)."""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import yaml

from coordinator.cli import build_parser as coordinator_parser
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from fedmeki_core.app.cli import build_parser as fedmeki_parser
from fedmeki_core.app.provision import provision
from fedmeki_core.jobspec import load_job_spec
from fedmeki_core.kits import Role, load_kit
from silo_agent.cli import build_parser as silo_parser
from silo_agent.settings import SiloSettings

DOCS = Path(__file__).resolve().parent.parent / "docs"
GUIDES = [DOCS / "operator-guide.md", DOCS / "hospital-guide.md", DOCS / "researcher-guide.md"]
PARSERS = {"fedmeki": fedmeki_parser, "fedmeki-coordinator": coordinator_parser, "fedmeki-silo": silo_parser}


def blocks(path: Path, language: str) -> list[str]:
    """The fenced blocks of a language, indented ones (in list items) included, dedented."""
    fence = re.compile(rf"^( *)```{language}\n(.*?)^\1```", re.M | re.S)
    return [textwrap.dedent(match.group(2)) for match in fence.finditer(path.read_text())]


def commands(path: Path) -> list[tuple[list[str], bool]]:
    """fedmeki command lines, each with whether it is complete: those of the shell blocks are, inline code may
    only name a command (`fedmeki provision`). `docker compose run ... researcher ARGS` counts as `fedmeki ARGS`
    (the compose file's researcher service runs fedmeki)."""
    lines = [(line, True) for block in blocks(path, "bash") for line in block.replace("\\\n", " ").splitlines()]
    lines += [(span, False) for span in re.findall(r"`((?:fedmeki[-\w]*|docker compose run) [^`]*)`", path.read_text())]
    found = []
    for line, complete in lines:
        words = shlex.split(line)
        if words[:4] == ["docker", "compose", "run", "--rm"] and words[4:5] == ["researcher"]:
            words = ["fedmeki", *words[5:]]
        if words and words[0] in PARSERS:
            found.append((words, complete))
    return found


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: path.name)
def test_every_command_in_the_guides_parses(guide: Path) -> None:
    found = commands(guide)
    assert any(complete for _, complete in found), f"{guide.name} shows no fedmeki command"
    for words, complete in found:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                PARSERS[words[0]]().parse_args(words[1:])
        except SystemExit:
            # A complete command must parse; a command named inline may lack its required arguments only.
            assert not complete and "arguments are required" in errors.getvalue(), (words, errors.getvalue())


def test_the_yaml_examples_load_as_the_code_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [name for name in os.environ if name.startswith(("FEDMEKI_SILO_", "FEDMEKI_COORDINATOR_"))]:
        monkeypatch.delenv(variable)
    loaded = set()
    for guide in GUIDES:
        for block in blocks(guide, "yaml"):
            first = block.splitlines()[0]
            path = tmp_path / "example.yaml"
            path.write_text(block)
            if first == "# job.yaml":
                assert load_job_spec(path).rounds > 0
            elif first == "# silo.yaml":
                assert SiloSettings.from_yaml(path).data
            elif first == "# coordinator.yaml":
                assert CoordinatorSettings.load(path).kit is not None
            else:
                yaml.safe_load(block)
                continue
            loaded.add(first)
    assert loaded == {"# job.yaml", "# silo.yaml", "# coordinator.yaml"}


def test_the_coordinator_certificate_rotation_snippet_issues_a_coordinator_kit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (snippet,) = blocks(DOCS / "operator-guide.md", "python")
    provision(tmp_path / "kits", "fl.example.org", silos=["hospital-a"])
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "operator-guide.md", "exec"), {})  # noqa: S102 - the guide's own code
    old, new = load_kit(tmp_path / "kits" / "coordinator"), load_kit(tmp_path / "kits" / "coordinator.new")
    assert new.role == Role.COORDINATOR and new.coordinator == old.coordinator == "fl.example.org:50051"
    assert new.ca_pem == old.ca_pem and new.identity.serial != old.identity.serial


def test_the_researcher_guides_python_runs(sqlite_coordinator: Coordinator, capsys: pytest.CaptureFixture[str]) -> None:
    client, reflection = blocks(DOCS / "researcher-guide.md", "python")
    imports = [node for node in ast.parse(client).body if isinstance(node, ast.Import | ast.ImportFrom)]
    exec(compile(ast.Module(body=imports, type_ignores=[]), "researcher-guide.md", "exec"), {})  # noqa: S102
    address = f"127.0.0.1:{sqlite_coordinator.port}"
    exec(compile(reflection.replace("127.0.0.1:50051", address), "researcher-guide.md", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out
    assert "'fedmeki.v1.JobService'" in printed and "'grpc.health.v1.Health'" in printed
