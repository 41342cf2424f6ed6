"""What BAGEL's contexts hold for each job and guidance branch, built once per distinct context and
shared by the rows that need it, and the guided velocity over them (BAGEL's rule).

Model-specific code, written for this project after the official inferencer (ByteDance-Seed/Bagel,
inferencer.py: interleave_inference, gen_image; app.py for the settings). What changed from upstream:
- contexts are lists of hashable pieces; equal contexts in a batch are prefilled once and their
  keys/values reused by every row and every denoising step (the G samples of a prompt share one
  prefill), padded batches replace per-sample caches;
- the written text (a plan or a critique) enters the conditional context as the ids that were
  sampled (official: decoded, then re-tokenised);
- the refinement (SRR) job is ours: BAGEL's editing layout (system prompt, the image as VAE tokens
  then ViT tokens, the prompt) with a system prompt asking for a critique and an edit instruction.

Contexts (each text segment wrapped <|im_start|> ... <|im_end|>, as the official prepare_prompts):

| job | full (conditional) | no text (cfg_text) | no image (cfg_img) |
| --- | --- | --- | --- |
| text-to-image | prompt | (empty) | prompt |
| think | system, prompt, plan | system | system, prompt |
| refine (SRR) | system, image (VAE, ViT), prompt, critique | system, image | system, prompt |

The written text is in the conditional context only. The same functions build the contexts at
sampling time and in the trainer's recompute, so both see the same keys and values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .cache import KVCache
from .core import Text, VaeImage, VitImage, prefill, velocity
from .guidance import cfg_active, cfg_combine

# official inferencer.py
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the "
    "image. \nThe planning process is enclosed within <think> </think> tags, i.e. <think> "
    "planning process here </think> image here"
)

# ours (SRR): the editing layout with a critique in place of the plan
REFLECT_SYSTEM_PROMPT = (
    "You are given an image that was generated for the user's prompt. You should first examine "
    "in the mind how the image fails the prompt, then generate a refined image. \n"
    "The critique and the edit instruction that fixes the image are enclosed within <think> "
    "</think> tags, i.e. <think> critique and edit instruction here </think> image here"
)

Piece = Tuple  # ("text", ids...) | ("vae", image index) | ("vit", image index)


@dataclass(frozen=True)
class Job:
    """One row: its prompt, whether it writes a plan first (think), and the index of the image it
    refines among the batch's distinct images (None: text-to-image)."""

    prompt: str
    think: bool = False
    image: Optional[int] = None

    @property
    def system(self) -> Optional[str]:
        if self.image is not None:
            return REFLECT_SYSTEM_PROMPT
        return GEN_THINK_SYSTEM_PROMPT if self.think else None


class ContextBuilder:
    """Pieces of each context for one tokenizer (prompt encodings memoised)."""

    def __init__(self, tokenizer, tokens):
        self.tokenizer, self.tokens = tokenizer, tokens
        self._text: Dict[str, Piece] = {}

    def text(self, s: str) -> Piece:
        piece = self._text.get(s)
        if piece is None:
            piece = self._text[s] = ("text", *self.tokens.wrap(self.tokenizer.encode(s)))
        return piece

    def prefix(self, job: Job) -> Tuple[Piece, ...]:
        """Up to where the model writes (think, refine) or draws (plain): also the full context
        without the written text."""
        sys = (self.text(job.system),) if job.system else ()
        img = (("vae", job.image), ("vit", job.image)) if job.image is not None else ()
        return sys + img + (self.text(job.prompt),)

    def no_text(self, job: Job) -> Tuple[Piece, ...]:
        sys = (self.text(job.system),) if job.system else ()
        img = (("vae", job.image), ("vit", job.image)) if job.image is not None else ()
        return sys + img

    def no_image(self, job: Job) -> Tuple[Piece, ...]:
        sys = (self.text(job.system),) if job.system else ()
        return sys + (self.text(job.prompt),)

    def written(self, ids: Sequence[int]) -> List[int]:
        """The written text as it enters the context: <|im_start|> ids <|im_end|> (the end added when
        the text was cut before it)."""
        ids = list(ids)
        if not ids or ids[-1] != self.tokens.eos:
            ids.append(self.tokens.eos)
        return [self.tokens.bos] + ids


@dataclass
class ImageSet:
    """The batch's distinct input images as context segments: VAE latent tokens of the image resized
    to the canvas, and ViT pixels by BAGEL's ViT transform."""

    vae: List[VaeImage] = field(default_factory=list)
    vit: List[VitImage] = field(default_factory=list)

    @staticmethod
    def key(image: np.ndarray) -> tuple:
        a = np.ascontiguousarray(image)
        return a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def materialise(pieces: Sequence[Piece], images: Optional[ImageSet]) -> list:
    out = []
    for p in pieces:
        if p[0] == "text":
            out.append(Text(list(p[1:])))
        elif p[0] == "vae":
            out.append(images.vae[p[1]])
        else:
            out.append(images.vit[p[1]])
    return out


