"""BAGEL's functional core: prefill a batch of contexts into a KV cache, decode text one token at a
time, and predict flow velocities for latent tokens against a cache.

Sequences are batched by right-padding; attention is one boolean mask per call:
- a query sees every valid cached key (the cache's `valid` [B, L]);
- inside the new chunk, a text token sees the chunk's earlier tokens (causal); a token of an image
  segment (start marker, image tokens, end marker) also sees its whole segment (full attention);
- padding is never seen (a padding query sees only itself, so no row is all -inf).
Position ids follow BAGEL: text tokens count up; every token of one image segment (markers
included) shares one id, and the next segment starts one after it. The velocity query (start
marker, N noisy latent tokens, end marker) sits at the cache's next position without advancing it.
Text, ViT tokens and markers take the understanding expert, VAE latent tokens the generation one.

Nothing here is wrapped in no_grad: under autograd every output is differentiable in the weights,
so the trainer recomputes with the same functions the sampler ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cache import KVCache
from .images import grid_position_ids, patchify
from .modeling import BagelModel, Routing

# ----------------------------------------------------------------------------------------------
# context segments


@dataclass
class Text:
    """Text token ids (understanding expert, causal). Wrapping (<|im_start|> ... <|im_end|>, as the
    official prepare_prompts does) is the caller's choice: see tokens.BagelTokens.wrap."""

    ids: Union[Sequence[int], torch.Tensor]


@dataclass
class VitImage:
    """An image for understanding: pixels [3, H, W] in [-1, 1], H and W multiples of the ViT patch
    (images.preprocess makes them). Becomes <|vision_start|>, (H/p)(W/p) ViT tokens, <|vision_end|>."""

    pixels: torch.Tensor


