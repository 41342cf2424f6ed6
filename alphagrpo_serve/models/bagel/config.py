"""BAGEL's configuration, read from an official checkpoint folder.

The folder holds config.json (model_type "bagel", the flow/vision settings and, in copies made for
vLLM, inline `llm_config` / `vit_config`), llm_config.json (Qwen2) and vit_config.json (SigLIP).
The official code reads the two separate files and forces a few fields; so do we:
- llm: `qk_norm` on, `tie_word_embeddings` off, MoT layers (whatever llm_config.json says);
- vit: `rope` off (learned position embedding), and one encoder layer less than vit_config.json
  says (BAGEL-7B-MoT: 27 -> 26). vLLM reads the inline `vit_config` instead and drops a layer only
  when it says 27; tools/make_tiny_bagel.py writes both so the two loaders read the same tower.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from transformers import Qwen2Config, SiglipVisionConfig

# the FLUX autoencoder BAGEL uses (ae.safetensors); its sizes are read from the file, these are fixed
VAE_LATENT_CHANNELS = 16
VAE_DOWNSAMPLE = 8
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159


def _read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


@dataclass
class BagelConfig:
    llm: Qwen2Config  # hidden_size, layers, heads, kv heads, vocab, rope, rms eps
    vit: SiglipVisionConfig  # num_hidden_layers is the depth actually built (json value - 1)
    latent_patch_size: int = 2
    max_latent_size: int = 64  # latent_pos_embed covers max_latent_size^2 patch positions
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0  # config.json's training-time value, kept for reference; sampling uses SamplingConfig.shift (3, as the official inferencer)
    latent_channels: int = VAE_LATENT_CHANNELS
    vae_downsample: int = VAE_DOWNSAMPLE

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def patch_latent_dim(self) -> int:
        """Width of one latent token: p * p * 16 = 64."""
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def pixels_per_latent_token(self) -> int:
        """Image pixels per latent token side: downsample * patch = 16."""
        return self.vae_downsample * self.latent_patch_size

    @property
    def head_dim(self) -> int:
        return getattr(self.llm, "head_dim", None) or self.llm.hidden_size // self.llm.num_attention_heads

    @classmethod
    def from_folder(cls, path: str) -> "BagelConfig":
        root = _read_json(os.path.join(path, "config.json"))
        if root.get("model_type") != "bagel":
            raise ValueError(f"{path}/config.json: model_type is {root.get('model_type')!r}, expected 'bagel'")
        llm_dict = _section(path, root, "llm_config")
        vit_dict = _section(path, root, "vit_config")
        return cls.from_dicts(root, llm_dict, vit_dict)

    @classmethod
    def from_dicts(cls, root: Dict[str, Any], llm_dict: Dict[str, Any], vit_dict: Dict[str, Any]) -> "BagelConfig":
        """root: config.json; llm_dict / vit_dict: llm_config.json / vit_config.json as written on disk."""
        llm_dict = {k: v for k, v in llm_dict.items() if k not in ("architectures", "model_type")}
        llm = Qwen2Config(**llm_dict)
        llm.qk_norm = True
        llm.tie_word_embeddings = False
        llm.layer_module = "Qwen2MoTDecoderLayer"
        vit_dict = {k: v for k, v in vit_dict.items() if k not in ("architectures", "model_type")}
        vit = SiglipVisionConfig(**vit_dict)
        vit.rope = False
        vit.num_hidden_layers = vit_dict.get("num_hidden_layers", vit.num_hidden_layers) - 1
        if vit.num_hidden_layers < 1:
            raise ValueError("vit_config.json: num_hidden_layers must be at least 2 (BAGEL builds one layer less)")
        vit._attn_implementation = "sdpa"
        vae = root.get("vae_config") or {}
        cfg = cls(
            llm=llm,
            vit=vit,
            latent_patch_size=int(root.get("latent_patch_size", 2)),
            max_latent_size=int(root.get("max_latent_size", 64)),
            vit_max_num_patch_per_side=int(root.get("vit_max_num_patch_per_side", 70)),
            connector_act=str(root.get("connector_act", "gelu_pytorch_tanh")),
            interpolate_pos=bool(root.get("interpolate_pos", False)),
            timestep_shift=float(root.get("timestep_shift", 1.0)),
            latent_channels=int(vae.get("z_channels", VAE_LATENT_CHANNELS)),
            vae_downsample=int(vae.get("downsample", VAE_DOWNSAMPLE)),
        )
        if cfg.interpolate_pos:
            raise NotImplementedError("interpolate_pos=True (interpolated ViT/latent position ids) is not supported")
        if cfg.latent_channels != VAE_LATENT_CHANNELS or cfg.vae_downsample != VAE_DOWNSAMPLE:
            raise ValueError(f"vae_config {vae}: BAGEL's FLUX autoencoder has 16 latent channels and downsample 8")
        return cfg


def _section(path: str, root: Dict[str, Any], name: str) -> Dict[str, Any]:
    """llm_config.json / vit_config.json (the official files); the inline copy in config.json only
    when the file is absent."""
    file = os.path.join(path, f"{name}.json")
    if os.path.exists(file):
        return _read_json(file)
    inline: Optional[Dict[str, Any]] = root.get(name)
    if not isinstance(inline, dict):
        raise FileNotFoundError(f"{file} is missing and config.json has no inline {name}")
    inline = dict(inline)
    if name == "vit_config":  # the inline copy follows vLLM's rule: it states the depth actually used
        n = inline.get("num_hidden_layers", 27)
        inline["num_hidden_layers"] = n if n == 27 else n + 1
    return inline
