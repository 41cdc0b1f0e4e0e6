"""The evaluation section of a job spec: the evaluator silo that scores every committed checkpoint.

The evaluator is a silo its operator registered with the role `evaluator` (`fedmeki-coordinator silo add NAME
--role evaluator`): it holds a held-out test set, is never selected to train, and after each committed training round
is handed that round's checkpoint to score (coordinator/evaluations.py). The rounds never wait for it: a checkpoint
waits for its score for `deadline_seconds` after its commit, kept from the retention meanwhile, and is then marked
missed. A job may complete before its last scores are in; they are taken until their deadline.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from fedmeki_core.spec_rules import MAX_DEADLINE_SECONDS, MAX_NAME, Spec


class EvaluationSpec(Spec):
    evaluator: str = Field(min_length=1, max_length=MAX_NAME)  # the evaluator silo's name
    deadline_seconds: float = Field(default=3600.0, gt=0)  # how long a checkpoint waits for its score

    @property
    def deadline(self) -> timedelta:
        """How long a checkpoint waits for its score; a stored job's longer deadline is cut to the maximum."""
        return timedelta(seconds=min(self.deadline_seconds, MAX_DEADLINE_SECONDS))
