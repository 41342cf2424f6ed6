"""Request validation at the door: limits, prompts, sampling settings resolved against the policy's
defaults. Every bad field is a BadRequest naming it; a setting the policy cannot honour is a
CapabilityError naming the capability."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from ..models.base import CapabilityError, Policy
from ..sampling.sampler import SamplingConfig, TextConfig
from ..wire import params_to_overrides
from .errors import BadRequest


@dataclass
class Limits:
    max_prompts: int = 64  # prompts (or items) per request
    max_prompt_chars: int = 512
    max_group: int = 64
    max_steps: int = 100
    max_thought_tokens: int = 128
    max_update_bytes: int = 1 << 30  # one UpdateWeights stream


def check_prompts(prompts, limits: Limits, check_prompt: Callable[[str], None], field: str = "prompts") -> List[str]:
    if not prompts:
        raise BadRequest(f"{field} is empty")
    if len(prompts) > limits.max_prompts:
        raise BadRequest(f"{field} has {len(prompts)} entries; at most {limits.max_prompts}")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise BadRequest(f"{field}[{i}] is empty")
        if len(p) > limits.max_prompt_chars:
            raise BadRequest(f"{field}[{i}] has {len(p)} characters; at most {limits.max_prompt_chars}")
        try:
            check_prompt(p)
        except ValueError as exc:
            raise BadRequest(f"{field}[{i}]: {exc}") from None
    return list(prompts)


# SamplingConfig / TextConfig field -> its name in SamplingParams (errors name what the client sent)
WIRE_NAMES = {"shift": "timestep_shift", "max_tokens": "max_thought_tokens",
              "sde_window": "sde_window_start/sde_window_size", "cfg_interval": "cfg_interval_low/cfg_interval_high"}


def _wire_message(exc: Exception) -> str:
    msg = str(exc)
    head = msg.split(" ", 1)[0]
    return f"params.{WIRE_NAMES[head]}{msg[len(head):]}" if head in WIRE_NAMES else f"params.{msg}"


def request_settings(policy: Policy, params, limits: Limits, reflect: bool) -> Tuple[SamplingConfig, TextConfig, bool]:
    """(sampling, text, think) of a request: its fields over the policy's defaults, checked."""
    try:
        ov, text_ov = params_to_overrides(params)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if "steps" in ov and not 1 <= ov["steps"] <= limits.max_steps:
        raise BadRequest(f"params.steps must be in [1, {limits.max_steps}], got {ov['steps']}")
    try:
        sc = policy.resolve_sampling(ov, reflect=reflect)
        text = policy.resolve_text(text_ov)
    except CapabilityError:
        raise
    except (ValueError, TypeError) as exc:
        raise BadRequest(_wire_message(exc)) from None
    if sc.steps > limits.max_steps:
        raise BadRequest(f"params.steps must be in [1, {limits.max_steps}], got {sc.steps}")
    if text.max_tokens > limits.max_thought_tokens:
        raise BadRequest(f"params.max_thought_tokens must be in [1, {limits.max_thought_tokens}], got {text.max_tokens}")
    think = bool(params.think) if not reflect else True
    if params.think and not reflect:
        policy.require("think")
    return sc, text, think


def deadline(context) -> Optional[float]:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
