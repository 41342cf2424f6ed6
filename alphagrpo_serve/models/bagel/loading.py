"""Streaming safetensors into meta-built modules, and load_bagel (the official folder, unchanged).

Modules are built on the meta device; the file's header is checked against the module's
state_dict first (every missing, extra and mis-shaped key is named in one CheckpointError, before
any data is read); then tensors are read one at a time from the memory-mapped file, cast, moved
and assigned in place of the meta tensors. Peak memory: the model plus one tensor.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

import torch
from safetensors import safe_open
from torch import nn

if TYPE_CHECKING:
    from .config import BagelConfig
    from .modeling import BagelModel
    from .tokens import BagelTokens
    from .vae import FluxVAE


class CheckpointError(ValueError):
    """A checkpoint that does not fit the module; the message names every offending key."""


def _same_up_to_unit_dims(a, b) -> bool:
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def assign_tensors(
    module: nn.Module,
    path: str,
    name_map: Optional[Dict[str, str]] = None,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    label: Optional[str] = None,
) -> None:
    """Fill `module`'s state_dict entries from the safetensors file `path`.

    name_map: module name -> file key (None: the same names). A file key may differ from its
    target only by unit dimensions (e.g. a 1x1 conv stored for a linear layer). Floating tensors
    are cast to `dtype`; parameters keep their requires_grad."""
    label = label or os.path.basename(path)
    targets = module.state_dict(keep_vars=True)
    name_map = name_map if name_map is not None else {k: k for k in targets}
    dev = torch.device(device)
    with safe_open(path, framework="pt", device="cpu") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        problems = []
        for name in targets:
            src = name_map.get(name)
            if src is None:  # a renamed checkpoint (the VAE): name the module's key
                problems.append(f"missing key for {name!r} (no tensor of the file maps to it)")
            elif src not in shapes:
                problems.append(f"missing key {src!r}")
        used = {name_map[n] for n in targets if n in name_map}
        problems += [f"unexpected key {k!r}" for k in sorted(shapes) if k not in used]
        for name, t in targets.items():
            src = name_map.get(name)
            if src in shapes and not _same_up_to_unit_dims(shapes[src], tuple(t.shape)):
                problems.append(f"key {src!r} has shape {list(shapes[src])}, expected {list(t.shape)}")
        if problems:
            raise CheckpointError(f"{label} does not fit the model ({len(problems)} problems): " + "; ".join(problems))
        for name, old in targets.items():
            value = f.get_tensor(name_map[name]).reshape(old.shape)
            value = value.to(device=dev, dtype=dtype if value.is_floating_point() else value.dtype)
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                owner._buffers[leaf] = value


def default_dtype(device) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class Bagel:
    """A loaded checkpoint: the ema modules, the autoencoder, the config and the tokenizer."""

    model: "BagelModel"
    vae: "FluxVAE"
    config: "BagelConfig"
    tokenizer: object
    tokens: "BagelTokens"


def build_model(config, device="cpu", dtype: torch.dtype = torch.float32):
    """A BagelModel with random weights (tests, tools): built directly on `device`."""
    from .modeling import BagelModel

    with torch.device(device):
        model = BagelModel(config)
    return model.to(dtype)


def _grids_from_tables(config, ema_path: str) -> None:
    """The position tables fix the largest latent grid and ViT grid (the official app hardcodes
    64 and 70 to match them, whatever config.json says): take their sizes, warn on disagreement."""
    with safe_open(ema_path, framework="pt") as f:
        keys = set(f.keys())
        for key, attr in (
            ("latent_pos_embed.pos_embed", "max_latent_size"),
            ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side"),
        ):
            if key not in keys:
                continue  # reported as missing by assign_tensors
            rows = f.get_slice(key).get_shape()[0]
            side = math.isqrt(rows)
            if side * side != rows:
                raise CheckpointError(f"key {key!r} has {rows} rows, not a square grid")
            if side != getattr(config, attr):
                warnings.warn(
                    f"config.json says {attr}={getattr(config, attr)} but {key} covers a {side}x{side} "
                    f"grid; using {side}"
                )
                setattr(config, attr, side)


def load_model(path: str, config=None, device="cpu", dtype: Optional[torch.dtype] = None):
    """ema.safetensors -> BagelModel on `device` in `dtype` (default: float32 on CPU, bf16 on CUDA)."""
    from .config import BagelConfig
    from .modeling import BagelModel

    config = config or BagelConfig.from_folder(path)
    dtype = dtype or default_dtype(device)
    ema = os.path.join(path, "ema.safetensors")
    _grids_from_tables(config, ema)
    with torch.device("meta"):
        model = BagelModel(config)
    assign_tensors(model, ema, device=device, dtype=dtype)
    model.reset_rotary(device)
    return model.eval()


def load_bagel(
    path: str, device="cpu", dtype: Optional[torch.dtype] = None, vae_dtype: Optional[torch.dtype] = None
) -> Bagel:
    """The official BAGEL folder -> Bagel(model, vae, config, tokenizer, tokens)."""
    from .config import BagelConfig
    from .core import SpecialTokens
    from .tokens import BagelTokens, load_tokenizer
    from .vae import load_flux_vae

    config = BagelConfig.from_folder(path)
    dtype = dtype or default_dtype(device)
    tokenizer = load_tokenizer(path)
    tokens = BagelTokens.from_tokenizer(tokenizer)
    if max(tokens.ids()) >= config.llm.vocab_size:
        raise CheckpointError(f"special token ids {tokens} exceed vocab_size {config.llm.vocab_size}")
    model = load_model(path, config, device, dtype)
    model.special_tokens = SpecialTokens(tokens.start_of_image, tokens.end_of_image)
    vae = load_flux_vae(os.path.join(path, "ae.safetensors"), device, vae_dtype or dtype)
    return Bagel(model, vae, config, tokenizer, tokens)
