"""JSON Lines input with errors that name the file and line."""
from __future__ import annotations

import json
from typing import Iterator, Tuple


def iter_jsonl(path: str) -> Iterator[Tuple[int, object]]:
    """(line number, parsed object) for each non-blank line; ValueError 'path:line: ...' on bad JSON."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
