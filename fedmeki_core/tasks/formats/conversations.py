"""FedMEKI's JSON records (a modality file plus question/answer turns) read into an ArrayDataset.

A file holds a list of records:
`{"modality_path": "images/1.png", "conversations": [{"question": "...", "answer": "..."}], "task_type": "...",
"modalities": ["..."]}`; the conversations may also be LLaVA turns `[{"from": "human", "value": "..."},
{"from": "gpt", "value": "..."}]`. Relative modality paths are relative to the JSON file's folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import LabelType, TaskInfo
from fedmeki_core.tasks.dataset import ArrayDataset
from fedmeki_core.tasks.formats.rules import ImportOptions
from fedmeki_core.tasks.formats.sources import SourceOutcome, read_samples, refusal_summary

_HUMAN = frozenset({"human", "user"})
_MODEL = frozenset({"gpt", "assistant", "model"})
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def binary_label(answer: str) -> int | None:
    """1 for an answer that starts with the word 'yes', 0 for 'no', None otherwise."""
    match = _YES_NO.match(answer)
    return None if match is None else int(match.group(1).lower() == "yes")


def read_conversations(
    json_path: Path, task: TaskInfo, image_size: int | None = None, options: ImportOptions | None = None
) -> ArrayDataset:
    """Every record's modality file and first question/answer pair: labels from yes/no for binary tasks,
    -1 with the question and answer kept for text tasks. A file that is refused fails the whole read."""
    dataset, outcomes = read_conversation_sources(json_path, task, image_size, options)
    if summary := refusal_summary(outcomes):
        raise InvalidInputError(summary)
    return dataset


def read_conversation_sources(
    json_path: Path, task: TaskInfo, image_size: int | None = None, options: ImportOptions | None = None
) -> tuple[ArrayDataset, tuple[SourceOutcome, ...]]:
    """The records' dataset from the files that were accepted, and every file's outcome."""
    json_path = Path(json_path)
    if task.label_type == LabelType.MASK:
        raise InvalidInputError(f"task {task.name} needs masks, which FedMEKI JSON records do not carry")
    parsed = [_parse_record(record, index, json_path) for index, record in enumerate(_load_records(json_path))]
    if task.label_type == LabelType.BINARY:
        labels = [_record_label(answer, index, json_path, task) for index, (_, _, answer) in enumerate(parsed)]
        questions: list[str] = []
        answers: list[str] = []
    else:
        labels = [-1] * len(parsed)
        questions, answers = [q for _, q, _ in parsed], [a for _, _, a in parsed]
    paths = [path for path, _, _ in parsed]
    read = read_samples(task, paths, image_size, label="record", options=options)
    dataset = ArrayDataset(
        features=read.features,
        labels=np.array(read.repeat(labels), dtype=np.int64),
        questions=tuple(read.repeat(questions)) if questions else (),
        answers=tuple(read.repeat(answers)) if answers else (),
    )
    return dataset, read.outcomes


def _load_records(json_path: Path) -> list[Any]:
    if not json_path.is_file():
        raise InvalidInputError(f"JSON file {json_path} does not exist")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{json_path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise InvalidInputError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise InvalidInputError(f"{json_path}: holds no records")
    return records


def _parse_record(record: Any, index: int, json_path: Path) -> tuple[Path, str, str]:
    """(modality file, first question, first answer) of one record, with its structure checked."""
    where = f"{json_path}: record {index}"
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: expected an object, got {type(record).__name__}")
    for key in ("modality_path", "conversations"):
        if key not in record:
            raise InvalidInputError(f"{where}: missing key {key!r}")
    modality_path = record["modality_path"]
    if not isinstance(modality_path, str) or not modality_path:
        raise InvalidInputError(f"{where}: 'modality_path' must be a non-empty string")
    if "task_type" in record and not isinstance(record["task_type"], str):
        raise InvalidInputError(f"{where}: 'task_type' must be a string")
    modalities = record.get("modalities", [])
    if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
        raise InvalidInputError(f"{where}: 'modalities' must be a list of strings")
    question, answer = _first_pair(record["conversations"], where)
    return json_path.parent / modality_path, question, answer  # an absolute modality_path replaces the folder


def _first_pair(conversations: Any, where: str) -> tuple[str, str]:
    if not isinstance(conversations, list) or not conversations:
        raise InvalidInputError(f"{where}: 'conversations' must be a non-empty list")
    first = conversations[0]
    if isinstance(first, dict) and ("question" in first or "answer" in first):
        first_where = f"{where}: conversations[0]"
        return _text(first, "question", first_where), _text(first, "answer", first_where)
    return _first_llava_pair(conversations, where)


def _first_llava_pair(turns: list[Any], where: str) -> tuple[str, str]:
    """The first human turn and the model turn that follows it, the '<image>' placeholder removed."""
    question: str | None = None
    for number, turn in enumerate(turns):
        turn_where = f"{where}: conversations[{number}]"
        if not isinstance(turn, dict) or "from" not in turn:
            raise InvalidInputError(
                f"{turn_where}: expected {{'question', 'answer'}} or {{'from', 'value'}}, got {_shown(turn)}"
            )
        speaker = str(turn["from"]).lower()
        if question is None and speaker in _HUMAN:
            question = _text(turn, "value", turn_where).replace("<image>", "").strip()
        elif question is not None and speaker in _MODEL:
            return question, _text(turn, "value", turn_where)
    missing = "human question" if question is None else "answer after the first question"
    raise InvalidInputError(f"{where}: 'conversations' has no {missing}")


def _text(item: dict[str, Any], key: str, where: str) -> str:
    if key not in item:
        raise InvalidInputError(f"{where}: missing key {key!r}")
    if not isinstance(item[key], str):
        raise InvalidInputError(f"{where}: {key!r} must be a string, got {type(item[key]).__name__}")
    return str(item[key])


def _record_label(answer: str, index: int, json_path: Path, task: TaskInfo) -> int:
    label = binary_label(answer)
    if label is None:
        raise InvalidInputError(
            f"{json_path}: record {index}: answer {_shown(answer)} starts with neither 'yes' nor 'no' "
            f"(task {task.name} is binary)"
        )
    return label


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
