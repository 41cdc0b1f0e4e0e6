"""The instructions task's data formats and scores: flashcards, multiple choice to a letter, FedMEKI conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.instructions import prompt_of, read_instructions
from fedmeki_core.tasks.scoring import instruction_scores, option_letter


def _jsonl(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_the_common_formats_become_prompts_and_answers(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        {"instruction": "What treats angina?", "input": "", "output": "Nitroglycerin."},
        {"question": "First-line drug?", "options": {"A": "aspirin", "B": "insulin"}, "answer_idx": "b"},
        {"question": "Which?", "options": ["x", "y", "z"], "answer": "C"},
        {"conversations": [{"from": "human", "value": "<image>\nIs it normal?"}, {"from": "gpt", "value": "yes"}]},
        "",
    )
    assert read_instructions(path) == [
        (prompt_of("What treats angina?", ""), "Nitroglycerin."),
        (prompt_of("First-line drug?", "A. aspirin\nB. insulin"), "B"),
        (prompt_of("Which?", "A. x\nB. y\nC. z"), "C"),
        (prompt_of("Is it normal?", ""), "yes"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "line 1: expected an object with instruction and output"),
        ('{"instruction": "x", "output": ""}', "line 1: 'output' must be a non-empty string"),
        ('{"instruction": "x", "input": 3, "output": "y"}', "line 1: 'input' must be a string"),
        ('{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}', "one of the option letters A, B"),
        ('{"question": "q", "options": ["1", "2", "3", "4", "5", "6"], "answer": "A"}', "map 2 to 5 letters"),
        ('{"question": "q", "options": {"AB": "x", "C": "y"}, "answer": "C"}', "letters A to E to strings"),
        ('{"conversations": []}', "'conversations' must be a non-empty list"),
        ("{not json", "line 1: not a JSON object"),
    ],
)
def test_a_bad_line_is_refused_naming_it(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        read_instructions(_jsonl(tmp_path / "bad.jsonl", line))


def test_multiple_choice_is_scored_by_the_answer_s_letter_and_free_text_by_its_words() -> None:
    assert [option_letter(t) for t in ("B", "b.", "(C) aspirin", "Answer: D", "E) x", "aspirin", "")] == [
        "B",
        "B",
        "C",
        "D",
        "E",
        None,
        None,
    ]
    scores = instruction_scores(["B) insulin", "a", "answer: c"], ["B", "C", "C"])
    assert scores["choice_accuracy"] == pytest.approx(2 / 3)
    assert scores["exact_match"] == 0.0
    free = instruction_scores(["Nitroglycerin", "beta blockers now"], ["nitroglycerin.", "beta blockers"])
    assert "choice_accuracy" not in free
    assert free["exact_match"] == 0.5 and 0 < free["rouge1"] < 1
