"""Instruction data for a pretrained causal LM: JSONL lines tokenised by the base's tokenizer.

Each line is one example in one of the common formats:
- `{instruction, input, output}`: the medical flashcards sets FlowerTune uses; `input` may be empty or absent;
- `{question, options, answer_idx}` (MedQA / MedMCQA style): options `{"A": ..., "B": ...}` or a list (lettered A,
  B, ... in order) become the input, the answer is the option's letter (`answer` is taken when there is no
  `answer_idx`);
- `{conversations: [...]}`: FedMEKI's question/answer turns or LLaVA's `{from, value}` turns (the first pair).
The prompt is Alpaca's template; the answer is followed by the tokenizer's end-of-sequence token. The silo tokenises
its file with its own copy of the base's tokenizer into an ArrayDataset: `features` [N, max_length] token ids as
float32 (exact below 2^24) padded with -1, `labels` [N] the prompt's length in tokens (the answer starts there),
and the answers' text for scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.dataset import ArrayDataset
from fedmeki_core.tasks.formats.conversations import first_pair

_LETTERS = ("A", "B", "C", "D", "E")
MAX_LINE_BYTES = 1 << 20
MAX_EXAMPLES = 10_000_000
_FLOAT_EXACT = 1 << 24


def prompt_of(instruction: str, context: str) -> str:
    """Alpaca's prompt (FlowerTune's medical track uses it): the instruction, the input if any, then the response."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def read_instructions(path: Path) -> list[tuple[str, str]]:
    """(prompt, answer) of every line of a JSONL file, each line checked; an error names the line."""
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    examples: list[tuple[str, str]] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise InvalidInputError(f"{path}: line {number} is longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            if len(examples) >= MAX_EXAMPLES:
                raise InvalidInputError(f"{path}: more than {MAX_EXAMPLES} examples")
            examples.append(_example(raw, f"{path}: line {number}"))
    if not examples:
        raise InvalidInputError(f"{path}: holds no examples")
    return examples


def _example(raw: bytes, where: str) -> tuple[str, str]:
    try:
        record: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{where}: not a JSON object ({exc})") from None
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: expected an object with instruction and output")
    if "conversations" in record:
        question, answer = first_pair(record["conversations"], where)
        return prompt_of(question.strip(), ""), answer.strip()
    if "options" in record:
        return _multiple_choice(record, where)
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise InvalidInputError(f"{where}: {key!r} must be a non-empty string")
    context = record.get("input", "")
    if not isinstance(context, str):
        raise InvalidInputError(f"{where}: 'input' must be a string")
    return prompt_of(record["instruction"].strip(), context.strip()), str(record["output"]).strip()


def _multiple_choice(record: dict[str, Any], where: str) -> tuple[str, str]:
    options = record["options"]
    if isinstance(options, list) and len(options) <= len(_LETTERS):
        options = dict(zip(_LETTERS, options, strict=False))
    if not isinstance(options, dict) or not 2 <= len(options) <= len(_LETTERS):
        raise InvalidInputError(f"{where}: 'options' must map 2 to {len(_LETTERS)} letters to their text")
    if not all(isinstance(k, str) and k.upper() in _LETTERS and isinstance(v, str) for k, v in options.items()):
        raise InvalidInputError(f"{where}: 'options' must map letters A to {_LETTERS[-1]} to strings")
    question = record.get("question")
    letter = record.get("answer_idx", record.get("answer"))
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(letter, str) or letter.strip().upper() not in {k.upper() for k in options}:
        raise InvalidInputError(f"{where}: the answer must be one of the option letters {', '.join(options)}")
    listed = "\n".join(f"{key.upper()}. {text.strip()}" for key, text in sorted(options.items()))
    return prompt_of(question.strip(), listed), letter.strip().upper()


def tokenize_instructions(examples: list[tuple[str, str]], tokenizer: Any, max_length: int) -> ArrayDataset:
    """Token ids of prompt + answer + EOS, cut to `max_length` (the answer keeps up to max_length - 1 tokens, the
    prompt keeps its end), as float32 padded with -1; labels: where each answer starts."""
    if len(tokenizer) >= _FLOAT_EXACT:
        raise InvalidInputError(f"the tokenizer's {len(tokenizer)} tokens do not fit float32 ids")
    features = np.full((len(examples), max_length), -1.0, dtype=np.float32)
    labels = np.zeros(len(examples), dtype=np.int64)
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    for row, (prompt, answer) in enumerate(examples):
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        answer_ids = (list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + eos)[: max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :]
        ids = prompt_ids + answer_ids
        features[row, : len(ids)] = ids
        labels[row] = len(prompt_ids)
    return ArrayDataset(
        features=features,
        labels=labels,
        questions=tuple(prompt for prompt, _ in examples),
        answers=tuple(answer for _, answer in examples),
    )
