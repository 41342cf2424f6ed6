"""TinyUMM: one small transformer over text tokens and image patches, BAGEL in miniature.

Sequence layout (one row of a batch): text tokens, clean image patches (an input image for
reflection or captioning) and, last, noisy image patches to denoise. Attention: causal over text;
the patches of one image attend to everything before the image and to each other. This is one
rule: position i may attend to position j when block[j] <= block[i], where a text token's block
is its position and an image's block is the position of its last patch.

Images are 32x32 RGB in [-1, 1], cut into 4x4 patches (64 tokens). Noisy patches carry a
timestep embedding; the velocity head predicts per patch and a small convolution over the
reassembled image smooths patch seams. Flow matching: x_t = (1 - t) x0 + t eps, v = eps - x0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

KIND_TEXT, KIND_CLEAN, KIND_NOISY = 0, 1, 2


@dataclass
class TinyUMMConfig:
    vocab_size: int = 96
    width: int = 160
    layers: int = 5
    heads: int = 5
    mlp_ratio: int = 4
    patch: int = 4
    canvas: int = 32
    max_positions: int = 256
    decoder: str = "linear"  # linear: per-patch head + 3x3 conv; conv: patches decoded jointly by convolutions

    @property
    def n_patches(self) -> int:
        return (self.canvas // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * 3

    def to_dict(self):
        return asdict(self)


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, (H/p)(W/p), 3 p p]."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x: torch.Tensor, p: int, canvas: int) -> torch.Tensor:
    """[B, N, 3 p p] -> [B, 3, H, W]."""
    B = x.shape[0]
    g = canvas // p
    return x.reshape(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, canvas, canvas)


def timestep_embedding(t: torch.Tensor, dim: int = 64) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: TinyUMMConfig):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(w)
        self.qkv = nn.Linear(w, 3 * w)
        self.proj = nn.Linear(w, w)
        self.ln2 = nn.LayerNorm(w)
        self.mlp = nn.Sequential(
            nn.Linear(w, cfg.mlp_ratio * w), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_ratio * w, w)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """x [B, L, W]; mask [B, 1, L, L_past + L] (True = may attend); past (k, v) [B, H, L_past, d]."""
        B, L, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, W))
        x = x + self.mlp(self.ln2(x))
        return x, (k, v)


class TinyUMM(nn.Module):
    def __init__(self, cfg: TinyUMMConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.tok_emb = nn.Embedding(cfg.vocab_size, w)
        self.pos_emb = nn.Embedding(cfg.max_positions, w)
        self.kind_emb = nn.Embedding(3, w)
        self.patch_in = nn.Linear(cfg.patch_dim, w)
        self.patch_pos = nn.Parameter(torch.randn(cfg.n_patches, w) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(64, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.ln_f = nn.LayerNorm(w)
        if cfg.decoder not in ("linear", "conv"):
            raise ValueError(f"decoder must be 'linear' or 'conv', got {cfg.decoder!r}")
        self.v_head = nn.Linear(w, cfg.patch_dim)
        self.refine = nn.Sequential(nn.Conv2d(6, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 3, 3, padding=1))
        if cfg.decoder == "conv":
            g = cfg.canvas // cfg.patch
            self.grid = g
            self.decode = nn.Sequential(
                nn.Conv2d(w, 64, 3, padding=1),
                nn.SiLU(),
                nn.ConvTranspose2d(64, 32, cfg.patch, stride=cfg.patch),
                nn.SiLU(),
            )
            self.refine = nn.Sequential(
                nn.Conv2d(32 + 3 + 3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 3, 3, padding=1)
            )
        nn.init.zeros_(self.refine[2].weight)
        nn.init.zeros_(self.refine[2].bias)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ---- embedding of a layout ----------------------------------------------------------------
    def embed(
        self,
        tokens: torch.Tensor,
        kinds: torch.Tensor,
        positions: torch.Tensor,
        clean: Optional[torch.Tensor] = None,
        noisy: Optional[torch.Tensor] = None,
        t: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """tokens, kinds, positions [B, L]; clean [B, n_patches, patch_dim] for the rows' KIND_CLEAN
        slots (one image per row that has them); noisy likewise for KIND_NOISY slots, t [B] their times.
        Text slots get token + position + kind embeddings; image slots are replaced by patch + 2D patch
        position (+ timestep for noisy patches) embeddings."""
        x = self.tok_emb(tokens) + self.pos_emb(positions) + self.kind_emb(kinds.clamp(min=0))
        for kind, patches in ((KIND_CLEAN, clean), (KIND_NOISY, noisy)):
            sel = kinds == kind
            if patches is None or not bool(sel.any()):
                continue
            rows = sel.any(dim=1)
            e = self.patch_in(patches[rows].to(self.patch_in.weight.dtype)) + self.patch_pos
            if kind == KIND_NOISY:
                e = e + self.t_mlp(timestep_embedding(t[rows]).to(e.dtype))[:, None, :]
            x = x.masked_scatter(sel[..., None], e.to(x.dtype))
        return x

    def run(self, x: torch.Tensor, mask: torch.Tensor, past: Optional[List] = None):
        """The transformer over embeddings x [B, L, W] with attention mask [B, 1, L, L_total]."""
        new_past = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, mask, None if past is None else past[i])
            new_past.append(kv)
        return self.ln_f(x), new_past

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.tok_emb.weight.t()

    def velocity(self, h_patches: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """h_patches [B, n_patches, W] hidden states of the noisy patches; x_t [B, 3, H, W] -> v [B, 3, H, W]
        (in the model's dtype)."""
        x_t = x_t.to(h_patches.dtype)
        coarse = unpatchify(self.v_head(h_patches), self.cfg.patch, self.cfg.canvas)
        if self.cfg.decoder == "linear":
            return coarse + self.refine(torch.cat([coarse, x_t], dim=1))
        B, n, W = h_patches.shape
        feats = self.decode(h_patches.transpose(1, 2).reshape(B, W, self.grid, self.grid))
        return coarse + self.refine(torch.cat([feats, coarse, x_t], dim=1))


def attention_mask(
    blocks: torch.Tensor,
    valid: torch.Tensor,
    key_blocks: Optional[torch.Tensor] = None,
    key_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[B, 1, Lq, Lk] bool: query i may attend key j when key_block[j] <= block[i] and j is valid."""
    kb = blocks if key_blocks is None else key_blocks
    kv = valid if key_valid is None else key_valid
    return ((kb[:, None, :] <= blocks[:, :, None]) & kv[:, None, :])[:, None]