@dataclass
class VaeImage:
    """An image as VAE latent tokens (generation expert): tokens [h*w, 64] (packed 2x2 patches of the
    normalised latent) on grid (h, w). timestep 0 is a clean image (the official editing context)."""

    tokens: torch.Tensor
    grid: Tuple[int, int]
    timestep: float = 0.0

    @classmethod
    def from_latent(cls, latent: torch.Tensor, timestep: float = 0.0, patch: int = 2) -> "VaeImage":
        """latent [16, 2h, 2w] (normalised, as FluxVAE.encode returns) -> VaeImage."""
        c, hh, ww = latent.shape
        return cls(patchify(latent, patch), (hh // patch, ww // patch), timestep)


Segment = Union[Text, VitImage, VaeImage]


@dataclass(frozen=True)
class SpecialTokens:
    """The marker ids the core inserts around image segments."""

    start_of_image: int
    end_of_image: int


# ----------------------------------------------------------------------------------------------
# the transformer over a padded chunk


def attention_mask(cache_valid: torch.Tensor, attend: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, T, L + T] bool, True = may attend: every valid cached key (cache_valid [B, L]), then the
    chunk's keys per `attend` [B, T, T] that are real (valid [B, T]); each query always sees itself
    (a padding query then has one key and no NaN)."""
    B, T = valid.shape
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    inner = (attend & valid[:, None, :]) | eye
    return torch.cat([cache_valid[:, None, :].expand(B, T, cache_valid.shape[1]), inner], dim=2)


def forward_embeds(
    model: BagelModel,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    gen: torch.Tensor,
    attend: torch.Tensor,
    valid: torch.Tensor,
    cache: Optional[KVCache] = None,
) -> Tuple[torch.Tensor, KVCache]:
    """The MoT language model over a new chunk.

    embeds [B, T, D]; positions [B, T] RoPE ids; gen [B, T] True for generation-expert tokens;
    attend [B, T, T] which new keys each new query sees (the caller's mask inside the chunk);
    valid [B, T] real tokens (padding False); cache: the prefix (every valid key is seen).
    Returns hidden [B, T, D] after the final norm of each token's expert, and the cache extended by
    the chunk (its valid = cache.valid ++ valid; next_pos unchanged: the caller sets it).
    """
    lm = model.language_model.model
    B, T, _ = embeds.shape
    if cache is None:
        cache = KVCache.empty(model, B, embeds.device, embeds.dtype)
    if cache.batch_size != B:
        raise ValueError(f"cache has {cache.batch_size} rows, the chunk {B}")
    routing = Routing(gen)
    mask = attention_mask(cache.valid, attend, valid)[:, None]
    cos, sin = lm.rotary_emb(embeds, positions)
    x = embeds
    keys, values = [], []
    # activation checkpointing (model.checkpoint_layers, while training with autograd): each layer keeps
    # its input and recomputes its activations in the backward pass; the values are the same
    ckpt = getattr(model, "checkpoint_layers", False) and model.training and torch.is_grad_enabled()
    for i, layer in enumerate(lm.layers):
        args = (x, routing, cos, sin, mask, cache.keys[i], cache.values[i])
        x, k_all, v_all = checkpoint(layer, *args, use_reentrant=False) if ckpt else layer(*args)
        keys.append(k_all)
        values.append(v_all)
    hidden = lm.final_norm(x, routing)
    return hidden, KVCache(keys, values, torch.cat([cache.valid, valid], dim=1), cache.next_pos)


# ----------------------------------------------------------------------------------------------
# prefill


@dataclass
class Span:
    """Where a segment's content landed in the prefill chunk: kind 'text' | 'vit' | 'vae', the first
    content column (after the start marker for images) and the number of content tokens."""

    kind: str
    start: int
    length: int


@dataclass
class Prefill:
    cache: KVCache  # the contexts' cache (next_pos advanced)
    hidden: torch.Tensor  # [B, T, D] final-normed hidden states of the chunk
    valid: torch.Tensor  # [B, T] real tokens
    spans: List[List[Span]] = field(default_factory=list)  # per row, per segment

    def last_hidden(self) -> torch.Tensor:
        """[B, D] hidden state of each row's last real token (its next-token logits come from it)."""
        last = self.valid.long().cumsum(1).argmax(1)
        return self.hidden[torch.arange(self.hidden.shape[0], device=last.device), last]


def _special(model: BagelModel, special: Optional[SpecialTokens]) -> SpecialTokens:
    special = special or getattr(model, "special_tokens", None)
    if special is None:
        raise ValueError("no start/end-of-image token ids: pass special=... or load the model with load_bagel")
    return special


def vit_embeds(model: BagelModel, images: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """ViT tokens in LLM space for each image: pixels [3, H, W] -> [(H/p)(W/p), D]
    (SigLIP, connector, + vit_pos_embed); images of different sizes are padded and masked."""
    cfg = model.config
    p, side = cfg.vit.patch_size, cfg.vit_max_num_patch_per_side
    w = model.vit_model.vision_model.embeddings.patch_embedding.weight
    patches, pos, lens = [], [], []
    for px in images:
        grid = (px.shape[1] // p, px.shape[2] // p)
        patches.append(patchify(px.to(w.device, w.dtype), p))
        pos.append(grid_position_ids(grid, side, device=w.device))
        lens.append(patches[-1].shape[0])
    n_max = max(lens)
    x = torch.stack([F.pad(t, (0, 0, 0, n_max - t.shape[0])) for t in patches])
    ids = torch.stack([F.pad(t, (0, n_max - t.shape[0])) for t in pos])
    key_mask = None
    if min(lens) != n_max:
        key_mask = torch.arange(n_max, device=w.device)[None, :] < torch.tensor(lens, device=w.device)[:, None]
    h = model.vit_model.vision_model(x, ids, key_mask)
    h = model.connector(h) + model.vit_pos_embed(ids)
    return [h[i, :n] for i, n in enumerate(lens)]


def latent_embeds(model: BagelModel, tokens: torch.Tensor, timesteps: torch.Tensor, grid: Tuple[int, int]):
    """Latent tokens in LLM space: tokens [..., N, 64], timesteps [...] -> [..., N, D]
    (vae2llm + time_embedder(t) + latent_pos_embed of the (h, w) grid)."""
    pos = grid_position_ids(grid, model.config.max_latent_size, device=tokens.device)
    w = model.vae2llm.weight
    return (
        model.vae2llm(tokens.to(w.dtype))
        + model.time_embedder(timesteps.to(w.device))[..., None, :]
        + model.latent_pos_embed(pos)
    )


@dataclass
class Plan:
    """Where every token of a prefill chunk goes (padded [B, T] tensors) - no model needed."""

    positions: torch.Tensor  # RoPE ids
    gen: torch.Tensor  # generation-expert tokens (VAE latents)
    segment: torch.Tensor  # segment index within the row (-1 padding)
    full: torch.Tensor  # tokens of image segments (markers included): full attention inside
    valid: torch.Tensor  # real tokens
    next_pos: torch.Tensor  # [B]
    spans: List[List[Span]]
    text_ids: List[int]  # ids of text and marker tokens, in order ...
    text_at: List[int]  # ... and their flat indices b * T + col
    vit: List[Tuple[torch.Tensor, int]]  # (pixels, flat index of the first ViT token)
    vae: List[Tuple[VaeImage, int]]


def plan_contexts(
    contexts: Sequence[Sequence[Segment]], start_pos: Sequence[int], special: SpecialTokens, vit_patch: int, device=None
) -> Plan:
    """Lay out one list of segments per row: text tokens count positions up one by one; an image
    segment is start marker + content + end marker, all at one position, and advances it by one."""
    rows = []
    text_ids, text_at, vit, vae, spans, next_pos = [], [], [], [], [], []
    for b, segments in enumerate(contexts):
        pos, col = int(start_pos[b]), 0
        r = dict(pos=[], gen=[], seg=[], full=[])
        r_text, r_vit, r_vae, r_spans = [], [], [], []

        def put(n, p, gen, seg, full):
            r["pos"].extend([p] * n if full else range(p, p + n))
            r["gen"].extend([gen] * n)
            r["seg"].extend([seg] * n)
            r["full"].extend([full] * n)

        for s_i, seg in enumerate(segments):
            if isinstance(seg, Text):
                ids = seg.ids.tolist() if isinstance(seg.ids, torch.Tensor) else [int(i) for i in seg.ids]
                r_text.extend((i, col + j) for j, i in enumerate(ids))
                put(len(ids), pos, False, s_i, False)
                r_spans.append(Span("text", col, len(ids)))
                col, pos = col + len(ids), pos + len(ids)
                continue
            if isinstance(seg, VitImage):
                n = (seg.pixels.shape[-2] // vit_patch) * (seg.pixels.shape[-1] // vit_patch)
                r_vit.append((seg.pixels, col + 1))
                kind, gen = "vit", False
            elif isinstance(seg, VaeImage):
                n = seg.tokens.shape[0]
                r_vae.append((seg, col + 1))
                kind, gen = "vae", True
            else:
                raise TypeError(f"unknown segment type {type(seg).__name__}")
            r_text.extend([(special.start_of_image, col), (special.end_of_image, col + n + 1)])
            put(1, pos, False, s_i, True)
            put(n, pos, gen, s_i, True)
            put(1, pos, False, s_i, True)
            r_spans.append(Span(kind, col + 1, n))
            col, pos = col + n + 2, pos + 1
        rows.append((r, r_text, r_vit, r_vae))
        spans.append(r_spans)
        next_pos.append(pos)
    T = max(len(r["pos"]) for r, *_ in rows)
    if T == 0:
        raise ValueError("prefill: every context is empty")
    for b, (r, r_text, r_vit, r_vae) in enumerate(rows):
        text_ids.extend(i for i, _ in r_text)
        text_at.extend(b * T + c for _, c in r_text)
        vit.extend((px, b * T + c) for px, c in r_vit)
        vae.extend((it, b * T + c) for it, c in r_vae)

    def padded(key, fill, dt):
        return torch.tensor([r[key] + [fill] * (T - len(r[key])) for r, *_ in rows], dtype=dt, device=device)

    valid = torch.tensor(
        [[True] * len(r["pos"]) + [False] * (T - len(r["pos"])) for r, *_ in rows], dtype=torch.bool, device=device
    )
    return Plan(
        padded("pos", 0, torch.long),
        padded("gen", False, torch.bool),
        padded("seg", -1, torch.long),
        padded("full", False, torch.bool),
        valid,
        torch.tensor(next_pos, dtype=torch.long, device=device),
        spans,
        text_ids,
        text_at,
        vit,
        vae,
    )


def chunk_attend(plan: Plan) -> torch.Tensor:
    """[B, T, T]: query i sees key j of the chunk when j <= i, or when both lie in the same image
    segment (full attention inside an image)."""
    T = plan.positions.shape[1]
    ar = torch.arange(T, device=plan.positions.device)
    causal = ar[None, :, None] >= ar[None, None, :]
    same_image = (plan.segment[:, :, None] == plan.segment[:, None, :]) & plan.full[:, :, None] & plan.full[:, None, :]
    return causal | same_image


def prefill(
    model: BagelModel,
    contexts: Sequence[Sequence[Segment]],
    cache: Optional[KVCache] = None,
    special: Optional[SpecialTokens] = None,
) -> Prefill:
    """Append one list of segments per row to `cache` (None: empty), in one forward.
    Returns the extended cache (next_pos advanced), the chunk's hidden states, validity and spans."""
    special = _special(model, special)
    B = len(contexts)
    if cache is not None and cache.batch_size != B:
        raise ValueError(f"{B} contexts for a cache of {cache.batch_size} rows")
    dev = model.language_model.lm_head.weight.device
    dtype = model.language_model.lm_head.weight.dtype
    start = cache.next_pos.tolist() if cache is not None else [0] * B
    plan = plan_contexts(contexts, start, special, model.config.vit.patch_size, dev)
    T, D = plan.positions.shape[1], model.config.hidden_size

    emb = torch.zeros(B * T, D, device=dev, dtype=dtype)
    if plan.text_ids:
        ids = torch.tensor(plan.text_ids, device=dev)
        emb = emb.index_copy(0, torch.tensor(plan.text_at, device=dev), model.language_model.model.embed_tokens(ids))
    if plan.vit:
        out = vit_embeds(model, [px for px, _ in plan.vit])
        idx = torch.cat([torch.arange(at, at + o.shape[0], device=dev) for (_, at), o in zip(plan.vit, out)])
        emb = emb.index_copy(0, idx, torch.cat(out).to(dtype))
    if plan.vae:
        out = [
            latent_embeds(model, it.tokens.to(dev), torch.tensor(float(it.timestep), device=dev), it.grid)
            for it, _ in plan.vae
        ]
        idx = torch.cat([torch.arange(at, at + o.shape[0], device=dev) for (_, at), o in zip(plan.vae, out)])
        emb = emb.index_copy(0, idx, torch.cat(out).to(dtype))
    hidden, new_cache = forward_embeds(
        model, emb.reshape(B, T, D), plan.positions, plan.gen, chunk_attend(plan), plan.valid, cache
    )
    new_cache.next_pos = plan.next_pos
    return Prefill(new_cache, hidden, plan.valid, plan.spans)


# ----------------------------------------------------------------------------------------------
# text decoding


def lm_head_weight(model: BagelModel) -> torch.Tensor:
    """[V, D]: logits = hidden @ W.T (for fused linear losses)."""
    return model.language_model.lm_head.weight


def text_step_hidden(
    model: BagelModel, cache: KVCache, ids: torch.Tensor, active: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, KVCache]:
    """Feed one token per row (ids [B]) at each row's next position with the understanding expert.
    active [B] bool (default all): inactive rows still compute, but their new key is marked
    invalid and their position does not advance (finished rows in a batch).
    Returns hidden [B, D] (final-normed) and the extended cache."""
    B = ids.shape[0]
    dev = cache.valid.device
    active = torch.ones(B, dtype=torch.bool, device=dev) if active is None else active.to(dev)
    emb = model.language_model.model.embed_tokens(ids.to(dev))[:, None, :]
    pos = cache.next_pos[:, None]
    ones = torch.ones(B, 1, 1, dtype=torch.bool, device=dev)
    hidden, new_cache = forward_embeds(
        model, emb, pos, torch.zeros(B, 1, dtype=torch.bool, device=dev), ones, active[:, None], cache
    )
    new_cache.next_pos = cache.next_pos + active.long()
    return hidden[:, 0], new_cache


def text_step(
    model: BagelModel, cache: KVCache, ids: torch.Tensor, active: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, KVCache]:
    """text_step_hidden, then the LM head: logits [B, V] for the token after `ids`, and the cache."""
    hidden, new_cache = text_step_hidden(model, cache, ids, active)
    return model.language_model.lm_head(hidden), new_cache


def text_logits(model: BagelModel, hidden: torch.Tensor) -> torch.Tensor:
    return model.language_model.lm_head(hidden)


# ----------------------------------------------------------------------------------------------
# flow velocity


def velocity(
    model: BagelModel,
    cache: KVCache,
    x_t: torch.Tensor,
    t: Union[torch.Tensor, float],
    grid: Tuple[int, int],
    special: Optional[SpecialTokens] = None,
) -> torch.Tensor:
    """The model's flow velocity (pointing from data to noise) for latent tokens.

    x_t [B, N, 64] noisy latent tokens (packed 2x2 patches) on grid (h, w) with N = h * w;
    t [B] (or a float) in [0, 1]; cache with B rows (the context; not modified).
    The query is <|vision_start|>, N latent tokens (vae2llm + time embedding + latent position
    embedding, generation expert), <|vision_end|>, all at the cache's next position with full
    attention among themselves and to the whole context. Returns v [B, N, 64] (llm2vae)."""
    special = _special(model, special)
    B, N, _ = x_t.shape
    dev = cache.valid.device
    dtype = model.vae2llm.weight.dtype
    if cache.batch_size != B:
        raise ValueError(f"x_t has {B} rows, the cache {cache.batch_size}")
    t = torch.as_tensor(t, dtype=torch.float32, device=dev)
    t = t.expand(B) if t.ndim == 0 else t
    markers = model.language_model.model.embed_tokens(
        torch.tensor([special.start_of_image, special.end_of_image], device=dev)
    )
    lat = latent_embeds(model, x_t.to(dev), t, grid)
    emb = torch.cat([markers[0].expand(B, 1, -1), lat.to(dtype), markers[1].expand(B, 1, -1)], dim=1)
    T = N + 2
    pos = cache.next_pos[:, None].expand(B, T)
    gen = torch.ones(B, T, dtype=torch.bool, device=dev)
    gen[:, 0] = gen[:, -1] = False
    full = torch.ones(B, T, T, dtype=torch.bool, device=dev)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    hidden, _ = forward_embeds(model, emb, pos, gen, full, valid, cache)
    return model.llm2vae(hidden[:, 1:-1])
