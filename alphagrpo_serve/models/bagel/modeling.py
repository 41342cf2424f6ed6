"""BAGEL's modules, named exactly like the official ema.safetensors keys.

Model-specific code, written for this project from the official BAGEL release
(ByteDance-Seed/Bagel, modeling/bagel/*.py). What changed from upstream:
- one forward for training and inference (padded batch + boolean attention mask + optional KV
  cache, in alphagrpo_serve/models/bagel/core.py) instead of flash-attention varlen / flex-attention
  packing, so the same function samples and recomputes;
- the Mixture-of-Transformers routing is a per-token expert flag (`Routing`), not a 'und'/'gen' mode;
- transformers' Qwen2RMSNorm, Qwen2MLP, Qwen2RotaryEmbedding and SigLIP encoder are reused; the
  SigLIP embeddings are ours (linear patch embedding, position ids on BAGEL's 2D grid);
- the autoencoder is diffusers' AutoencoderKL (vae.py), not a module of this tree.

Key layout (BAGEL-7B-MoT): language_model.model.{embed_tokens, layers.N.*, norm, norm_moe_gen},
language_model.lm_head, vit_model.vision_model.{embeddings, encoder.layers.N, post_layernorm},
connector.{fc1, fc2}, vit_pos_embed.pos_embed, time_embedder.mlp.{0, 2}, vae2llm, llm2vae,
latent_pos_embed.pos_embed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from .config import BagelConfig


class Routing:
    """Which flattened tokens take the generation expert (VAE latent tokens); all others (text,
    ViT, image start/end markers) take the understanding expert."""

    def __init__(self, gen: torch.Tensor):
        flat = gen.reshape(-1)
        self.n = flat.numel()
        n_gen = int(flat.sum())
        self.all_und = n_gen == 0
        self.all_gen = n_gen == self.n
        self.und_idx = self.gen_idx = None
        if not (self.all_und or self.all_gen):
            self.und_idx = torch.nonzero(~flat).squeeze(1)
            self.gen_idx = torch.nonzero(flat).squeeze(1)

    def apply(self, x: torch.Tensor, f_und: Callable, f_gen: Callable) -> torch.Tensor:
        """x [..., D] with prod(...) == n -> f_und or f_gen per token, same leading shape."""
        if self.all_und:
            return f_und(x)
        if self.all_gen:
            return f_gen(x)
        lead = x.shape[:-1]
        flat = x.reshape(self.n, x.shape[-1])
        y_und = f_und(flat.index_select(0, self.und_idx))
        y_gen = f_gen(flat.index_select(0, self.gen_idx))
        out = y_und.new_empty(self.n, y_und.shape[-1])
        out = out.index_copy(0, self.und_idx, y_und).index_copy(0, self.gen_idx, y_gen)
        return out.reshape(*lead, out.shape[-1])


class MoTAttention(nn.Module):
    """Qwen2 attention with two sets of projections and q/k RMSNorms (understanding, `*_moe_gen`)."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        c = cfg.llm
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(c.hidden_size, q_out, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(c.hidden_size, kv_out, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(c.hidden_size, kv_out, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_out, c.hidden_size, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=c.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=c.rms_norm_eps))

    def qkv(self, x: torch.Tensor, routing: Routing):
        """x [B, T, D] (already input-normed) -> q [B, H, T, Dh], k, v [B, Hkv, T, Dh] before RoPE."""
        B, T, _ = x.shape

        def und(h):
            return self._qkv_one(h, self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm)

        def gen(h):
            return self._qkv_one(
                h,
                self.q_proj_moe_gen,
                self.k_proj_moe_gen,
                self.v_proj_moe_gen,
                self.q_norm_moe_gen,
                self.k_norm_moe_gen,
            )

        packed = routing.apply(x, und, gen)  # [B, T, (H + 2 Hkv) * Dh]
        q_w, kv_w = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = packed.split([q_w, kv_w, kv_w], dim=-1)
        q = q.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _qkv_one(self, h, q_proj, k_proj, v_proj, q_norm, k_norm):
        """h [..., D] -> [..., (H + 2 Hkv) * Dh]: projections, q/k RMSNorm per head."""
        lead = h.shape[:-1]
        q = q_norm(q_proj(h).reshape(*lead, self.num_heads, self.head_dim)).reshape(*lead, -1)
        k = k_norm(k_proj(h).reshape(*lead, self.num_kv_heads, self.head_dim)).reshape(*lead, -1)
        return torch.cat([q, k, v_proj(h)], dim=-1)

    def out(self, attn: torch.Tensor, routing: Routing) -> torch.Tensor:
        """attn [B, T, H * Dh] -> [B, T, D]."""
        return routing.apply(attn, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        c = cfg.llm
        self.self_attn = MoTAttention(cfg)
        self.mlp = Qwen2MLP(c)
        self.mlp_moe_gen = Qwen2MLP(c)
        self.input_layernorm = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def input_norm(self, x, routing: Routing):
        return routing.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)

    def ffn(self, x, routing: Routing):
        """The MLP branch (post-attention norm + MLP, per expert), without the residual."""
        return routing.apply(
            x,
            lambda h: self.mlp(self.post_attention_layernorm(h)),
            lambda h: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(h)),
        )

    def forward(
        self,
        x: torch.Tensor,
        routing: Routing,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ):
        """One layer over a chunk against cached keys/values: x [B, T, D]; cos/sin the chunk's RoPE;
        mask [B, 1, T, L + T] (True = may attend); past_key/value [B, Hkv, L, Dh].
        Returns (x [B, T, D], keys [B, Hkv, L + T, Dh], values) with the chunk appended. A module call
        (not loose methods), so wrappers that hook forward (FSDP2 units) see each layer."""
        attn = self.self_attn
        B, T, _ = x.shape
        q, k, v = attn.qkv(self.input_norm(x, routing), routing)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        k_all = torch.cat([past_key, k], dim=2)
        v_all = torch.cat([past_value, v], dim=2)
        a = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, enable_gqa=attn.num_heads != attn.num_kv_heads
        )
        x = x + attn.out(a.transpose(1, 2).reshape(B, T, -1), routing)
        x = x + self.ffn(x, routing)
        return x, k_all, v_all


