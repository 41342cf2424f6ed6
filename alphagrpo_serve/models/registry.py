"""Policy registry: name -> (module, class), imported lazily so that a deployment pays only for
the model it serves. Adding a model is one line here (docs/adding_a_policy.md)."""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple, Type

import torch

POLICIES: Dict[str, Tuple[str, str]] = {
    "tiny": ("alphagrpo_serve.models.tiny_policy", "TinyPolicy"),
    "bagel": ("alphagrpo_serve.models.bagel.policy", "BagelPolicy"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available() -> list:
    return sorted(POLICIES)


def policy_class(name: str) -> Type:
    """The class registered under `name`; ValueError listing the available names otherwise."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available())}")
    module, cls = POLICIES[name]
    return getattr(importlib.import_module(module), cls)


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """'float32' | 'bfloat16' | 'float16' | None (the policy's default) -> torch dtype."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; available: {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: Optional[str]) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' -> torch.device, checked against what this machine has."""
    name = name or "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return dev


def load_policy(
    name: str = "tiny", path: Optional[str] = None, device: Optional[str] = "cpu", dtype: Optional[str] = None
):
    """Loads policy `name` from `path` (None: its default) onto device in dtype."""
    cls = policy_class(name)
    return cls.load(path, device=str(parse_device(device)), dtype=parse_dtype(dtype))
