"""The task registry: what a job can train on, and how silos load and score it.

`TASKS` and `SUITES` are a plain catalogue (no torch), so the coordinator can validate job specs against it.
"""

from fedmeki_core.tasks.catalog import (
    SUITES,
    TASKS,
    LabelType,
    Modality,
    Role,
    Suite,
    TaskInfo,
    get_task,
    injection_tasks,
    training_tasks,
)

__all__ = [
    "SUITES",
    "TASKS",
    "LabelType",
    "Modality",
    "Role",
    "Suite",
    "TaskInfo",
    "get_task",
    "injection_tasks",
    "training_tasks",
]