class MoTModel(nn.Module):
    """language_model.model: embeddings, MoT layers, final norms (`norm`, `norm_moe_gen`)."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        c = cfg.llm
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([MoTDecoderLayer(cfg) for _ in range(c.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=c)  # buffers only, not in the state dict

    def final_norm(self, x, routing: Routing):
        return routing.apply(x, self.norm, self.norm_moe_gen)


class MoTForCausalLM(nn.Module):
    """language_model: the MoT Qwen2 with its own (untied) lm_head."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.model = MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False)


class SiglipNaViTEmbeddings(nn.Module):
    """BAGEL's SigLIP embeddings: a linear patch embedding over (p, q, c)-ordered patch pixels
    ([hidden, 3 * p * p], the official layout) and a learned position embedding indexed by the
    patch's id on a vit_max_num_patch_per_side-wide grid (row * max + col)."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        v = cfg.vit
        self.patch_embedding = nn.Linear(v.num_channels * v.patch_size**2, v.hidden_size, bias=True)
        self.position_embedding = nn.Embedding((v.image_size // v.patch_size) ** 2, v.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipNaViTTransformer(nn.Module):
    """vit_model.vision_model: embeddings, transformers' SigLIP encoder, post_layernorm (no head)."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.embeddings = SiglipNaViTEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg.vit)
        self.post_layernorm = nn.LayerNorm(cfg.vit.hidden_size, eps=cfg.vit.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, key_mask: Optional[torch.Tensor]):
        """patches [n, T, 3 p p], position_ids [n, T], key_mask [n, T] bool (None: all valid)
        -> [n, T, vit_hidden]; attention stays within each image."""
        h = self.embeddings(patches, position_ids)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        h = self.encoder(inputs_embeds=h, attention_mask=mask).last_hidden_state
        return self.post_layernorm(h)


class SiglipNaViT(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.vision_model = SiglipNaViTTransformer(cfg)


class MLPConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """BAGEL's (DiT/MAE) 2D sin-cos table [grid * grid, dim]: row r * grid + c; the first half of
    the channels encodes the column (the meshgrid puts w first), the second half the row; each half
    is [sin, cos] over geometric frequencies 1 / 10000^(2i / (dim / 2))."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ww, hh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, ww), one_d(dim // 2, hh)], axis=1)


class PositionEmbedding(nn.Module):
    """A frozen table `pos_embed` [grid^2, hidden] (the checkpoint stores BAGEL's 2D sin-cos)."""

    def __init__(self, grid: int, hidden: int):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, hidden), requires_grad=False)

    def forward(self, position_ids):
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: 256 sinusoidal features of t (t in [0, 1], not scaled), [cos, sin]
    order, then Linear-SiLU-Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class BagelModel(nn.Module):
    """The modules of ema.safetensors. `state_dict()` keys are the official names. The autoencoder
    (ae.safetensors) is a separate object (vae.FluxVAE)."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.language_model = MoTForCausalLM(cfg)
        self.vit_model = SiglipNaViT(cfg)
        self.connector = MLPConnector(cfg.vit.hidden_size, h, cfg.connector_act)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, h)
        self.time_embedder = TimestepEmbedder(h)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, h)
        self.llm2vae = nn.Linear(h, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, h)

    def reset_rotary(self, device) -> None:
        """(Re)build the RoPE buffers (not in the state dict) on `device` after a meta-device build."""
        with torch.device(device):
            self.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config=self.config.llm)

    def init_random(self, generator: Optional[torch.Generator] = None, std_scale: float = 1.0) -> None:
        """Random weights for tests: N(0, std_scale / sqrt(fan_in)) matrices, small biases,
        norms near 1, experts drawn independently; the position tables get BAGEL's sin-cos."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("pos_embed"):
                    grid = int(round(math.sqrt(p.shape[0])))
                    p.copy_(torch.from_numpy(sincos_2d(p.shape[1], grid)).to(p.dtype))
                elif p.ndim == 1 and ("norm" in name):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
                elif p.ndim == 1:
                    p.copy_(0.02 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * std_scale / math.sqrt(p.shape[-1]))
