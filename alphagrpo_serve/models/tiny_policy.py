"""TinyPolicy: the Policy interface over TinyUMM.

Inference reuses the attention cache of the text context: text never attends to the image after
it, so the context runs once per sample (and once for the unconditional CFG branch) and each
denoising step runs only the image patches against the cached keys and values. Training-time
recomputes (token_logps, step_velocities) run the full sequence in one pass; a test checks both
paths agree.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..sampling.sampler import SamplingConfig, sample_images
from .base import Policy, Sample, TextSample
from .layout import collate, to_uint8
from .tiny_umm import KIND_NOISY, KIND_TEXT, TinyUMM, TinyUMMConfig, attention_mask, patchify, timestep_embedding
from .tokenizer import Tokenizer

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny_umm.safetensors")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T; A, B are the only trainable parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * (1.0 / rank))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


class TinyPolicy(Policy):
    def __init__(self, model: TinyUMM, tokenizer: Optional[Tokenizer] = None, version: int = 0):
        self.model = model.eval()
        self.tok = tokenizer or Tokenizer()
        self.version = version
        if len(self.tok) != model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tok)} tokens but the model was built for {model.cfg.vocab_size}")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Optional[str] = None) -> "TinyPolicy":
        """From a safetensors file written by `alphagrpo pretrain` (default: the shipped weights)."""
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        path = path or DEFAULT_WEIGHTS
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tiny UMM weights at {path}; run `alphagrpo pretrain` first")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} has no tiny UMM config in its metadata")
        model = TinyUMM(TinyUMMConfig(**json.loads(meta["config"])))
        model.load_state_dict(load_file(path))
        return cls(model)

    def tokenize(self, text: str) -> List[int]:
        return self.tok.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    # ---- layouts ------------------------------------------------------------------------------
    def prefix(self, prompt: str, think: bool, image: Optional[np.ndarray] = None) -> list:
        """Segments up to where the policy starts writing (think / reflect) or drawing (plain)."""
        t = self.tok
        head = [t.bos_id, t.user_id] + t.encode(prompt)
        if image is not None:
            return [("text", head + [t.img_id], False), ("image", image),
                    ("text", [t.img_end_id, t.assistant_id, t.think_id], False)]
        return [("text", head + [t.assistant_id] + ([t.think_id] if think else [t.img_id]), False)]

    def uncond_prefix(self) -> list:
        t = self.tok
        return [("text", [t.bos_id, t.user_id, t.assistant_id, t.img_id], False)]

    def with_text(self, prefix: list, ids: Sequence[int]) -> list:
        """prefix + the written text (closed with </think> if it was cut) + <img>: the image context."""
        t = self.tok
        ids = list(ids)
        if not ids or ids[-1] != t.think_end_id:
            ids = ids + [t.think_end_id]
        return prefix + [("text", ids + [t.img_id], False)]

    def _collate(self, segs, left_pad=True):
        c = self.model.cfg
        return collate(segs, self.tok.pad_id, c.patch, c.canvas, left_pad=left_pad)

    @staticmethod
    def _context_key(segs) -> tuple:
        return tuple((seg[0], tuple(seg[1])) if seg[0] == "text" else (seg[0], np.asarray(seg[1]).tobytes())
                     for seg in segs)

    def _encode(self, segs):
        """Runs the contexts (left-padded); returns (hidden, past, key_valid, next_position).
        Identical contexts (the G samples of one prompt) run once and are shared."""
        slot: Dict[tuple, int] = {}
        index = [slot.setdefault(self._context_key(sg), len(slot)) for sg in segs]
        unique = [None] * len(slot)
        for i, sg in zip(index, segs):
            unique[i] = sg
        b = self._collate(unique)
        x = self.model.embed(b.tokens, b.kinds, b.positions, b.clean)
        h, past = self.model.run(x, attention_mask(b.blocks, b.valid))
        valid, pos = b.valid, b.positions[:, -1] + 1
        if len(unique) < len(segs):
            idx = torch.tensor(index)
            h, valid, pos = h[idx], valid[idx], pos[idx]
            past = [(k[idx], v[idx]) for k, v in past]
        return h, past, valid, pos

    # ---- text sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample_text(self, prefixes: Sequence[list], generators: Sequence[torch.Generator], max_new: int,
                    temperature: float = 1.0, top_p: float = 1.0) -> List[TextSample]:
        """Samples until </think> or <eos> per row; per-token log-probs of log_softmax(logits / temperature)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        m, t = self.model, self.tok
        h, past, key_valid, pos = self._encode(prefixes)
        B = len(prefixes)
        logits = m.text_logits(h[:, -1])
        out = [TextSample([], []) for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        for _ in range(max_new):
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            nxt = torch.empty(B, dtype=torch.long)
            for i in range(B):
                if done[i]:
                    nxt[i] = t.pad_id
                    continue
                p = logp[i].exp()
                if top_p < 1.0:
                    sp, si = torch.sort(p, descending=True)
                    keep = (sp.cumsum(0) - sp) < top_p
                    p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
                tok = int(torch.multinomial(p, 1, generator=generators[i]))
                nxt[i] = tok
                out[i].ids.append(tok)
                out[i].logps.append(float(logp[i, tok]))
                if tok in (t.think_end_id, t.eos_id):
                    done[i] = True
            if bool(done.all()):
                break
            kinds = torch.full((B, 1), KIND_TEXT, dtype=torch.long)
            x = m.embed(nxt[:, None], kinds, pos[:, None])
            new_valid = (~done | (nxt != t.pad_id))[:, None]
            key_valid = torch.cat([key_valid, new_valid], dim=1)
            hh, past = m.run(x, key_valid[:, None, None, :], past)
            logits = m.text_logits(hh[:, -1])
            pos = pos + 1
        for s in out:
            s.text = t.decode(s.ids)
        return out

    # ---- image sampling --------------------------------------------------------------------------
    def _velocity_cached(self, past, key_valid, pos, x_t, sigma):
        m = self.model
        cfg = m.cfg
        B = x_t.shape[0]
        n = cfg.n_patches
        # exactly TinyUMM.embed's image slots: patch + 2D position + timestep embeddings
        e = m.patch_in(patchify(x_t, cfg.patch)) + m.patch_pos + m.t_mlp(timestep_embedding(sigma))[:, None, :]
        mask = torch.cat([key_valid, torch.ones(B, n, dtype=torch.bool)], dim=1)[:, None, None, :]
        h, _ = m.run(e, mask, past)
        return m.velocity(h, x_t)

    @torch.no_grad()
    def _draw(self, contexts: Sequence[list], seeds: Sequence[int], sampling: SamplingConfig):
        m = self.model
        B = len(contexts)
        _, past, kv, pos = self._encode(contexts)
        if sampling.cfg_scale != 1.0:
            _, upast, ukv, upos = self._encode([self.uncond_prefix()])
            upast = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in upast]
            ukv, upos = ukv.expand(B, -1), upos.expand(B)

        def velocity(x, sigma, with_uncond):
            vc = self._velocity_cached(past, kv, pos, x, sigma)
            vu = self._velocity_cached(upast, ukv, upos, x, sigma) if with_uncond else None
            return vc, vu

        gens = [torch.Generator().manual_seed(2 * int(s)) for s in seeds]
        c = m.cfg
        noise0 = torch.stack([torch.randn(3, c.canvas, c.canvas, generator=g) for g in gens])
        return sample_images(velocity, noise0, sampling, gens)

    def generate(self, prompts, seeds, sampling: SamplingConfig, think=False, temperature=1.0, top_p=1.0,
                 max_thought_tokens=40) -> List[Sample]:
        prefixes = [self.prefix(p, think) for p in prompts]
        return self._generate(prompts, prefixes, seeds, sampling, think, temperature, top_p, max_thought_tokens)

    def reflect(self, prompts, images, seeds, sampling: SamplingConfig, temperature=1.0, top_p=1.0,
                max_thought_tokens=48) -> List[Sample]:
        from ..shapes.detect import check_images

        imgs = check_images(np.stack([np.asarray(i) for i in images]), "images")
        if imgs.shape[1] != self.model.cfg.canvas:
            raise ValueError(f"images must be {self.model.cfg.canvas}x{self.model.cfg.canvas}, got {imgs.shape[1]}")
        prefixes = [self.prefix(p, True, im) for p, im in zip(prompts, imgs)]
        return self._generate(prompts, prefixes, seeds, sampling, True, temperature, top_p, max_thought_tokens)

    def _generate(self, prompts, prefixes, seeds, sampling, think, temperature, top_p, max_new) -> List[Sample]:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if think:
            tgens = [torch.Generator().manual_seed(2 * int(s) + 1) for s in seeds]
            texts = self.sample_text(prefixes, tgens, max_new, temperature, top_p)
            contexts = [self.with_text(p, ts.ids) for p, ts in zip(prefixes, texts)]
        else:
            texts = [TextSample([], []) for _ in prompts]
            contexts = prefixes
        x0, trajs = self._draw(contexts, seeds, sampling)
        images = to_uint8(x0)
        settings = dict(sampling.to_dict(), think=think, temperature=temperature, top_p=top_p)
        return [Sample(p, images[i], texts[i].text, texts[i], trajs[i], int(seeds[i]), settings, self.version)
                for i, p in enumerate(prompts)]

    # ---- training-time recompute ------------------------------------------------------------------
    def _full_segments(self, s: Sample, reflect_image=None) -> list:
        think = bool(s.text.ids) or s.settings.get("think", False)
        prefix = self.prefix(s.prompt, think, reflect_image)
        return self.with_text(prefix, s.text.ids) if think else prefix

    def token_logits(self, samples, reflect_images=None):
        """Teacher-forced logits at the positions that predict each sample's recorded text tokens.

        Returns (logits [B, T, V] float32, tokens [B, T] int64, mask [B, T] bool), right-padded; a
        sample without text has an all-False mask row. Differentiable in the model's parameters."""
        m = self.model
        segs, lengths = [], []
        for i, s in enumerate(samples):
            prefix = self.prefix(s.prompt, True, None if reflect_images is None else reflect_images[i])
            segs.append(prefix + [("text", list(s.text.ids), True)])
            lengths.append(len(s.text.ids))
        B, T = len(samples), max(lengths, default=0)
        b = self._collate(segs, left_pad=False)
        x = m.embed(b.tokens, b.kinds, b.positions, b.clean)
        h, _ = m.run(x, attention_mask(b.blocks, b.valid))
        labels = b.labels[:, 1:]
        logits = torch.zeros(B, T, m.cfg.vocab_size)
        tokens = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        rows, cols = (labels >= 0).nonzero(as_tuple=True)  # row-major: each row's label positions in order
        if len(rows):
            within = torch.cat([torch.arange(n) for n in lengths])
            logits = logits.index_put((rows, within), m.text_logits(h[:, :-1][rows, cols]).float())
            tokens[rows, within] = labels[rows, cols]
            mask[rows, within] = True
        return logits, tokens, mask

    def token_logps(self, samples, reflect_images=None, temperature: float = 1.0) -> torch.Tensor:
        """Teacher-forced log_softmax(logits / temperature) at each sample's recorded tokens, [B, T]."""
        logits, tokens, mask = self.token_logits(samples, reflect_images)
        logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None])[..., 0]
        return logp * mask

    def step_velocities(self, samples, k, with_uncond, reflect_images=None):
        """(v_cond, v_uncond) [B, 3, H, W] at window step k, in one full forward pass per branch."""
        m = self.model
        x_t = torch.stack([s.trajectory.latents[k] for s in samples])
        sigma = torch.stack([s.trajectory.sigmas[k] for s in samples]).float()

        def run(segs):
            b = self._collate([sg + [("gen", None)] for sg in segs], left_pad=False)
            x = m.embed(b.tokens, b.kinds, b.positions, b.clean, patchify(x_t, m.cfg.patch), sigma)
            h, _ = m.run(x, attention_mask(b.blocks, b.valid))
            return m.velocity(h[b.kinds == KIND_NOISY].view(len(segs), m.cfg.n_patches, m.cfg.width), x_t)

        segs = [self._full_segments(s, None if reflect_images is None else reflect_images[i]) for i, s in enumerate(samples)]
        v_cond = run(segs)
        v_uncond = run([self.uncond_prefix() for _ in samples]) if with_uncond else None
        return v_cond, v_uncond

    # ---- weights ------------------------------------------------------------------------------------
    def enable_lora(self, rank: int = 8, alpha: float = 16.0) -> None:
        """Wraps every attention and MLP projection with a LoRA adapter (base weights frozen)."""
        if not rank >= 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        for blk in self.model.blocks:
            blk.qkv = LoRALinear(blk.qkv, rank, alpha)
            blk.proj = LoRALinear(blk.proj, rank, alpha)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for n, p in self.model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)

    @property
    def lora_enabled(self) -> bool:
        return any(isinstance(blk.qkv, LoRALinear) for blk in self.model.blocks)

    def _named_tensors(self) -> Dict[str, torch.Tensor]:
        """The state dict under canonical names: a LoRA-wrapped layer's base weight keeps the name it
        has without LoRA, so full weights travel the same way whether or not either side uses LoRA."""
        return {k.replace(".base.", "."): v for k, v in self.model.state_dict().items()}

    def export_weights(self, lora: bool = False) -> Dict[str, torch.Tensor]:
        """Full weights (lora=False) or the LoRA adapters with their scale folded into lora_B, so a
        receiver applies them at scale 1 whatever alpha the sender trains with."""
        out = {}
        for k, v in self._named_tensors().items():
            if ("lora_" in k) != lora:
                continue
            v = v.detach().clone()
            if k.endswith("lora_B"):
                v = v * self.model.get_submodule(k.rsplit(".", 1)[0]).scale
            out[k] = v
        return out

    def merged_weights(self) -> Dict[str, torch.Tensor]:
        """Full weights with every LoRA adapter merged in (W + scale * B A): a plain TinyUMM state dict."""
        out = {k: v for k, v in self.export_weights(lora=False).items()}
        for n, mod in self.model.named_modules():
            if isinstance(mod, LoRALinear):
                w = f"{n}.weight"
                out[w] = (out[w] + mod.scale * (mod.lora_B @ mod.lora_A)).detach()
        return out

    def import_weights(self, tensors: Dict[str, torch.Tensor], lora: bool = False) -> None:
        current = self._named_tensors()
        for name, t in tensors.items():
            if name not in current:
                raise KeyError(f"unknown tensor name {name!r}")
            if lora != ("lora_" in name):
                raise ValueError(f"{name!r} is {'not ' if lora else ''}a LoRA tensor")
            if tuple(t.shape) != tuple(current[name].shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} != expected {tuple(current[name].shape)}")
            if t.dtype != current[name].dtype:
                raise TypeError(f"{name}: dtype {t.dtype} != expected {current[name].dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: non-finite values")
        with torch.no_grad():  # all checks passed: apply every tensor
            for name, t in tensors.items():
                current[name].copy_(t)
            if lora:  # received adapters carry their scale in lora_B
                for blk in self.model.blocks:
                    blk.qkv.scale = blk.proj.scale = 1.0
        self.version += 1
