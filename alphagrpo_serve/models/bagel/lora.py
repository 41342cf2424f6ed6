"""LoRA adapters on BAGEL through PEFT, under the official module names.

Adapters are injected into the BagelModel in place (`peft.inject_adapter_in_model`), so the module
keeps its official structure and names; PEFT's `lora.Linear` wraps each target (`<name>.base_layer`,
`<name>.lora_A.default`, `<name>.lora_B.default`).

Targets (language model layers only; the ViT's own `self_attn.*_proj` are never touched):
- "gen": the generation expert, `self_attn.{q,k,v,o}_proj_moe_gen`, `mlp_moe_gen.{gate,up,down}_proj`
- "und": the understanding expert, `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`
The paper's setting (LoRA on all attention and MLP weights including the experts) is both.

Names on the wire (UpdateWeights, export/import): `<module>.lora_A` [r, in] and `<module>.lora_B`
[out, r] with the scale folded into B (a receiver applies them at scale 1).

On disk: PEFT's format, `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_{A,B}.weight` (scale folded: lora_alpha = r), which
`peft.PeftModel.from_pretrained(model, dir)` loads onto any module with BAGEL's official names.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

TARGETS = {
    "gen": r"self_attn\.(q|k|v|o)_proj_moe_gen|mlp_moe_gen\.(gate|up|down)_proj",
    "und": r"self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj",
}
DEFAULT_TARGETS = ("gen", "und")
LAYER = r"language_model\.model\.layers\.\d+\."
PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def target_regex(groups: Sequence[str]) -> str:
    """PEFT target_modules (a full-match regex over module names) for target groups."""
    bad = sorted(set(groups) - set(TARGETS))
    if bad or not groups:
        raise ValueError(
            f"LoRA targets {bad or list(groups)} are not among BAGEL's {sorted(TARGETS)} "
            f"(gen: the generation expert, und: the understanding expert)"
        )
    return LAYER + "(" + "|".join(TARGETS[g] for g in groups) + ")"


def targetable(model: nn.Module) -> Dict[str, nn.Linear]:
    """Every linear layer LoRA may wrap: {module name: the (base) linear}."""
    pat = re.compile(target_regex(tuple(TARGETS)))
    out = {}
    for name, mod in model.named_modules():
        if pat.fullmatch(name):
            out[name] = getattr(mod, "base_layer", mod)
    return out


def lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """{module name: PEFT LoRA layer} of the injected adapters."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The adapters' dtype for a model in `model_dtype`: float32 for a half-precision model (see
    inject), else the model's."""
    return torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else model_dtype


def inject(model: nn.Module, rank: int, alpha: float, target_modules, dtype: torch.dtype) -> None:
    """Adds adapters (PEFT's init: A Kaiming-uniform, B zero), freezes everything else. Adapters of
    a bfloat16/float16 model are kept in float32: AdamW's steps on them (lr ~1e-5 of weights ~1e-2)
    are below half precision's resolution and would round away; PEFT casts each layer's input to
    the adapters' dtype and their output back to the base layer's."""
    from peft import LoraConfig, inject_adapter_in_model

    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = adapter_dtype(dtype)
    for name, layer in lora_layers(model).items():
        for sub in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            sub.to(dtype)
            sub.weight.requires_grad_(True)


def wire_names(model: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """{wire name: (LoRA layer, 'A' | 'B')} of the injected adapters."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = (layer, "A")
        out[f"{name}.lora_B"] = (layer, "B")
    return out


def adapter_weight(layer, which: str) -> torch.Tensor:
    return (layer.lora_A if which == "A" else layer.lora_B)[ADAPTER].weight


def scale_of(layer) -> float:
    return float(layer.scaling[ADAPTER])


def set_scale(model: nn.Module, scale: float = 1.0) -> None:
    for layer in lora_layers(model).values():
        layer.scaling[ADAPTER] = scale


def named_layers(model: nn.Module, names: Iterable[str]) -> Tuple[Dict[str, nn.Linear], List[str]]:
    """The layers a set of wire names puts adapters on, for a model without LoRA: ({module name: its
    linear}, problems). Names must pair lora_A with lora_B on a targetable layer."""
    lin = targetable(model)
    names = list(names)
    problems, modules = [], {}
    for n in names:
        mod, _, which = n.rpartition(".")
        if which not in ("lora_A", "lora_B") or mod not in lin:
            problems.append(
                f"{n!r} is not a LoRA adapter of this policy (targets: {sorted(TARGETS)} "
                f"projections of the language model layers, named <module>.lora_A / .lora_B)"
            )
            continue
        modules.setdefault(mod, set()).add(which)
    for mod, got in modules.items():
        if got != {"lora_A", "lora_B"}:
            problems.append(f"{mod}: lora_A and lora_B must come together, got only {sorted(got)}")
    return {mod: lin[mod] for mod in modules}, problems


def peft_config(rank: int, target_modules) -> dict:
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, lora_dropout=0.0, bias="none")
    d = cfg.to_dict()
    d["peft_type"] = "LORA"
    if isinstance(d.get("target_modules"), set):
        d["target_modules"] = sorted(d["target_modules"])
    return d


def save_peft(model: nn.Module, path: str) -> str:
    """The adapters in PEFT's format (scale folded, lora_alpha = r) in folder `path`."""
    from safetensors.torch import save_file

    from ...fileio import write_atomic, write_json_atomic

    layers = lora_layers(model)
    if not layers:
        raise ValueError("LoRA is not enabled: no adapters to save")
    os.makedirs(path, exist_ok=True)
    tensors, ranks = {}, set()
    for name, layer in layers.items():
        a, b = adapter_weight(layer, "A"), adapter_weight(layer, "B")
        ranks.add(a.shape[0])
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (b.detach() * scale_of(layer)).cpu().contiguous()
    if len(ranks) != 1:
        raise ValueError(f"adapters of several ranks {sorted(ranks)}")
    write_atomic(os.path.join(path, "adapter_model.safetensors"), lambda tmp: save_file(tensors, tmp))
    write_json_atomic(peft_config(ranks.pop(), sorted(layers)), os.path.join(path, "adapter_config.json"))
    return path


def read_peft(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(adapter_config.json, {wire name: tensor with the config's scale folded into B}) of a PEFT
    LoRA folder."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}, expected LORA")
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise ValueError(f"{path}: {flag} adapters are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern / alpha_pattern are not supported")
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    raw = load_file(os.path.join(path, "adapter_model.safetensors"))
    out = {}
    for key, t in raw.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", name)
        if not m:
            raise ValueError(f"{path}: {key!r} is not a LoRA A/B weight")
        out[f"{m.group(1)}.{m.group(2)}"] = t * scale if m.group(2) == "lora_B" else t
    return cfg, out
