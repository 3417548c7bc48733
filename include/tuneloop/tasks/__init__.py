"""The user's task, from the ``task:`` section of the loop config: how rows are read and
rendered (:mod:`tuneloop.tasks.spec`) and how answers are scored (:mod:`tuneloop.tasks.scoring`,
:mod:`tuneloop.tasks.judge`). No task is built in: the shipped examples live in
``tuneloop.demo`` and ``examples/``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneloop.tasks.spec import DEFAULT_SLICE, Example, TaskRowError, TaskSpec

if TYPE_CHECKING:
    from tuneloop.config import Settings

__all__ = ["DEFAULT_SLICE", "Example", "TaskRowError", "TaskSpec", "task_spec"]


def task_spec(settings: Settings) -> TaskSpec:
    """The task of a loop's settings."""
    return TaskSpec(settings.task)
