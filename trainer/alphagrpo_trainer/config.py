"""TrainConfig: every setting of a GRPO run, loadable from YAML (unknown keys are errors).

Each field's comment is its documentation; `alphagrpo train --print-config` prints the defaults
as YAML. Shipped examples: configs/demo.yaml (the README's main job), configs/rt2i.yaml,
configs/srr.yaml, configs/lora.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

TASKS = ("rt2i", "srr", "mixed")
STD_SCOPES = ("group", "batch", "none")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SCHEDULES = ("constant", "cosine")
OFF_POLICY = ("importance", "drop")


# fmt: off
# (one line per field: field_docs() reads each field's trailing comment as its documentation)
@dataclass
class TrainConfig:
    # ---- the policy ------------------------------------------------------------------------------
    policy: dict = field(default_factory=lambda: {"name": "tiny", "path": None})  # {name: registry name, path: its weights (null: the policy's default)}; the trainer's copy and a local server load the same
    device: str = "cpu"  # where the trainer's policy lives: cpu | cuda | cuda:N (under torchrun on GPUs: cuda:LOCAL_RANK)
    dtype: Optional[str] = None  # float32 | bfloat16 | float16 of the trainer's policy (null: the policy's default)
    # ---- what to train -------------------------------------------------------------------------
    task: str = "rt2i"  # rt2i: reasoning text-to-image; srr: self-reflective refinement (stage 2 trained); mixed: rt2i for the first mixed_rt2i_steps steps, then srr and rt2i alternating
    mixed_rt2i_steps: int = 0  # mixed only: RT2I-only steps before SRR starts
    group_size: int = 8  # G: samples per prompt
    prompts_per_step: int = 8  # prompts per optimiser step, over all ranks (a multiple of the world size)
    prompt_task: str = "shapes"  # task plug-in (alphagrpo_serve.tasks) for training prompts, the held-out suite and rollout metrics when prompts_file is not set
    prompts_file: Optional[str] = None  # JSONL of {"prompt": ...} rows to train on instead of the task's training split
    heldout_file: Optional[str] = None  # JSONL of {"prompt": ...[, "seed": ...]} rows evaluated with the server's reward (mean reward, S, Q) instead of the task's suite
    category_weights: dict = field(default_factory=dict)  # the task's prompt mix by category; empty = uniform over categories
    think_fraction: float = 1.0  # RT2I: share of prompts sampled in think mode (<think> text, then the image)
    # ---- sampling (rollouts) -------------------------------------------------------------------
    steps: int = 10  # denoising steps per rollout
    cfg_scale: Optional[float] = None  # text guidance scale of rollouts and evaluations (null: the policy's default); the recompute uses what each sample records
    noise_level: Optional[float] = None  # SDE noise inside the window (null: the policy's default)
    sde_window_size: int = 2  # SDE steps per rollout (the rest are ODE)
    sde_window_range: List[int] = field(default_factory=lambda: [0, 6])  # the window's start is drawn per step in [lo, hi - size]
    temperature: float = 1.0  # thought/critique sampling temperature
    max_thought_tokens: int = 40  # longest thought or critique, tokens
    # ---- loss -----------------------------------------------------------------------------------
    clip_text: List[float] = field(default_factory=lambda: [0.2, 0.28])  # [eps_low, eps_high] of the token ratio
    clip_image: float = 1e-3  # clip range of the per-step image ratio
    kl_text: float = 0.0  # beta of the k3 KL to the base policy on text tokens (needs a reference forward)
    kl_image: float = 0.0  # beta of the KL between step means of policy and base policy
    adv_std_scope: str = "batch"  # group | batch | none: what the advantages are divided by (the paper: batch)
    adv_clip: Optional[float] = None  # clamp advantages to [-c, c]
    dynamic_sampling: bool = False  # replace the groups whose reward spread (population std) is below dynamic_min_std by groups of fresh prompts (one refill round; the batch keeps prompts_per_step groups, the widest-spread first)
    dynamic_min_std: float = 0.05  # dynamic sampling: the least reward std of a group that is kept
    format_weight: float = 0.0  # format reward: a sample whose thought or critique fails the task's format check (ShapesTask.format_ok) loses this much reward; 0: off
    text_weight: float = 1.0  # weight of the text loss beside the image loss (it scales the text KL term too)
    text_aggregation: str = "token-mean"  # see kernels.grpo_token_loss
    updates_per_batch: int = 1  # optimiser steps on each batch of rollouts (>1: the clipped ratios matter)
    off_policy: str = "importance"  # a rollout from another policy version: importance (its recorded log-probs as the behaviour policy, clipped ratio) | drop
    srr_margin: float = 0.0  # SRR rectification: a refinement whose reward is not above its stage-1 image's by more than this gets the group's minimum stage-1 reward
    # ---- optimiser --------------------------------------------------------------------------------
    lr: float = 3e-5  # AdamW peak learning rate
    lr_schedule: str = "constant"  # constant | cosine (to 10% at max_steps), after warmup_steps
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip (over all ranks' averaged gradient)
    lora_rank: int = 0  # 0: full fine-tuning; >0: LoRA on the policy's default targets (tiny UMM: attention projections; BAGEL: attention and MLP of both experts); pushes only the adapters
    lora_alpha: float = 16.0  # LoRA scale = alpha / rank
    fsdp: bool = False  # shard the trainer's policy with FSDP2 over the torchrun ranks (full fine-tuning beyond one device; needs lora_rank 0; the trainer then skips its own evaluations and grids)
    # ---- run ----------------------------------------------------------------------------------------
    max_steps: int = 100  # optimiser steps of the run
    eval_every: int = 0  # evaluate every K steps (0: only before and after)
    eval_limit: int = 0  # held-out rows in the periodic evaluations (0: all 360)
    eval_final_limit: int = 0  # held-out rows of the before/after evaluations (0: all 360; tests use fewer)
    eval_steps: int = 20  # denoising steps of every evaluation (ODE)
    eval_srr: bool = True  # evaluate think + one round of SRR at inference too
    eval_cache: Optional[str] = None  # folder that caches the before-evaluation by a hash of the weights and the evaluation settings (evaluations are deterministic: ODE, fixed seeds, greedy text); null: always evaluate
    checkpoint_every: int = 10  # checkpoint cadence in steps (and always at the end)
    seed: int = 0  # prompts, think flags, windows and sample seeds of every step derive from (seed, step)
    out_dir: str = "runs/train"  # checkpoint, metrics, TensorBoard, evaluations, report
    server_timeout_s: float = 300.0  # deadline of one server call
    server_retries: int = 5  # retries of an unreachable server, with exponential backoff
    server_backoff_s: float = 0.5  # first retry delay, doubled each retry
    server_start_timeout_s: float = 600.0  # --server local: how long the local server may take to load its policy and listen (BAGEL-7B reads ~29 GB)
    # fmt: on

    def validate(self) -> "TrainConfig":
        def need(ok, msg):
            if not ok:
                raise ValueError(f"config: {msg}")

        need(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        need(self.group_size >= 2, f"group_size must be >= 2 (GRPO compares samples within a group), got {self.group_size}")
        need(self.prompts_per_step >= 1, f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        need(0.0 <= self.think_fraction <= 1.0, f"think_fraction must be in [0, 1], got {self.think_fraction}")
        need(1 <= self.steps <= 100, f"steps must be in [1, 100], got {self.steps}")
        need(len(self.sde_window_range) == 2, f"sde_window_range must be [lo, hi], got {self.sde_window_range}")
        lo, hi = self.sde_window_range
        need(1 <= self.sde_window_size and 0 <= lo and lo + self.sde_window_size <= hi <= self.steps,
             f"need 1 <= sde_window_size and 0 <= lo, lo + size <= hi <= steps; got size {self.sde_window_size}, "
             f"range {self.sde_window_range}, steps {self.steps}")
        need(self.noise_level is None or self.noise_level > 0,
             f"noise_level must be > 0 (the SDE window needs noise), got {self.noise_level}")
        need(self.cfg_scale is None or self.cfg_scale >= 0, f"cfg_scale must be >= 0, got {self.cfg_scale}")
        need(isinstance(self.policy, dict) and set(self.policy) <= {"name", "path"} and self.policy.get("name"),
             f"policy must be {{name: ..., path: ...}}, got {self.policy!r}")
        self.policy = {"name": self.policy["name"], "path": self.policy.get("path")}
        from alphagrpo_serve.models.registry import available
        from alphagrpo_serve.tasks.registry import available as tasks

        need(self.policy["name"] in available(), f"policy.name must be one of {available()}, got {self.policy['name']!r}")
        need(self.prompt_task in tasks(), f"prompt_task must be one of {tasks()}, got {self.prompt_task!r}")
        need(self.dtype in (None, "float32", "bfloat16", "float16"),
             f"dtype must be float32, bfloat16, float16 or null, got {self.dtype!r}")
        need(len(self.clip_text) == 2 and 0 <= self.clip_text[0] < 1 and self.clip_text[1] >= 0,
             f"clip_text must be [eps_low in [0, 1), eps_high >= 0], got {self.clip_text}")
        need(self.clip_image > 0, f"clip_image must be > 0, got {self.clip_image}")
        need(self.kl_text >= 0 and self.kl_image >= 0, "kl_text and kl_image must be >= 0")
        need(self.dynamic_min_std >= 0, f"dynamic_min_std must be >= 0, got {self.dynamic_min_std}")
        need(self.format_weight >= 0, f"format_weight must be >= 0, got {self.format_weight}")
        need(self.adv_std_scope in STD_SCOPES, f"adv_std_scope must be one of {STD_SCOPES}, got {self.adv_std_scope!r}")
        need(self.text_aggregation in AGGREGATIONS, f"text_aggregation must be one of {AGGREGATIONS}")
        need(self.off_policy in OFF_POLICY, f"off_policy must be one of {OFF_POLICY}, got {self.off_policy!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        need(self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}")
        need(not (self.fsdp and self.lora_rank), "fsdp shards full fine-tuning: set lora_rank 0 (adapters fit one device)")
        need(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        need(self.updates_per_batch >= 1, f"updates_per_batch must be >= 1, got {self.updates_per_batch}")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.server_retries >= 0 and self.server_backoff_s >= 0, "server_retries and server_backoff_s must be >= 0")
        need(
            self.server_timeout_s > 0 and self.server_start_timeout_s > 0,
            "server_timeout_s and server_start_timeout_s must be > 0",
        )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _yaml_load(text):
    """yaml.safe_load, except that exponent floats without a dot (1e-4, 3E5) are floats as YAML 1.2
    reads them; PyYAML's YAML 1.1 rules read them as strings, so `lr: 1e-4` or `--set lr=1e-4` (the
    CLI's own example) failed validation with a type error."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
    )
    return yaml.load(text, Loader=Loader)


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """TrainConfig from a YAML file (None: the defaults) with optional overrides; validated."""
    data = {}
    if path:
        with open(path) as f:
            data = _yaml_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping of field: value")
    data.update(overrides or {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path or 'config'}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    return TrainConfig(**data).validate()


def set_overrides(items, path: Optional[str] = None) -> dict:
    """The overrides of `--set FIELD=VALUE` items (YAML values). `policy.name=bagel` sets one key of a
    mapping field, over that mapping as the config at `path` has it. ValueError on an item without
    '='; yaml.YAMLError on a value that is not YAML."""
    overrides: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if "." in k:  # policy.name=bagel: one key of a mapping field
            outer, inner = k.split(".", 1)
            mapping = overrides.setdefault(outer, dict(load_config(path).to_dict().get(outer) or {}))
            mapping[inner] = _yaml_load(v)
        else:
            overrides[k] = _yaml_load(v)
    return overrides


def field_docs() -> dict:
    """{field: its comment in TrainConfig's source}: the documentation --print-config shows."""
    import inspect
    import re

    docs = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def config_yaml(cfg: TrainConfig, docs: bool = False) -> str:
    """The config as YAML (loadable by load_config); with docs, each field's documentation as a comment."""
    import yaml

    if not docs:
        return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    notes = field_docs()
    out = []
    for k, v in cfg.to_dict().items():
        line = yaml.safe_dump({k: v}, default_flow_style=True, sort_keys=False).strip()
        line = line[1:-1] if line.startswith("{") else line
        out.append(f"{line}  # {notes[k]}" if k in notes else line)
    return "\n".join(out) + "\n"
