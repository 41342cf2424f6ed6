"""Prompt domains as plug-ins: a task names which prompts a policy serves and trains on, its
held-out evaluation suite and its per-rollout metrics. The server and the engine know tasks only
by name (tasks.registry); ShapesWorld is the `shapes` task."""

from .base import Task
from .registry import available, load_task

__all__ = ["Task", "available", "load_task"]
