"""Task registry: name -> (module, class), imported lazily (the server imports no task's code
until one is named)."""

from __future__ import annotations

import importlib
from typing import Dict, Tuple

TASKS: Dict[str, Tuple[str, str]] = {
    "open": ("alphagrpo_serve.tasks.base", "OpenTask"),
    "shapes": ("alphagrpo_serve.shapes.task", "ShapesTask"),
}


def available() -> list:
    return sorted(TASKS)


def load_task(name: str):
    """An instance of the task registered under `name`; ValueError listing the names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available())}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)()
