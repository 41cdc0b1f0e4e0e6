"""The task registry: what a job can train on, and how silos load and score it.

`TASKS` is a plain catalogue (no torch), so the coordinator can validate job specs against it.
"""

from fedmeki_core.tasks.catalog import TASKS, TaskInfo, get_task

__all__ = ["TASKS", "TaskInfo", "get_task"]
