"""Appends a benchmark table to a Markdown results file under a heading that names what ran,
where and when."""

from __future__ import annotations

import datetime
import platform


def machine() -> str:
    return platform.processor() or platform.machine()


def append(path: str, title: str, table: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(f"\n### {title} ({stamp}; {machine()})\n\n{table}\n")
