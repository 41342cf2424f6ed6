"""BagelPolicy: the Policy contract (models/base.py) over BAGEL-7B-MoT (or any checkpoint in its
official layout, like the tiny one tools/make_tiny_bagel.py writes).

Model-specific code, written for this project after the official release (ByteDance-Seed/Bagel:
inferencer.py, app.py, modeling/bagel/bagel.py). What changed from upstream:
- a batch of samples (several prompts, G samples each, any prompt lengths) runs as one padded batch;
  each distinct context is prefilled once and reused by every sample and denoising step;
- steps inside the SDE window go through the project's flow_sde_step kernel (per-step log-probs,
  one noise generator per sample); outside it, the official Euler update;
- the written text (plan or critique) is sampled with per-token log-probs; the refinement job is
  BAGEL's editing layout with a critique (contexts.py);
- training recomputes token log-probs and step velocities with the same functions (contexts.py,
  core.py) on the same module, so the recompute equals the record to float32 rounding.

Sampling (official generate_image): `steps` Euler updates over steps + 1 timesteps from 1 to 0,
shifted by `shift`; guidance with three contexts (full, no text, no image), text and image scales,
applied only where cfg_interval[0] < t <= cfg_interval[1], then renormalisation (guidance.py).
Latents travel as packed tokens [h * w, 64] (2x2 patches of the 16-channel VAE latent), float32.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ...sampling.sampler import SamplingConfig, TextConfig, sample_images
from ..base import (
    CanvasRule,
    Capabilities,
    ModulePolicy,
    PolicyInfo,
    Sample,
    TextSample,
    seed_streams,
    weights_fingerprint,
)
from . import lora as peft_lora
from .cache import KVCache
from .contexts import Branches, ContextBuilder, ImageSet, Job, extend, shared_prefill
from .core import Text, VaeImage, VitImage, prefill, text_step_hidden
from .guidance import timestep_schedule
from .images import resize_pixels, to_pixels, unpatchify, vit_pixels
from .loading import Bagel, load_bagel

EMA = "ema.safetensors"
CANVAS_MULTIPLE = 16  # pixels per latent token side (VAE /8, 2x2 patches)


def canvas_rule(max_latent_size: int) -> CanvasRule:
    """Multiples of 16 up to the latent grid (latent_pos_embed: 64 x 16 = 1024 px for BAGEL-7B-MoT).
    Default: 1024 (the official default) or the largest side when smaller; tables under 512 px
    (test checkpoints) default to half their largest side, which keeps them fast."""
    top = max_latent_size * CANVAS_MULTIPLE
    side = min(1024, top) if top >= 512 else max(CANVAS_MULTIPLE, (top // 2) // CANVAS_MULTIPLE * CANVAS_MULTIPLE)
    return CanvasRule((side, side), CANVAS_MULTIPLE, CANVAS_MULTIPLE, top)


def sample_seeds(seed: int) -> Tuple[int, int, int]:
    """(starting noise, SDE noise, text) generator seeds of one sample: three disjoint streams."""
    return seed_streams(seed, 3)


class BagelPolicy(ModulePolicy):
    name = "bagel"

    def __init__(self, bagel: Bagel, path: Optional[str] = None, version: int = 0):
        self.bagel = bagel
        self.model = bagel.model.eval()
        self.vae = bagel.vae
        self.config = bagel.config
        self.tokenizer, self.tokens = bagel.tokenizer, bagel.tokens
        self.path = path
        self.version = version
        self.contexts = ContextBuilder(self.tokenizer, self.tokens)
        self.share_prefill = True  # benchmarks switch it off to measure G prefills
        # in train mode the recompute checkpoints each MoT layer (core.forward_embeds): activation memory of
        # one hidden state per layer and token, the price a second forward of each layer in backward
        self.model.checkpoint_layers = True
        self._info: Optional[PolicyInfo] = None

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def load(
        cls, path: Optional[str] = None, device: str = "cpu", dtype: Optional[torch.dtype] = None
    ) -> "BagelPolicy":
        """An official BAGEL folder (config.json, llm_config.json, vit_config.json, ema.safetensors,
        ae.safetensors, tokenizer files) onto device in dtype (default: float32 on CPU, bfloat16 on
        CUDA). There are no default weights: download BAGEL-7B-MoT and pass its folder."""
        if not path:
            raise ValueError(
                "policy 'bagel' needs a checkpoint folder (--model DIR): the official "
                "BAGEL-7B-MoT download, or one written by tools/make_tiny_bagel.py"
            )
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a BAGEL checkpoint folder")
        return cls(load_bagel(path, device=device, dtype=dtype), path)

    @property
    def device(self) -> torch.device:
        return self.model.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.lm_head.weight.dtype

    @property
    def info(self) -> PolicyInfo:
        if self._info is None:
            canvas = canvas_rule(self.config.max_latent_size)
            w, h = canvas.default
            t = self.tokens
            # the paper's settings: text-to-image text 4.0 in (0.4, 1] with global renorm; refinement
            # text 4.0, image 2.0 in (0, 1] with text_channel renorm; shift 3; SDE noise level 0.7.
            # steps: 40 (the paper evaluates with 40-50 and refines with 40; rollouts ask for 16)
            common = dict(
                steps=40,
                mode="ode",
                noise_level=0.7,
                sde_window=(0, 10),
                shift=3.0,
                width=w,
                height=h,
                cfg_renorm_min=0.0,
            )
            self._info = PolicyInfo(
                name=self.name,
                parameters=sum(v.numel() for v in self.state_dict().values() if v.is_floating_point()),
                dtype=self.dtype,
                device=self.device,
                vocab_size=self.config.llm.vocab_size,
                special_tokens={
                    "bos": t.bos,
                    "eos": t.eos,
                    "start_of_image": t.start_of_image,
                    "end_of_image": t.end_of_image,
                },
                capabilities=Capabilities(
                    think=True,
                    reflect=True,
                    understanding=True,
                    guidance_branches=("text", "image"),
                    lora=True,
                    canvas=canvas,
                ),
                generate_defaults=SamplingConfig(
                    cfg_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global", **common
                ),
                reflect_defaults=SamplingConfig(
                    cfg_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel", **common
                ),
                text_defaults=TextConfig(temperature=1.0, top_p=1.0, max_tokens=128),  # the server's default cap
                prompt_domain=None,
            )
        return self._info

    def tokenize(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def fsdp_modules(self) -> Tuple[nn.Module, List[nn.Module]]:
        """(root, units) for FSDP2: each MoT layer and the ViT tower (called as modules by core.py)."""
        return self.model, [*self.model.language_model.model.layers, self.model.vit_model.vision_model]

    # ---- inputs ---------------------------------------------------------------------------------
    def _grid(self, sc: SamplingConfig) -> Tuple[int, int]:
        w, h = self.info.capabilities.canvas.resolve(sc.width, sc.height)
        return h // CANVAS_MULTIPLE, w // CANVAS_MULTIPLE

    def _images(self, images: Sequence[np.ndarray], size_hw: Tuple[int, int]) -> Tuple[ImageSet, List[int]]:
        """The distinct input images as context segments (VAE latents of the image resized to the
        canvas, mean of the posterior; ViT pixels by BAGEL's transform), and each row's index."""
        slot: Dict[tuple, int] = {}
        index, unique = [], []
        for im in images:
            arr = np.asarray(im)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
                raise ValueError(f"images must be uint8 [H, W, 3] each, got {arr.dtype} {list(arr.shape)}")
            k = ImageSet.key(arr)
            if k not in slot:
                slot[k] = len(unique)
                unique.append(arr)
            index.append(slot[k])
        out = ImageSet()
        if unique:
            px = torch.stack([resize_pixels(to_pixels(a), size_hw) for a in unique])
            latents = self.vae.encode(px).float()
            out.vae = [VaeImage.from_latent(z) for z in latents]
            out.vit = [VitImage(vit_pixels(self.config, a)) for a in unique]
        return out, index

    def _jobs(self, prompts, think, images, sc) -> Tuple[List[Job], Optional[ImageSet]]:
        if images is None:
            return [Job(p, bool(t)) for p, t in zip(prompts, think)], None
        imset, index = self._images(images, (sc.height, sc.width))
        return [Job(p, True, i) for p, i in zip(prompts, index)], imset

    def _prefill(self, rows, images) -> KVCache:
        return shared_prefill(self.model, rows, images, share=self.share_prefill)

    def _branches(
        self,
        jobs: Sequence[Job],
        images,
        written: Sequence[Optional[List[int]]],
        need_text: bool,
        need_image: bool,
        prefix=None,
    ) -> Branches:
        """The three guidance contexts of the rows: full = prefix + written text; no text; no image."""
        c = self.contexts
        prefix = prefix if prefix is not None else self._prefill([c.prefix(j) for j in jobs], images)
        full = extend(self.model, prefix, [c.written(w) if w else None for w in written])
        no_text = self._prefill([c.no_text(j) for j in jobs], images) if need_text else None
        no_image = self._prefill([c.no_image(j) for j in jobs], images) if need_image else None
        return Branches(full, no_text, no_image)

    def check_context(self, prompts, text: TextConfig, think: bool, reflect: bool = False) -> None:
        """ValueError naming prompts[i] when its context, the written text and the image would run past
        the language model's positions (llm_config max_position_embeddings). An image segment (VAE or
        ViT) takes one position, however many tokens it has."""
        limit = int(getattr(self.config.llm, "max_position_embeddings", 0) or 0)
        if not limit:
            return
        for i, p in enumerate(prompts):
            job = Job(p, think or reflect, 0 if reflect else None)
            used = sum(len(x) - 1 if x[0] == "text" else 1 for x in self.contexts.prefix(job))
            used += (text.max_tokens + 2 if (think or reflect) else 0) + 1  # written text, the image drawn
            if used > limit:
                raise ValueError(
                    f"prompts[{i}] needs {used} positions with a text budget of {text.max_tokens} "
                    f"tokens; the model has {limit}"
                )

    # ---- text --------------------------------------------------------------------------------------
    def _sample_text(self, cache, generators: Sequence[torch.Generator], text: TextConfig) -> List[TextSample]:
        """From each row's context, <|im_start|> then tokens until <|im_end|> or max_tokens. Log-probs
        of log_softmax(logits / text.logp_temperature); temperature 0 picks the most likely token."""
        m, tok = self.model, self.tokens
        B, dev = cache.batch_size, self.device
        head = m.language_model.lm_head
        out = [TextSample([], []) for _ in range(B)]
        active = torch.ones(B, dtype=torch.bool, device=dev)
        ids = torch.full((B,), tok.bos, dtype=torch.long, device=dev)
        for _ in range(text.max_tokens):
            hidden, cache = text_step_hidden(m, cache, ids, active)
            logp = torch.log_softmax(head(hidden).float() / text.logp_temperature, dim=-1)
            nxt = torch.full((B,), tok.eos, dtype=torch.long, device=dev)
            for i in range(B):
                if not active[i]:
                    continue
                t = text.pick(logp[i], generators[i])
                nxt[i] = t
                out[i].ids.append(t)
                out[i].logps.append(float(logp[i, t]))
            active = active & (nxt != tok.eos)
            if not bool(active.any()):
                break
            ids = nxt
        for s in out:
            s.text = self.detokenize([i for i in s.ids if i != tok.eos])
        return out

    # ---- sampling ------------------------------------------------------------------------------------
    def generate(self, prompts, seeds, sampling: SamplingConfig, text: TextConfig, think: bool = False) -> List[Sample]:
        return self._run(prompts, seeds, sampling, text, [think] * len(prompts), None)

    def reflect(self, prompts, images, seeds, sampling: SamplingConfig, text: TextConfig) -> List[Sample]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        return self._run(prompts, seeds, sampling, text, [True] * len(prompts), list(images))

    @torch.no_grad()
    def _run(self, prompts, seeds, sc: SamplingConfig, text: TextConfig, think, images) -> List[Sample]:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        h, w = self._grid(sc)
        sc = sc.replace(width=w * CANVAS_MULTIPLE, height=h * CANVAS_MULTIPLE)
        B, dev = len(prompts), self.device
        jobs, imset = self._jobs(prompts, think, images, sc)
        seeds3 = [sample_seeds(s) for s in seeds]
        prefix = self._prefill([self.contexts.prefix(j) for j in jobs], imset)
        if any(think):
            gens = [torch.Generator(device=dev).manual_seed(s[2]) for s in seeds3]
            texts = self._sample_text(prefix, gens, text)
        else:
            texts = [TextSample([], []) for _ in prompts]
        ts = timestep_schedule(sc.steps + 1, sc.shift)
        need_t, need_i = Branches.needs([sc] * sc.steps, ts[:-1].tolist())  # every step of the loop
        branches = self._branches(jobs, imset, [t.ids for t in texts], need_t, need_i, prefix)
        configs = [sc] * B

        def vel(x, sigma):
            return branches.velocity(self.model, x, sigma, configs, (h, w)), None, 1.0

        # starting noise from a CPU generator (the same image for a seed on any device), SDE noise
        # from one generator per sample on the device: the G samples of a group never share noise
        noise0 = torch.stack(
            [
                torch.randn(h * w, self.config.patch_latent_dim, generator=torch.Generator().manual_seed(s[0]))
                for s in seeds3
            ]
        ).to(dev)
        gens = [torch.Generator(device=dev).manual_seed(s[1]) for s in seeds3]
        x0, trajs = sample_images(vel, noise0, sc, gens, sigmas=ts)
        pics = self.vae.decode(unpatchify(x0, (h, w), self.config.latent_patch_size, self.config.latent_channels))
        pics = pics.cpu().numpy()
        return [
            Sample(
                p,
                pics[i],
                texts[i].text,
                texts[i],
                trajs[i].to("cpu"),
                int(seeds[i]),
                sc,
                text,
                think=bool(think[i]) and images is None,
                reflect=images is not None,
                policy_version=self.version,
            )
            for i, p in enumerate(prompts)
        ]

    # ---- training-time recompute ------------------------------------------------------------------
    def _recompute_jobs(self, samples, reflect_images):
        refl = [s.reflect for s in samples]
        if any(refl) and reflect_images is None:
            raise ValueError("Reflect samples need reflect_images (the image each one refined)")
        if reflect_images is not None and not all(refl):
            raise ValueError("reflect_images given for samples that are not Reflect samples")
        think = [s.think or bool(s.text.ids) for s in samples]
        sc = samples[0].sampling
        return self._jobs([s.prompt for s in samples], think, reflect_images, sc)

    def token_hidden(self, samples, reflect_images=None):
        c, m = self.contexts, self.model
        jobs, imset = self._recompute_jobs(samples, reflect_images)
        B, dev, H = len(samples), self.device, self.config.hidden_size
        lengths = [len(s.text.ids) for s in samples]
        T = max(lengths, default=0)
        tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
        if T == 0:
            return torch.zeros(B, 0, H, device=dev, dtype=self.dtype), tokens, mask
        prefix = self._prefill([c.prefix(j) for j in jobs], imset)
        chunk = prefill(
            m, [[Text([self.tokens.bos] + list(s.text.ids))] if s.text.ids else [] for s in samples], cache=prefix
        )
        hidden = chunk.hidden[:, :T]
        for i, s in enumerate(samples):
            tokens[i, : lengths[i]] = torch.tensor(s.text.ids, dtype=torch.long)
            mask[i, : lengths[i]] = True
        return hidden * mask[..., None].to(hidden.dtype), tokens, mask

    def lm_head(self):
        return self.model.language_model.lm_head.weight, None

    def guided_velocity(self, samples, k, reflect_images=None):
        dev = self.device
        grids = {self._grid(s.sampling) for s in samples}
        if len(grids) != 1:
            raise ValueError(f"samples of one recompute must share a canvas, got grids {sorted(grids)}")
        grid = grids.pop()
        x = torch.stack([s.trajectory.latents[k] for s in samples]).to(dev)
        t = torch.stack([s.trajectory.sigmas[k] for s in samples]).float().to(dev)
        configs = [s.sampling for s in samples]
        jobs, imset = self._recompute_jobs(samples, reflect_images)
        need_t, need_i = Branches.needs(configs, t.tolist())
        branches = self._branches(jobs, imset, [s.text.ids for s in samples], need_t, need_i)
        return branches.velocity(self.model, x, t, configs, grid)

    # ---- weights -------------------------------------------------------------------------------------
    def _changed(self) -> None:
        self._info = None

    def enable_lora(self, rank: int = 32, alpha: float = 64.0, targets: Optional[Sequence[str]] = None) -> None:
        """PEFT LoRA on target groups "gen" (generation expert) and/or "und" (understanding expert);
        default both (the paper: r 32, alpha 64 on all attention and MLP weights)."""
        if self.lora_enabled:
            raise ValueError("LoRA is already enabled")
        peft_lora.inject(
            self.model, rank, alpha, peft_lora.target_regex(tuple(targets or peft_lora.DEFAULT_TARGETS)), self.dtype
        )
        self._changed()

    @property
    def lora_enabled(self) -> bool:
        return bool(peft_lora.lora_layers(self.model))

    def _full(self) -> Dict[str, torch.Tensor]:
        """Base weights under the official names (a LoRA-wrapped layer's base keeps its name)."""
        return {k.replace(".base_layer.", "."): v for k, v in self.model.state_dict().items() if ".lora_" not in k}

    def weights_fingerprint(self) -> str:
        return weights_fingerprint(self._full())  # no copy of the 29 GB

    def weight_specs(self, lora: bool = False) -> Dict[str, tuple]:
        if lora:
            return {
                n: (tuple(peft_lora.adapter_weight(layer, w).shape), peft_lora.adapter_weight(layer, w).dtype)
                for n, (layer, w) in peft_lora.wire_names(self.model).items()
            }
        return {k: (tuple(v.shape), v.dtype) for k, v in self._full().items()}

    def export_weights(self, lora: bool = False) -> Dict[str, torch.Tensor]:
        if not lora:
            return {k: v.detach().clone() for k, v in self._full().items()}
        out = {}
        for n, (layer, which) in peft_lora.wire_names(self.model).items():
            v = peft_lora.adapter_weight(layer, which).detach().clone()
            out[n] = v * peft_lora.scale_of(layer) if which == "B" else v
        return out

    def merged_weights(self) -> Dict[str, torch.Tensor]:
        """Full weights with every adapter merged: W + scale B A (official names and layout)."""
        out = self.export_weights(lora=False)
        for name, layer in peft_lora.lora_layers(self.model).items():
            a, b = peft_lora.adapter_weight(layer, "A"), peft_lora.adapter_weight(layer, "B")
            w = f"{name}.weight"
            out[w] = (out[w].float() + peft_lora.scale_of(layer) * (b.float() @ a.float())).to(out[w].dtype).detach()
        return out

    def _lora_import_specs(self, tensors) -> Dict[str, tuple]:
        """What a LoRA import may carry: the current adapters, or (LoRA off) adapters of one rank on
        targetable layers, A and B together."""
        if self.lora_enabled:
            return self.weight_specs(lora=True)
        ranks = {int(t.shape[0]) for n, t in tensors.items() if n.endswith("lora_A") and t.dim() == 2}
        if len(ranks) != 1:
            raise ValueError(f"a LoRA import needs lora_A tensors of one rank, got ranks {sorted(ranks)}")
        r = ranks.pop()
        modules, problems = peft_lora.named_layers(self.model, tensors)
        if problems:
            raise KeyError(problems[0])
        specs, dt = {}, peft_lora.adapter_dtype(self.dtype)
        for mod, lin in modules.items():
            specs[f"{mod}.lora_A"] = ((r, lin.in_features), dt)
            specs[f"{mod}.lora_B"] = ((lin.out_features, r), dt)
        return specs

    def import_weights(self, tensors: Dict[str, torch.Tensor], lora: bool = False) -> None:
        if not tensors:
            raise ValueError("no tensors to import")
        specs = self._lora_import_specs(tensors) if lora else self.weight_specs(lora=False)
        for name, t in tensors.items():
            if name not in specs:
                kind = "LoRA adapter" if lora else "full weight"
                raise KeyError(f"{name!r} is not a {kind} of this policy (GetModelInfo lists the names)")
            shape, dtype = specs[name]
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} != expected {tuple(shape)}")
            if t.dtype != dtype:
                raise TypeError(f"{name}: dtype {t.dtype} != expected {dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: non-finite values")
        if lora and not self.lora_enabled:  # every check passed: only now change the structure
            rank = next(iter(specs.values()))[0][0] if specs else 1
            modules = sorted({n.rpartition(".")[0] for n in tensors})
            peft_lora.inject(self.model, rank, float(rank), modules, self.dtype)
            self._changed()
        with torch.no_grad():
            if lora:
                targets = peft_lora.wire_names(self.model)
                for name, (layer, which) in targets.items():  # adapters not sent keep their effect at scale 1
                    if which == "B" and name not in tensors:
                        peft_lora.adapter_weight(layer, "B").mul_(peft_lora.scale_of(layer))
                for name, t in tensors.items():
                    layer, which = targets[name]
                    peft_lora.adapter_weight(layer, which).copy_(t)
                peft_lora.set_scale(self.model, 1.0)  # received adapters carry their scale in lora_B
            else:
                current = self._full()
                for name, t in tensors.items():
                    current[name].copy_(t)
        self.version += 1

    def save_lora(self, path: str) -> str:
        """The adapters in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors)."""
        return peft_lora.save_peft(self.model, path)

    def load_lora(self, path: str) -> None:
        """Adapters saved by save_lora or by PEFT (a LoRA on BAGEL's official module names): enabled
        if needed and applied like a LoRA import (validated first; bumps version)."""
        _, tensors = peft_lora.read_peft(path)
        self.import_weights({k: v.to(peft_lora.adapter_dtype(self.dtype)) for k, v in tensors.items()}, lora=True)

    def save(self, path: str) -> str:
        """The checkpoint folder load() reads: the source folder's files (configs, tokenizer,
        ae.safetensors) and ema.safetensors with the merged weights in the policy's dtype; with LoRA
        on, also the adapters in PEFT's format under `lora/`."""
        from safetensors.torch import save_file

        from ...fileio import write_atomic

        os.makedirs(path, exist_ok=True)
        if self.path and os.path.abspath(self.path) != os.path.abspath(path):
            for f in sorted(os.listdir(self.path)):
                src = os.path.join(self.path, f)
                if f != EMA and os.path.isfile(src):
                    shutil.copy2(src, os.path.join(path, f))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.merged_weights().items()}
        write_atomic(os.path.join(path, EMA), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        if self.lora_enabled:
            self.save_lora(os.path.join(path, "lora"))
        return path
