"""Scores of generated answers: classification parsed from the text, and BLEU-1, ROUGE-1 and METEOR for free text.

FedMEKI scores the injected model's generated text. A binary answer counts as "yes" or "no" by its first word;
anything else is a wrong answer (it counts against accuracy, and as neither class for precision and recall).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from fedmeki_core.tasks.confidence import bootstrap_mean, proportion

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# An option letter opening an answer: "B", "b.", "(C)", "D) aspirin", "Answer: A".
_LETTER = re.compile(r"^\W*(?:answer\W*)?\(?([a-e])(?![a-z0-9])", re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def parse_yes_no(text: str) -> int | None:
    """1 for an answer starting with yes, 0 for no, None for anything else."""
    first = words(text)[:1]
    return {"yes": 1, "no": 0}.get(first[0]) if first else None


def binary_scores(answers: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy (with its count and Wilson interval), precision, recall, F1 and MCC of generated yes/no answers
    against 0/1 labels."""
    parsed = [parse_yes_no(answer) for answer in answers]
    tp = sum(p == 1 and y == 1 for p, y in zip(parsed, labels, strict=True))
    fp = sum(p == 1 and y == 0 for p, y in zip(parsed, labels, strict=True))
    tn = sum(p == 0 and y == 0 for p, y in zip(parsed, labels, strict=True))
    fn = sum(p != 1 and y == 1 for p, y in zip(parsed, labels, strict=True))
    wrong_negatives = sum(p is None and y == 0 for p, y in zip(parsed, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # MCC over the confusion matrix where an unparsable answer to a "no" case counts as a false positive.
    fp_all = fp + wrong_negatives
    denominator = math.sqrt((tp + fp_all) * (tp + fn) * (tn + fp_all) * (tn + fn))
    mcc = (tp * tn - fp_all * fn) / denominator if denominator else 0.0
    return {
        "accuracy": 0.0,
        **proportion("accuracy", tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mcc": mcc,
        "unparsed": sum(p is None for p in parsed) / len(parsed) if parsed else 0.0,
    }


def bleu1(candidate: str, reference: str) -> float:
    """Clipped unigram precision with the brevity penalty (BLEU with n = 1)."""
    cand, ref = words(candidate), words(reference)
    if not cand or not ref:
        return float(cand == ref)
    overlap = sum((Counter(cand) & Counter(ref)).values())
    brevity = 1.0 if len(cand) > len(ref) else math.exp(1 - len(ref) / len(cand))
    return brevity * overlap / len(cand)


def rouge1(candidate: str, reference: str) -> float:
    """Unigram F1 between candidate and reference (ROUGE-1 F)."""
    cand, ref = words(candidate), words(reference)
    if not cand or not ref:
        return float(cand == ref)
    overlap = sum((Counter(cand) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(cand), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def meteor(candidate: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR with exact unigram matching (no stemming or synonyms, which need WordNet):
    the recall-weighted harmonic mean times (1 - gamma * (chunks / matches) ** beta)."""
    cand, ref = words(candidate), words(reference)
    if not cand or not ref:
        return float(cand == ref)
    alignment = _align(cand, ref)
    matches = len(alignment)
    if matches == 0:
        return 0.0
    precision, recall = matches / len(cand), matches / len(ref)
    f_mean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1 + sum(1 for (c0, r0), (c1, r1) in itertools.pairwise(alignment) if c1 != c0 + 1 or r1 != r0 + 1)
    return float(f_mean * (1 - gamma * (chunks / matches) ** beta))


def _align(cand: list[str], ref: list[str]) -> list[tuple[int, int]]:
    """Each candidate word matched to the first unused equal reference word, in candidate order."""
    used: set[int] = set()
    pairs = []
    for i, word in enumerate(cand):
        for j, other in enumerate(ref):
            if j not in used and other == word:
                used.add(j)
                pairs.append((i, j))
                break
    return pairs


def option_letter(text: str) -> str | None:
    """The option letter (A to E, upper case) an answer opens with, or None."""
    match = _LETTER.match(text)
    return None if match is None else match.group(1).upper()


def instruction_scores(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match (same words), BLEU-1, ROUGE-1 and METEOR, each with its count and a bootstrap interval over the
    items; with option letters as every reference (MedQA / MedMCQA style), `choice_accuracy` too, with its Wilson
    interval: the generated answer's opening letter against the reference's."""
    pairs = list(zip(answers, references, strict=True))
    matches = [float(words(a) == words(r)) for a, r in pairs]
    scores = {**bootstrap_mean("exact_match", np.array(matches)), **text_scores(answers, references)}
    letters = [option_letter(r) for r in references]
    if references and all(letters):
        right = sum(option_letter(a) == r for a, r in zip(answers, letters, strict=True))
        scores |= proportion("choice_accuracy", right, len(references))
    return scores


def text_scores(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean BLEU-1, ROUGE-1 and METEOR of generated answers against reference answers, each with its count and a
    bootstrap interval over the answers."""
    pairs = list(zip(answers, references, strict=True))
    scores: dict[str, float] = {}
    for name, score in (("bleu1", bleu1), ("rouge1", rouge1), ("meteor", meteor)):
        scores |= bootstrap_mean(name, np.array([score(a, r) for a, r in pairs]))
    return scores
