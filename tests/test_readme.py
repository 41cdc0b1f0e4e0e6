"""The README against the code: its algorithms and tasks tables are the registries' (regenerate them with
`python -m tests.test_readme`), every command of its table answers `--help` and has every flag the README gives
it, and every command and flag of the three command lines is in the README or a guide (docs/*-guide.md)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.cli import build_parser as coordinator_parser
from fedmeki_core.algorithms import ALGORITHMS
from fedmeki_core.app.cli import build_parser as fedmeki_parser
from fedmeki_core.tasks import SUITES, TASKS
from silo_agent.cli import build_parser as silo_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "fedmeki": fedmeki_parser,
    "fedmeki-coordinator": coordinator_parser,
    "fedmeki-silo": silo_parser,
}


def algorithms_table() -> str:
    rows = ["| algorithm | what | options (defaults) |", "|---|---|---|"]
    for entry in ALGORITHMS.values():
        options = ", ".join(f"`{name}={value!r}`" for name, value in entry.defaults.items()) or "-"
        rows.append(f"| `{entry.name}` | {entry.description.replace('|', '&#124;')} | {options} |")
    return "\n".join(rows)


def tasks_table() -> str:
    rows = ["| task | modality | role | format | metrics | source |", "|---|---|---|---|---|---|"]
    for task in TASKS.values():
        metrics = ", ".join(task.metrics)
        rows.append(
            f"| `{task.name}` | {task.modality} | {task.role} | {task.source_format} | {metrics} | "
            f"{task.source_dataset} |"
        )
    for suite in SUITES.values():
        rows.append(f"| `{suite.name}` (suite) | | | | | {suite.description} |")
    return "\n".join(rows)


TABLES = {"algorithms": algorithms_table, "tasks": tasks_table}


def _marked(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}: generated from the registry.*?-->\n)(.*?)(<!-- end {name} -->)", re.S)


def regenerate(text: str) -> str:
    for name, table in TABLES.items():
        text = _marked(name).sub(lambda m, table=table: m.group(1) + table() + "\n" + m.group(3), text)
    return text


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_readme_tables_are_the_registries(name: str) -> None:
    found = _marked(name).search(README.read_text())
    assert found is not None, f"README.md has no generated {name} table"
    assert found.group(2) == TABLES[name]() + "\n", (
        f"README.md's {name} table is stale: run python -m tests.test_readme"
    )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands(
    prog: str, parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command of a parser: (path of subcommands, its parser), the root's included."""
    yield (prog, *path), parser
    for name, sub in _subcommands(parser).items():
        yield from _commands(prog, sub, (*path, name))


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def _readme_commands() -> list[tuple[tuple[str, ...], list[str]]]:
    """The commands of the README's table (its `…` spans that start with a command) and the flags they show."""
    section = README.read_text().split("## What is in the box", 1)[1].split("\n## ", 1)[0]
    found = []
    for span in re.findall(r"`([^`]+)`", section):
        words = span.split()
        if not words or words[0] not in PARSERS or "…" in span:  # `fedmeki job … --kit DIR`: a pattern
            continue
        parser, path = PARSERS[words[0]](), [words[0]]
        for word in words[1:]:
            sub = _subcommands(parser).get(word)
            if sub is None:
                break
            parser, path = sub, [*path, word]
        flags = [word.split("=")[0] for word in re.findall(r"--[a-z][a-z0-9-]*", span)]
        if path[-1] == "bench":  # `fedmeki bench NAME …` passes the rest on to the benchmark (benchmarks/)
            flags = []
        found.append((tuple(path), flags))
    return found


def test_every_command_in_the_readme_answers_help_and_has_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _readme_commands()
    assert len(commands) > 20
    for path, flags in commands:
        parser = PARSERS[path[0]]()
        with pytest.raises(SystemExit) as info:
            parser.parse_args([*path[1:], "--help"])
        assert info.value.code == 0, path
        assert "usage:" in capsys.readouterr().out
        for name in path[1:]:
            parser = _subcommands(parser)[name]
        missing = set(flags) - _flags(parser) - {"--log-level", "--log-format"}
        assert not missing, f"{' '.join(path)} has no {', '.join(sorted(missing))} though the README shows it"


def test_every_command_and_flag_is_documented() -> None:
    docs = README.read_text() + "".join(path.read_text() for path in sorted((ROOT / "docs").glob("*-guide.md")))
    undocumented = []
    for prog, build in PARSERS.items():
        for path, parser in _commands(prog, build()):
            if len(path) > 1 and " ".join(path[1:]) not in docs:
                undocumented.append(" ".join(path))
            # an option (by any of its names: -o or --output) on a line with its command; the root's anywhere
            lines = [line for line in docs.splitlines() if len(path) == 1 or path[-1] in line]
            undocumented += [
                f"{' '.join(path)} {action.option_strings[-1]}"
                for action in parser._actions
                if action.option_strings and "--help" not in action.option_strings
                if not any(
                    re.search(rf"(?<![\w-]){name}(?![\w-])", line) for name in action.option_strings for line in lines
                )
            ]
    assert not undocumented, "not in README.md nor docs/*-guide.md:\n" + "\n".join(undocumented)


if __name__ == "__main__":
    README.write_text(regenerate(README.read_text()))
    sys.exit(0)
