"""TinyPolicy: the Policy contract (models/base.py) over TinyUMM, the embedded tiny UMM.

Inference reuses the attention cache of the text context: text never attends to the image after
it, so the context runs once per distinct context (the G samples of a prompt share it, and the
unconditional CFG branch runs once per batch) and each denoising step runs only the image patches
against the cached keys and values. Training-time recomputes (token_hidden, guided_velocity) run
the full sequence in one pass; a test checks both paths agree.

Guidance rule: one unconditional branch ("text"), v = v_u + cfg_scale (v_c - v_u), on the steps
whose sigma lies in cfg_interval (both ends included), when cfg_scale != 1; no renormalisation.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..sampling.sampler import SamplingConfig, TextConfig, sample_images
from .base import CanvasRule, Capabilities, ModulePolicy, PolicyInfo, Sample, TextSample, seed_streams
from .layout import Batch, collate, to_uint8
from .tiny_umm import KIND_NOISY, KIND_TEXT, TinyUMM, TinyUMMConfig, attention_mask, patchify, timestep_embedding
from .tokenizer import Tokenizer

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny_umm.safetensors")
LORA_TARGETS = ("qkv", "proj")  # the attention projections of every block


class LoRALinear(nn.Module):
    """y = base(x) + scale * x A^T B^T; A, B are the only trainable parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=w.device, dtype=w.dtype) * (1.0 / rank))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def check_uint8_images(images: Sequence[np.ndarray], side: int, name: str = "images") -> np.ndarray:
    """uint8 [N, side, side, 3] or ValueError naming what is wrong."""
    arr = np.stack([np.asarray(i) for i in images]) if len(images) else np.zeros((0, side, side, 3), np.uint8)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (side, side, 3):
        raise ValueError(f"{name} must be uint8 [{side}, {side}, 3] each, got {arr.dtype} {list(arr.shape[1:])}")
    return arr


