"""Files the project writes and reads: atomic writes (a reader, or a run killed mid-write, sees the
old file or the new one, never a torn one) and JSON Lines with errors that name the file and line."""

from __future__ import annotations

import contextlib
import json
import os
from typing import IO, Callable, Iterator, Tuple


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file beside `path` (per-process name); on a clean exit flushes, fsyncs and
    renames it over `path`; on an error removes it and leaves `path` as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """For writers that take a path (safetensors' save_file): write(tmp_path), fsync, rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_torch_atomic(obj, path: str) -> None:
    """torch.save through atomic_open (checkpoints)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def write_json_atomic(obj, path: str) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)


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
