"""The KServe v2 models of one server: their named, typed inputs and outputs (docs/kserve.md lists
them), the mapping of sampling inputs onto the native SamplingParams (so one validation serves both
protocols), and the metadata and config messages that describe them.

Models: alphagrpo_generate and alphagrpo_reflect (on the policy's batchers), alphagrpo_verify and
alphagrpo_decompose (on the reward backend). A model the policy cannot serve (reflect without the
capability) is not listed; an input the policy cannot honour (think, image guidance) is not in its
signature.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .._proto.alphagrpo.v1 import policy_pb2
from ..models.base import PolicyInfo
from ..wire import MODES
from .errors import BadRequest

GENERATE, REFLECT, VERIFY, DECOMPOSE = (
    "alphagrpo_generate",
    "alphagrpo_reflect",
    "alphagrpo_verify",
    "alphagrpo_decompose",
)
VERSION = "1"  # the only version of every model; "" also means it
PLATFORM = "alphagrpo"


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: Tuple[int, ...]  # -1: any size
    doc: str
    optional: bool = False
    field: Optional[str] = None  # sampling inputs: the SamplingParams field(s) it sets ("a/b" for a pair)

    def matches(self, shape) -> bool:
        return len(shape) == len(self.shape) and all(w in (-1, d) for w, d in zip(self.shape, shape))


@dataclass(frozen=True)
class Model:
    name: str
    doc: str
    inputs: Tuple[Tensor, ...]
    outputs: Tuple[Tensor, ...]

    def input(self, name: str) -> Optional[Tensor]:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> Optional[Tensor]:
        return next((t for t in self.outputs if t.name == name), None)


def _opt(name, datatype, shape, field, doc) -> Tensor:
    return Tensor(name, datatype, shape, doc, optional=True, field=field)


# Sampling inputs shared by generate and reflect; unset ones take the policy's defaults (GetModelInfo / ModelConfig)
SAMPLING = (
    _opt("mode", "BYTES", (1,), "mode", "'ode' (deterministic) or 'sde' (noise inside the SDE window)"),
    _opt("steps", "INT32", (1,), "steps", "denoising updates, 1 to the server's --max-steps"),
    _opt("guidance", "FP32", (1,), "cfg_scale", "text guidance scale in [0, 100]; 1 disables it"),
    _opt(
        "guidance_interval",
        "FP32",
        (2,),
        "cfg_interval_low/cfg_interval_high",
        "(low, high): guidance applies where sigma lies in it, 0 <= low <= high <= 1",
    ),
    _opt(
        "image_guidance",
        "FP32",
        (1,),
        "cfg_img_scale",
        "image guidance scale in [0, 100] (policies with an image guidance branch)",
    ),
    _opt("guidance_renorm", "BYTES", (1,), "cfg_renorm_type", "none | global | channel | text_channel"),
    _opt("guidance_renorm_min", "FP32", (1,), "cfg_renorm_min", "lower clamp of the renormalisation, [0, 1]"),
    _opt("sde_window", "INT32", (2,), "sde_window_start/sde_window_size", "(first step, steps) sampled with noise"),
    _opt("noise_level", "FP32", (1,), "noise_level", "SDE noise level in [0, 10]"),
    _opt("timestep_shift", "FP32", (1,), "timestep_shift", "timestep shift of the schedule, [0.001, 100]"),
    _opt("width", "INT32", (1,), "width", "canvas width in pixels (the policy's canvas rule)"),
    _opt("height", "INT32", (1,), "height", "canvas height in pixels"),
    _opt("temperature", "FP32", (1,), "temperature", "text sampling temperature: 0 (greedy) or [0.001, 100]"),
    _opt("top_p", "FP32", (1,), "top_p", "nucleus sampling mass in (0, 1]"),
    _opt(
        "max_thought_tokens",
        "INT32",
        (1,),
        "max_thought_tokens",
        "longest thought or critique, at most the server's limit",
    ),
)
PROMPT = Tensor("prompt", "BYTES", (1,), "the prompt, UTF-8")
GROUP = _opt("group_size", "INT32", (1,), None, "samples G (default 1), at most the server's limit")
SEED = _opt("seed", "INT64", (1,), None, "base seed >= 0 (default 0): sample j uses seed + j")


def _sample_outputs(h: int, w: int) -> Tuple[Tensor, ...]:
    return (
        Tensor("image", "UINT8", (-1, h, w, 3), "the G images, RGB"),
        Tensor("thought", "BYTES", (-1,), "each sample's <think> text (generate) or critique (reflect), UTF-8"),
        Tensor("seed", "INT64", (-1,), "each sample's seed"),
        Tensor("step_log_probs", "FP32", (-1, -1), "log-prob of each SDE-window step, [G, K] (K = 0 in ODE mode)"),
        Tensor("policy_version", "INT64", (-1,), "version of the weights that drew each sample"),
        Tensor(
            "resolved_params", "BYTES", (1,), "JSON of the settings the samples were drawn with (defaults filled in)"
        ),
    )


def build_models(info: PolicyInfo) -> Dict[str, Model]:
    """The models this server lists, from the served policy's capabilities."""
    caps, canvas = info.capabilities, info.capabilities.canvas
    fixed = canvas.min_side == canvas.max_side
    h, w = (canvas.default[1], canvas.default[0]) if fixed else (-1, -1)
    sampling = tuple(t for t in SAMPLING if t.name != "image_guidance" or "image" in caps.guidance_branches)
    think = (
        (_opt("think", "BOOL", (1,), None, "write a <think> plan before drawing (default false)"),)
        if caps.think
        else ()
    )
    models = {
        GENERATE: Model(
            GENERATE,
            "reasoning text-to-image: G samples of one prompt (PolicyService.Generate)",
            (PROMPT, GROUP, SEED) + think + sampling,
            _sample_outputs(h, w),
        ),
        VERIFY: Model(
            VERIFY,
            "DVReward of one image: reward = sqrt(S * Q) with its breakdown (RewardService.Verify)",
            (PROMPT, Tensor("image", "UINT8", (-1, -1, 3), "the image, RGB [H, W, 3]")),
            (
                Tensor("reward", "FP32", (1,), "the aggregate reward"),
                Tensor("semantic", "FP32", (1,), "S: mean semantic score"),
                Tensor("quality", "FP32", (1,), "Q: mean quality score"),
                Tensor(
                    "breakdown",
                    "BYTES",
                    (1,),
                    "JSON: every question with kind, tag, score and answer, and the failed count",
                ),
            ),
        ),
        DECOMPOSE: Model(
            DECOMPOSE,
            "the prompt's atomic yes/no questions (RewardService.Decompose)",
            (PROMPT,),
            (
                Tensor("question_ids", "BYTES", (-1,), "ids q0, q1, ..."),
                Tensor("questions", "BYTES", (-1,), "the questions"),
                Tensor("kinds", "BYTES", (-1,), "semantic | quality"),
                Tensor("tags", "BYTES", (-1,), "Existence, Count, ..., Geometry, ..."),
            ),
        ),
    }
    if caps.reflect:
        models[REFLECT] = Model(
            REFLECT,
            "self-reflective refinement: G critiques and refined images of one (prompt, image) (PolicyService.Reflect)",
            (PROMPT, Tensor("image", "UINT8", (h, w, 3), "the image to refine, RGB [H, W, 3]"), GROUP, SEED) + sampling,
            _sample_outputs(h, w),
        )
    return dict(sorted(models.items()))