class TinyPolicy(ModulePolicy):
    name = "tiny"

    def __init__(self, model: TinyUMM, tokenizer: Optional[Tokenizer] = None, version: int = 0):
        self.model = model.eval()
        self.tok = tokenizer or Tokenizer()
        self.version = version
        if len(self.tok) != model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tok)} tokens but the model was built for {model.cfg.vocab_size}")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Optional[str] = None, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> "TinyPolicy":
        """From a safetensors file written by `alphagrpo pretrain` or save() (default: the shipped
        weights), onto device in dtype (default float32)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = path or DEFAULT_WEIGHTS
        if os.path.isdir(path):
            path = os.path.join(path, "tiny_umm.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tiny UMM weights at {path}; run `alphagrpo pretrain` first")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} has no tiny UMM config in its metadata")
        model = TinyUMM(TinyUMMConfig(**json.loads(meta["config"])))
        model.load_state_dict(load_file(path))
        return cls(model.to(device=torch.device(device), dtype=dtype or torch.float32))

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_emb.weight.dtype

    @property
    def info(self) -> PolicyInfo:
        c, t = self.model.cfg, self.tok
        drawing = SamplingConfig(
            steps=20,
            mode="ode",
            noise_level=0.7,
            sde_window=(0, 4),
            cfg_scale=3.0,
            cfg_interval=(0.0, 1.0),
            shift=2.0,
            width=c.canvas,
            height=c.canvas,
        )
        return PolicyInfo(
            name=self.name,
            parameters=sum(p.numel() for p in self.model.parameters()),
            dtype=self.dtype,
            device=self.device,
            vocab_size=c.vocab_size,
            special_tokens={
                "bos": t.bos_id,
                "eos": t.eos_id,
                "pad": t.pad_id,
                "think": t.think_id,
                "think_end": t.think_end_id,
                "img": t.img_id,
            },
            capabilities=Capabilities(
                think=True,
                reflect=True,
                understanding=True,
                guidance_branches=("text",),
                lora=True,
                canvas=CanvasRule((c.canvas, c.canvas), c.canvas, c.canvas, c.canvas),
            ),
            generate_defaults=drawing,
            reflect_defaults=drawing,  # a refinement is drawn like a first image
            text_defaults=TextConfig(temperature=1.0, top_p=1.0, max_tokens=40),
            prompt_domain="shapes",
        )

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
            return [
                ("text", head + [t.img_id], False),
                ("image", image),
                ("text", [t.img_end_id, t.assistant_id, t.think_id], False),
            ]
        return [("text", head + [t.assistant_id] + ([t.think_id] if think else [t.img_id]), False)]

    def check_context(self, prompts, text: TextConfig, think: bool, reflect: bool = False) -> None:
        """Every position of a context must fit the position table (max_positions): the prompt's
        tokens, the image to refine, and the thought or critique budget (max_tokens + </think> <img>)."""
        c = self.model.cfg
        n_patches = (c.canvas // c.patch) ** 2
        budget = text.max_tokens + 2 if (think or reflect) else 0
        for i, p in enumerate(prompts):
            image = np.zeros((c.canvas, c.canvas, 3), np.uint8) if reflect else None
            segs = self.prefix(p, think or reflect, image)
            used = sum(len(seg[1]) if seg[0] == "text" else n_patches for seg in segs)
            if used + budget > c.max_positions:
                raise ValueError(
                    f"prompts[{i}] is too long for the tiny UMM: {used} context positions + {budget} for "
                    f"the thought exceed its {c.max_positions} (shorten it or lower max_thought_tokens)"
                )

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

    def _collate(self, segs, left_pad=True) -> Batch:
        c = self.model.cfg
        b = collate(segs, self.tok.pad_id, c.patch, c.canvas, left_pad=left_pad)
        dev = self.device
        return Batch(*(getattr(b, f).to(dev) for f in Batch.__dataclass_fields__))

    @staticmethod
    def _context_key(segs) -> tuple:
        return tuple(
            (seg[0], tuple(seg[1])) if seg[0] == "text" else (seg[0], np.asarray(seg[1]).tobytes()) for seg in segs
        )

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
            idx = torch.tensor(index, device=self.device)
            h, valid, pos = h[idx], valid[idx], pos[idx]
            past = [(k[idx], v[idx]) for k, v in past]
        return h, past, valid, pos

    # ---- text sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample_text(
        self, prefixes: Sequence[list], generators: Sequence[torch.Generator], text: TextConfig
    ) -> List[TextSample]:
        """Samples until </think> or <eos> per row. Log-probs of log_softmax(logits / T) with T =
        text.logp_temperature; temperature 0 picks the most likely token."""
        m, t = self.model, self.tok
        h, past, key_valid, pos = self._encode(prefixes)
        B, dev = len(prefixes), self.device
        logits = m.text_logits(h[:, -1])
        out = [TextSample([], []) for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(text.max_tokens):
            logp = torch.log_softmax(logits.float() / text.logp_temperature, dim=-1)
            nxt = torch.full((B,), t.pad_id, dtype=torch.long, device=dev)
            for i in range(B):
                if done[i]:
                    continue
                tok = text.pick(logp[i], generators[i])
                nxt[i] = tok
                out[i].ids.append(tok)
                out[i].logps.append(float(logp[i, tok]))
                if tok in (t.think_end_id, t.eos_id):
                    done[i] = True
            if bool(done.all()):
                break
            kinds = torch.full((B, 1), KIND_TEXT, dtype=torch.long, device=dev)
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
        dt = self.dtype
        # exactly TinyUMM.embed's image slots: patch + 2D position + timestep embeddings
        e = (
            m.patch_in(patchify(x_t, cfg.patch).to(dt))
            + m.patch_pos
            + m.t_mlp(timestep_embedding(sigma).to(dt))[:, None, :]
        )
        mask = torch.cat([key_valid, torch.ones(B, n, dtype=torch.bool, device=x_t.device)], dim=1)[:, None, None, :]
        h, _ = m.run(e, mask, past)
        return m.velocity(h, x_t).float()

    @staticmethod
    def _guides(sampling: SamplingConfig, sigma: float) -> bool:
        """The tiny UMM's guidance rule (module docstring)."""
        return sampling.cfg_scale != 1.0 and sampling.guides_at(sigma)

    @torch.no_grad()
    def _draw(self, contexts: Sequence[list], seeds: Sequence[int], sampling: SamplingConfig):
        m = self.model
        B, dev = len(contexts), self.device
        _, past, kv, pos = self._encode(contexts)
        if sampling.cfg_scale != 1.0:
            _, upast, ukv, upos = self._encode([self.uncond_prefix()])
            upast = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in upast]
            ukv, upos = ukv.expand(B, -1), upos.expand(B)

        def velocity(x, sigma):
            vc = self._velocity_cached(past, kv, pos, x, sigma)
            if not self._guides(sampling, float(sigma[0])):
                return vc, None, 1.0
            return vc, self._velocity_cached(upast, ukv, upos, x, sigma), sampling.cfg_scale

        c = m.cfg
        # the starting noise comes from a CPU generator (the same images for a seed on any device);
        # the SDE noise from one generator per sample on the policy's device
        image_seeds = [seed_streams(s, 2)[0] for s in seeds]  # stream 0: image noise; 1: text
        noise0 = torch.stack(
            [torch.randn(3, c.canvas, c.canvas, generator=torch.Generator().manual_seed(s)) for s in image_seeds]
        ).to(dev)
        gens = [torch.Generator(device=dev).manual_seed(s) for s in image_seeds]
        if dev.type == "cpu":  # on the CPU the SDE noise continues the starting noise's stream (as before devices)
            for g in gens:
                torch.randn(3, c.canvas, c.canvas, generator=g)
        return sample_images(velocity, noise0, sampling, gens)

    def generate(self, prompts, seeds, sampling: SamplingConfig, text: TextConfig, think: bool = False) -> List[Sample]:
        prefixes = [self.prefix(p, think) for p in prompts]
        return self._generate(prompts, prefixes, seeds, sampling, text, think, False)

    def reflect(self, prompts, images, seeds, sampling: SamplingConfig, text: TextConfig) -> List[Sample]:
        imgs = check_uint8_images(images, self.model.cfg.canvas)
        if len(imgs) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(imgs)} images")
        prefixes = [self.prefix(p, True, im) for p, im in zip(prompts, imgs)]
        return self._generate(prompts, prefixes, seeds, sampling, text, True, True)

    def _generate(self, prompts, prefixes, seeds, sampling, text, think, reflect) -> List[Sample]:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        c = self.model.cfg
        if (sampling.width or c.canvas, sampling.height or c.canvas) != (c.canvas, c.canvas):
            raise ValueError(f"the tiny UMM draws {c.canvas}x{c.canvas} only, got {sampling.width}x{sampling.height}")
        if think:
            tgens = [torch.Generator(device=self.device).manual_seed(seed_streams(s, 2)[1]) for s in seeds]
            texts = self.sample_text(prefixes, tgens, text)
            contexts = [self.with_text(p, ts.ids) for p, ts in zip(prefixes, texts)]
        else:
            texts = [TextSample([], []) for _ in prompts]
            contexts = prefixes
        x0, trajs = self._draw(contexts, seeds, sampling)
        images = to_uint8(x0)
        return [
            Sample(
                p,
                images[i],
                texts[i].text,
                texts[i],
                trajs[i].to("cpu"),
                int(seeds[i]),
                sampling,
                text,
                think=think,
                reflect=reflect,
                policy_version=self.version,
            )
            for i, p in enumerate(prompts)
        ]

    # ---- training-time recompute ------------------------------------------------------------------
    def _full_segments(self, s: Sample, reflect_image=None) -> list:
        think = bool(s.text.ids) or s.think or reflect_image is not None
        prefix = self.prefix(s.prompt, think, reflect_image)
        return self.with_text(prefix, s.text.ids) if think else prefix

    def token_hidden(self, samples, reflect_images=None):
        m = self.model
        segs, lengths = [], []
        for i, s in enumerate(samples):
            prefix = self.prefix(s.prompt, True, None if reflect_images is None else reflect_images[i])
            segs.append(prefix + [("text", list(s.text.ids), True)])
            lengths.append(len(s.text.ids))
        B, T, dev = len(samples), max(lengths, default=0), self.device
        b = self._collate(segs, left_pad=False)
        x = m.embed(b.tokens, b.kinds, b.positions, b.clean)
        h, _ = m.run(x, attention_mask(b.blocks, b.valid))
        labels = b.labels[:, 1:]
        hidden = torch.zeros(B, T, m.cfg.width, device=dev, dtype=h.dtype)
        tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
        rows, cols = (labels >= 0).nonzero(as_tuple=True)  # row-major: each row's label positions in order
        if len(rows):
            within = torch.cat([torch.arange(n, device=dev) for n in lengths])
            hidden = hidden.index_put((rows, within), h[:, :-1][rows, cols])
            tokens[rows, within] = labels[rows, cols]
            mask[rows, within] = True
        return hidden, tokens, mask

    def lm_head(self):
        return self.model.tok_emb.weight, None  # tied to the token embedding

    def _branch_velocity(self, segs, x_t, sigma):
        m = self.model
        b = self._collate([sg + [("gen", None)] for sg in segs], left_pad=False)
        x = m.embed(b.tokens, b.kinds, b.positions, b.clean, patchify(x_t, m.cfg.patch), sigma)
        h, _ = m.run(x, attention_mask(b.blocks, b.valid))
        return m.velocity(h[b.kinds == KIND_NOISY].view(len(segs), m.cfg.n_patches, m.cfg.width), x_t).float()

    def guided_velocity(self, samples, k, reflect_images=None):
        """One full forward per branch; the unconditional branch only for the samples whose recorded
        settings guide at their step-k sigma."""
        dev = self.device
        x_t = torch.stack([s.trajectory.latents[k] for s in samples]).to(dev)
        sigma = torch.stack([s.trajectory.sigmas[k] for s in samples]).float().to(dev)
        segs = [
            self._full_segments(s, None if reflect_images is None else reflect_images[i]) for i, s in enumerate(samples)
        ]
        v = self._branch_velocity(segs, x_t, sigma)
        guided = [i for i, s in enumerate(samples) if self._guides(s.sampling, float(s.trajectory.sigmas[k]))]
        if not guided:
            return v
        idx = torch.tensor(guided, device=dev)
        v_u = self._branch_velocity([self.uncond_prefix() for _ in guided], x_t[idx], sigma[idx])
        scale = torch.tensor([samples[i].sampling.cfg_scale for i in guided], device=dev).view(-1, 1, 1, 1)
        return v.index_put((idx,), v_u + scale * (v[idx] - v_u))

    # ---- weights ------------------------------------------------------------------------------------
    def enable_lora(self, rank: int = 8, alpha: float = 16.0, targets: Optional[Sequence[str]] = None) -> None:
        """Wraps the blocks' attention projections (qkv, proj) with LoRA adapters (base weights frozen)."""
        targets = tuple(targets or LORA_TARGETS)
        bad = sorted(set(targets) - set(LORA_TARGETS))
        if bad:
            raise ValueError(f"LoRA targets {bad} are not among the tiny UMM's {list(LORA_TARGETS)}")
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        if self.lora_enabled:
            raise ValueError("LoRA is already enabled")
        for blk in self.model.blocks:
            for name in targets:
                setattr(blk, name, LoRALinear(getattr(blk, name), rank, alpha))
        for p in self.model.parameters():
            p.requires_grad_(False)
        for n, p in self.model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)

    @property
    def lora_enabled(self) -> bool:
        return any(isinstance(getattr(blk, n), LoRALinear) for blk in self.model.blocks for n in LORA_TARGETS)

    def _named_tensors(self) -> Dict[str, torch.Tensor]:
        """The state dict under canonical names: a LoRA-wrapped layer's base weight keeps the name it
        has without LoRA, so full weights travel the same way whether or not either side uses LoRA."""
        return {k.replace(".base.", "."): v for k, v in self.model.state_dict().items()}

    def _lora_specs(self, rank: int) -> Dict[str, tuple]:
        out = {}
        for i, blk in enumerate(self.model.blocks):
            for n in LORA_TARGETS:
                lin = getattr(blk, n)
                lin = lin.base if isinstance(lin, LoRALinear) else lin
                out[f"blocks.{i}.{n}.lora_A"] = ((rank, lin.in_features), lin.weight.dtype)
                out[f"blocks.{i}.{n}.lora_B"] = ((lin.out_features, rank), lin.weight.dtype)
        return out

    def weight_specs(self, lora: bool = False) -> Dict[str, tuple]:
        if lora:
            if self.lora_enabled:
                return {k: (tuple(v.shape), v.dtype) for k, v in self._named_tensors().items() if "lora_" in k}
            return {}  # any rank: import_weights reads it from the adapters
        return {k: (tuple(v.shape), v.dtype) for k, v in self._named_tensors().items() if "lora_" not in k}

    def export_weights(self, lora: bool = False) -> Dict[str, torch.Tensor]:
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
        out = self.export_weights(lora=False)
        for n, mod in self.model.named_modules():
            if isinstance(mod, LoRALinear):
                w = f"{n}.weight"
                out[w] = (out[w] + mod.scale * (mod.lora_B @ mod.lora_A)).detach()
        return out

    def import_weights(self, tensors: Dict[str, torch.Tensor], lora: bool = False) -> None:
        if not tensors:
            raise ValueError("no tensors to import")
        if lora and not self.lora_enabled:
            ranks = {int(t.shape[0]) for n, t in tensors.items() if n.endswith("lora_A") and t.dim() == 2}
            if len(ranks) != 1:
                raise ValueError(f"a LoRA import needs lora_A tensors of one rank, got ranks {sorted(ranks)}")
            specs = self._lora_specs(ranks.pop())
        else:
            specs = self.weight_specs(lora)
        for name, t in tensors.items():
            if name not in specs:
                kind = "LoRA adapter" if lora else "full weight"
                raise KeyError(f"{name!r} is not a {kind} of this policy (GetModelInfo lists the names)")
            shape, dtype = specs[name]
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} != expected {tuple(shape)}")
            if t.dtype != dtype:
                raise TypeError(f"{name}: dtype {t.dtype} != expected {dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: non-finite values")
        if lora and not self.lora_enabled:  # every check passed: only now change the structure
            rank = next(iter(specs.values()))[0][0]
            self.enable_lora(rank=rank, alpha=float(rank))
        current = self._named_tensors()
        with torch.no_grad():
            if lora:  # received adapters carry their scale in lora_B; the others fold theirs in to keep their effect
                for name, mod in self.model.named_modules():
                    if isinstance(mod, LoRALinear):
                        if f"{name}.lora_B" not in tensors:
                            current[f"{name}.lora_B"].mul_(mod.scale)
                        mod.scale = 1.0
            for name, t in tensors.items():
                current[name].copy_(t)
        self.version += 1

    def save(self, path: str) -> str:
        """Merged weights as a tiny UMM safetensors file (load() reads it)."""
        from safetensors.torch import save_file

        from ..fileio import write_atomic

        if os.path.isdir(path):
            path = os.path.join(path, "tiny_umm.safetensors")
        elif not path.endswith(".safetensors"):
            path += ".safetensors"
        meta = {"config": json.dumps(self.model.cfg.to_dict()), "format": "alphagrpo-tiny-umm-v1"}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.merged_weights().items()}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path
