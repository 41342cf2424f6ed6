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
from .errors import BadRequest, ResourceLimit


@dataclass
class Limits:
    """Every per-request limit of the server; docs/limits_and_errors.md lists each with its flag and
    the code a client gets."""

    max_prompts: int = 64  # prompts (or items) per request
    max_prompt_chars: int = 512
    max_group: int = 64
    max_steps: int = 100
    max_thought_tokens: int = 128
    max_update_bytes: int = 1 << 30  # bytes one UpdateWeights stream may declare
    max_update_total_bytes: int = 2 << 30  # bytes held by all UpdateWeights streams in progress together
    max_reward_queue: int = 1024  # Verify/Decompose items waiting for or running on the reward threads
    max_message_bytes: int = 64 << 20  # gRPC message size limit (set from --max-message-mb by the server)


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
WIRE_NAMES = {
    "shift": "timestep_shift",
    "max_tokens": "max_thought_tokens",
    "sde_window": "sde_window_start/sde_window_size",
    "cfg_interval": "cfg_interval_low/cfg_interval_high",
}


def _wire_message(exc: Exception) -> str:
    msg = str(exc)
    head = msg.split(" ", 1)[0]
    return f"params.{WIRE_NAMES[head]}{msg[len(head) :]}" if head in WIRE_NAMES else f"params.{msg}"


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
    except CapabilityError as exc:  # named as the client sent it: params.cfg_img_scale ...
        raise CapabilityError(_wire_message(exc)) from None
    except (ValueError, TypeError) as exc:
        raise BadRequest(_wire_message(exc)) from None
    if sc.steps > limits.max_steps:  # unset: the policy's default is over the server's limit
        raise BadRequest(
            f"params.steps is unset and the policy's default {sc.steps} exceeds the server's "
            f"--max-steps {limits.max_steps}: set it"
        )
    think = bool(params.think) if not reflect else True
    if think and text.max_tokens > limits.max_thought_tokens:
        if "max_tokens" in text_ov:
            raise BadRequest(
                f"params.max_thought_tokens must be in [1, {limits.max_thought_tokens}], got {text.max_tokens}"
            )
        raise BadRequest(
            f"params.max_thought_tokens is unset and the policy's default {text.max_tokens} exceeds the "
            f"server's --max-thought-tokens {limits.max_thought_tokens}: set it"
        )
    if params.think and not reflect:
        policy.require("think")
    return sc, text, think


# bytes a Sample message takes beyond its image and trajectory (indices, seed, version, thought, framing)
SAMPLE_OVERHEAD = 64


def check_answer_size(n_samples: int, width: int, height: int, raw: bool, limits: Limits) -> None:
    """Refuses, before anything is computed, an answer whose declared size alone (the raw images it
    asks for) passes the message limit. Answers still too large once computed (PNGs, thoughts,
    trajectories) are refused by check_message_size."""
    declared = n_samples * ((width * height * 3 if raw else 0) + SAMPLE_OVERHEAD)
    if declared > limits.max_message_bytes:
        raise ResourceLimit(
            f"the answer would hold at least {declared} bytes ({n_samples} samples"
            f"{' with raw images' if raw else ''}), more than the message limit of "
            f"{limits.max_message_bytes} bytes: ask for fewer samples per request"
        )


def check_message_size(msg, limits: Limits) -> None:
    """A computed answer larger than the message limit is refused as RESOURCE_EXHAUSTED (gRPC would
    drop it on the way out)."""
    size = msg.ByteSize()
    if size > limits.max_message_bytes:
        raise ResourceLimit(
            f"the answer holds {size} bytes, more than the message limit of {limits.max_message_bytes} "
            f"bytes: ask for fewer samples per request, or without return_raw / return_trajectory"
        )


def deadline(context) -> Optional[float]:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