def check_inputs(model: Model, decoded: Dict[str, Tuple[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Names, datatypes and shapes against the signature -> {name: array}; BadRequest naming the input."""
    for name, (datatype, arr) in decoded.items():
        spec = model.input(name)
        if spec is None:
            raise BadRequest(
                f"unexpected input '{name}': model '{model.name}' takes {', '.join(t.name for t in model.inputs)}"
            )
        if datatype != spec.datatype:
            raise BadRequest(f"input '{name}' has datatype {datatype}; model '{model.name}' expects {spec.datatype}")
        if not spec.matches(arr.shape):
            raise BadRequest(
                f"input '{name}' has shape {list(arr.shape)}; model '{model.name}' expects "
                f"{list(spec.shape)} (-1: any size)"
            )
    missing = [t.name for t in model.inputs if not t.optional and t.name not in decoded]
    if missing:
        raise BadRequest(
            f"model '{model.name}' needs input '{missing[0]}'"
            + (f" (missing: {', '.join(missing)})" if len(missing) > 1 else "")
        )
    return {name: arr for name, (_, arr) in decoded.items()}


def text(inputs: Dict[str, np.ndarray], name: str) -> str:
    """A BYTES [1] input as UTF-8 text."""
    raw = inputs[name].reshape(-1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"input '{name}' is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def scalar(inputs: Dict[str, np.ndarray], name: str, default):
    return inputs[name].reshape(-1)[0].item() if name in inputs else default


def sampling_params(model: Model, inputs: Dict[str, np.ndarray]) -> policy_pb2.SamplingParams:
    """The native SamplingParams the sampling inputs set (unset: the policy's defaults)."""
    p = policy_pb2.SamplingParams(think=bool(scalar(inputs, "think", False)))
    for t in model.inputs:
        if t.field is None or t.name not in inputs:
            continue
        values = inputs[t.name].reshape(-1)
        if t.datatype == "BYTES":
            value = text(inputs, t.name)
            if t.field == "mode":
                if value not in MODES:
                    raise BadRequest(f"input 'mode' must be 'ode' or 'sde', got {value!r}")
                p.mode = MODES[value]
            else:
                setattr(p, t.field, value)
        elif "/" in t.field:
            for f, v in zip(t.field.split("/"), values):
                setattr(p, f, v.item())
        else:
            setattr(p, t.field, values[0].item())
    return p


_INPUT_OF = {t.field: t.name for t in SAMPLING}


def name_inputs(message: str) -> str:
    """A native validation message in KServe terms: `params.cfg_scale` -> `input 'guidance'`,
    `prompts[0]` -> `input 'prompt'`, `group_size` -> `input 'group_size'`."""
    message = re.sub(
        r"params\.([a-z_]+(?:/[a-z_]+)?)", lambda m: f"input '{_INPUT_OF.get(m.group(1), m.group(1))}'", message
    )
    message = re.sub(r"^prompts\[0\]", "input 'prompt'", message)
    return re.sub(r"^(group_size|think)\b", r"input '\1'", message)


def resolved_json(sc, text_cfg, think: bool) -> str:
    """The settings samples were drawn with, under the input names (a client may send them back)."""
    return json.dumps(
        {
            "mode": sc.mode,
            "steps": sc.steps,
            "guidance": sc.cfg_scale,
            "guidance_interval": list(sc.cfg_interval),
            "image_guidance": sc.cfg_img_scale,
            "guidance_renorm": sc.cfg_renorm_type,
            "guidance_renorm_min": sc.cfg_renorm_min,
            "sde_window": list(sc.sde_window),
            "noise_level": sc.noise_level,
            "timestep_shift": sc.shift,
            "width": sc.width,
            "height": sc.height,
            "temperature": text_cfg.temperature,
            "top_p": text_cfg.top_p,
            "max_thought_tokens": text_cfg.max_tokens,
            "think": think,
        }
    )