def shared_prefill(
    model, rows: Sequence[Tuple[Piece, ...]], images: Optional[ImageSet] = None, share: bool = True
) -> KVCache:
    """One cache row per entry of `rows`; each distinct context is prefilled once and its keys and
    values are shared by every row that holds it (a view when the whole batch shares one).
    share=False prefills every row on its own (for measuring what sharing saves)."""
    if all(len(r) == 0 for r in rows):
        return KVCache.empty(model, len(rows))
    if not share:
        return prefill(model, [materialise(r, images) for r in rows]).cache
    slot: Dict[tuple, int] = {}
    index = [slot.setdefault(tuple(r), len(slot)) for r in rows]
    unique = list(slot)
    cache = prefill(model, [materialise(u, images) for u in unique]).cache
    if len(unique) == 1:
        return cache.expand(len(rows))
    return cache.index(index)


def extend(model, cache: KVCache, texts: Sequence[Optional[List[int]]]) -> KVCache:
    """`cache` with one more text segment per row (None: nothing for that row)."""
    if not any(texts):
        return cache
    return prefill(model, [[Text(t)] if t else [] for t in texts], cache=cache).cache


# ----------------------------------------------------------------------------------------------
# guidance


def _rule(sc, t: float) -> Tuple[float, float]:
    """(text scale, image scale) in force at timestep t under settings sc: both 1 outside
    cfg_interval (lo < t <= hi); the image branch only ever together with the text branch."""
    if sc.cfg_scale <= 1.0 or not cfg_active(t, sc.cfg_interval):
        return 1.0, 1.0
    return float(sc.cfg_scale), float(sc.cfg_img_scale) if sc.cfg_img_scale > 1.0 else 1.0


def _renorm(sc) -> Tuple[str, float]:
    """cfg_combine's (type, min); 'none' is a factor clamped to [1, 1]."""
    if sc.cfg_renorm_type == "none":
        return "global", 1.0
    return sc.cfg_renorm_type, float(sc.cfg_renorm_min)


class Branches:
    """The three guidance contexts of a batch (rows aligned) and BAGEL's guided velocity over them.
    Stacked caches are memoised per pattern of guided rows, so a draw concatenates once."""

    def __init__(self, full: KVCache, no_text: Optional[KVCache], no_image: Optional[KVCache]):
        self.full, self.no_text, self.no_image = full, no_text, no_image
        self._stacked: Dict[tuple, KVCache] = {}

    @staticmethod
    def needs(configs: Sequence, ts: Sequence[float]) -> Tuple[bool, bool]:
        """Whether any row needs the no-text / no-image context at these timesteps."""
        scales = [_rule(sc, t) for sc, t in zip(configs, ts)]
        return any(s[0] > 1.0 for s in scales), any(s[1] > 1.0 for s in scales)

    def _cache(self, rows_t: List[int], rows_i: List[int]) -> KVCache:
        key = (tuple(rows_t), tuple(rows_i))
        if key not in self._stacked:
            B = self.full.batch_size
            parts = [self.full]
            for rows, c in ((rows_t, self.no_text), (rows_i, self.no_image)):
                if rows:
                    parts.append(c if len(rows) == B else c.index(rows))
            self._stacked[key] = parts[0] if len(parts) == 1 else KVCache.concat(parts)
        return self._stacked[key]

    def velocity(
        self, model, x: torch.Tensor, t: torch.Tensor, configs: Sequence, grid: Tuple[int, int]
    ) -> torch.Tensor:
        """Guided velocity [B, N, 64] float32 for latent tokens x [B, N, 64] at timesteps t [B], each
        row under its own SamplingConfig: one model call over the full context of every row and the
        no-text / no-image contexts of the rows guided at their t, then cfg_combine per row."""
        B = x.shape[0]
        ts = [float(v) for v in t.tolist()]
        scales = [_rule(sc, ti) for sc, ti in zip(configs, ts)]
        rows_t = [i for i, s in enumerate(scales) if s[0] > 1.0]
        rows_i = [i for i, s in enumerate(scales) if s[1] > 1.0]
        if (rows_t and self.no_text is None) or (rows_i and self.no_image is None):
            raise ValueError("guided rows need the no-text / no-image contexts")
        cache = self._cache(rows_t, rows_i)
        if rows_t:
            idx = torch.tensor(list(range(B)) + rows_t + rows_i, device=x.device)
            x, t = x[idx], t.to(x.device)[idx]
        v = velocity(model, cache, x, t, grid).float()
        if not rows_t:
            return v
        n_t = len(rows_t)
        where_t = {r: B + j for j, r in enumerate(rows_t)}
        where_i = {r: B + n_t + j for j, r in enumerate(rows_i)}
        out = []
        for r in range(B):
            if r not in where_t:
                out.append(v[r : r + 1])
                continue
            kind, lo = _renorm(configs[r])
            v_ni = v[where_i[r] : where_i[r] + 1] if r in where_i else None
            out.append(
                cfg_combine(v[r : r + 1], v[where_t[r] : where_t[r] + 1], v_ni, scales[r][0], scales[r][1], kind, lo)
            )
        return torch.cat(out)
