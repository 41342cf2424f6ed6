"""BAGEL's functional core on a tiny random checkpoint: position ids and attention masks against a
hand-written layout, Mixture-of-Transformers routing, KV-cached velocity and text decoding against
full uncached forwards of the same sequences, padding and cache sharing, gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from alphagrpo_serve.models.bagel import KVCache, SpecialTokens, Text, VaeImage, VitImage, prefill, text_step, velocity
from alphagrpo_serve.models.bagel.core import attention_mask, chunk_attend, plan_contexts
from alphagrpo_serve.models.bagel.modeling import Routing

TOL = 1e-5  # float32, same arithmetic up to padding and cache concatenation order


def assert_close(a, b, tol=TOL, what=""):
    diff = (a - b).detach().abs()
    assert diff.max() <= tol, (
        f"{what}: max |diff| {float(diff.max()):.3g} at {tuple(torch.nonzero(diff == diff.max())[0].tolist())}"
    )


def bits(rows):
    return torch.tensor([[c == "1" for c in r] for r in rows])


def image(seed, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1


def contexts(bagel, seed=0):
    """Row 0: text, ViT image, clean VAE image, text; row 1: text only (shorter: padding)."""
    g = torch.Generator().manual_seed(seed)
    tok = bagel.tokens
    latent = torch.randn(16, 4, 4, generator=g)
    return [
        [Text(tok.wrap([10, 11, 12])), VitImage(image(seed)), VaeImage.from_latent(latent), Text(tok.wrap([13]))],
        [Text(tok.wrap([14, 15]))],
    ]


# ------------------------------------------------------------------------------------------------
# layout: positions and masks


def test_positions_and_attention_mask_match_a_hand_written_layout():
    special = SpecialTokens(start_of_image=90, end_of_image=91)
    # row 0: text [5, 6], an 8x16 image (2 ViT tokens of 8x8), text [7]; row 1: text [8]
    ctx = [[Text([5, 6]), VitImage(torch.zeros(3, 8, 16)), Text([7])], [Text([8])]]
    plan = plan_contexts(ctx, start_pos=[3, 0], special=special, vit_patch=8)
    # row 0 tokens: 5 6 <soi> v v <eoi> 7 ; the whole image segment shares position 5
    assert plan.positions.tolist() == [[3, 4, 5, 5, 5, 5, 6], [0, 0, 0, 0, 0, 0, 0]]
    assert plan.next_pos.tolist() == [7, 1]
    assert plan.valid.tolist() == [[True] * 7, [True] + [False] * 6]
    assert plan.gen.sum() == 0  # ViT tokens and markers take the understanding expert
    assert plan.text_ids == [5, 6, 90, 91, 7, 8]
    assert [(s.kind, s.start, s.length) for s in plan.spans[0]] == [("text", 0, 2), ("vit", 3, 2), ("text", 6, 1)]
    # previous cache: row 0 has 2 columns of which the second is padding
    cache_valid = torch.tensor([[True, False], [True, True]])
    mask = attention_mask(cache_valid, chunk_attend(plan), plan.valid)
    expected_row0 = bits(
        [  # cache | 5 6 s v v e 7
            "101000000",
            "101100000",
            "101111110",  # <soi> sees the whole image segment
            "101111110",
            "101111110",
            "101111110",
            "101111111",
        ]
    )
    expected_row1 = bits(
        [
            "111000000",
            "111100000",  # padding: seen by nobody; as a query it sees the real keys and itself
            "111010000",
            "111001000",
            "111000100",
            "111000010",
            "111000001",
        ]
    )
    assert torch.equal(mask[0], expected_row0), mask[0].int()
    assert torch.equal(mask[1], expected_row1), mask[1].int()


def test_vae_segment_takes_the_generation_expert_and_one_position():
    special = SpecialTokens(90, 91)
    ctx = [[VaeImage(torch.zeros(4, 64), (2, 2)), Text([1, 2])]]
    plan = plan_contexts(ctx, [0], special, vit_patch=8)
    assert plan.gen.tolist() == [[False, True, True, True, True, False, False, False]]
    assert plan.positions.tolist() == [[0, 0, 0, 0, 0, 0, 1, 2]]


# ------------------------------------------------------------------------------------------------
# Mixture-of-Transformers routing

UND_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def perturb(module, expert: str, layer: int = None):
    """A copy with one expert's weights (of one layer, or the final norm) changed."""
    m = copy.deepcopy(module)
    g = torch.Generator().manual_seed(7)
    for name, p in m.named_parameters():
        if layer is not None and not name.startswith(f"language_model.model.layers.{layer}."):
            continue
        if layer is None and not name.startswith("language_model.model.norm"):
            continue
        is_gen = "moe_gen" in name
        if (expert == "gen") == is_gen:
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=g))
    return m


def test_each_token_uses_only_its_experts_weights_inside_a_layer(tiny_bagel):
    layer = tiny_bagel.model.language_model.model.layers[1]
    x = torch.randn(2, 5, tiny_bagel.config.hidden_size, generator=torch.Generator().manual_seed(1))
    gen = torch.tensor([[False, True, True, False, True], [True, False, False, False, True]])
    routing = Routing(gen)
    m_und = perturb(tiny_bagel.model, "und", 1).language_model.model.layers[1]
    m_gen = perturb(tiny_bagel.model, "gen", 1).language_model.model.layers[1]

    def per_token(lay):
        a = lay.self_attn
        q, k, v = a.qkv(lay.input_norm(x, routing), routing)
        return torch.cat(
            [
                q.transpose(1, 2).flatten(2),
                k.transpose(1, 2).flatten(2),
                v.transpose(1, 2).flatten(2),
                a.out(x[..., : a.num_heads * a.head_dim], routing),
                lay.ffn(x, routing),
            ],
            dim=-1,
        )

    base, und, gen_ = per_token(layer), per_token(m_und), per_token(m_gen)
    assert_close(base[gen], und[gen], TOL, "generation tokens vs perturbed understanding expert")
    assert_close(base[~gen], gen_[~gen], TOL, "understanding tokens vs perturbed generation expert")
    assert (base[~gen] - und[~gen]).abs().amax(-1).min() > 1e-3  # every understanding token moved
    assert (base[gen] - gen_[gen]).abs().amax(-1).min() > 1e-3


def test_last_layer_mlp_and_final_norm_route_by_token_kind(tiny_bagel):
    """Past the last attention, nothing mixes tokens: velocities ignore the understanding MLP and
    final norm, text logits ignore the generation ones - and each does use its own."""
    model = tiny_bagel.model
    last = len(model.language_model.model.layers) - 1
    ctx = contexts(tiny_bagel)
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.8])

    def outputs(m):
        m.special_tokens = model.special_tokens
        pf = prefill(m, ctx)
        return velocity(m, pf.cache, x, t, (2, 2)), m.language_model.lm_head(pf.last_hidden())

    def mlp_perturbed(expert):
        m = copy.deepcopy(model)
        suffix = "mlp_moe_gen." if expert == "gen" else "mlp."
        with torch.no_grad():
            for n, p in m.named_parameters():
                if (
                    n.startswith(f"language_model.model.layers.{last}.{suffix}")
                    or n
                    == f"language_model.model.layers.{last}.post_attention_layernorm{'_moe_gen' if expert == 'gen' else ''}.weight"
                ):
                    p.mul_(1.5)
        return m

    v0, l0 = outputs(model)
    for m, what in ((mlp_perturbed("und"), "und"), (perturb(model, "und"), "und")):
        v1, l1 = outputs(m)
        assert_close(v0, v1, what=f"velocity vs {what} last-layer weights")  # TOL: copies may round differently
        assert (l0 - l1).abs().max() > 1e-3
    for m, what in ((mlp_perturbed("gen"), "gen"), (perturb(model, "gen"), "gen")):
        v1, l1 = outputs(m)
        assert_close(l0, l1, what=f"text logits vs {what} last-layer weights")
        assert (v0 - v1).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# cached == uncached


def uncached_velocity(model, ctx_row, x, t, grid):
    """The same packed sequence in one forward: context + (soi, noisy latents, eoi), no cache."""
    pf = prefill(model, [ctx_row + [VaeImage(x, grid, float(t))]])
    span = pf.spans[0][-1]
    return model.llm2vae(pf.hidden[0, span.start : span.start + span.length])


def test_cached_velocity_equals_the_uncached_forward(tiny_bagel):
    model = tiny_bagel.model
    ctx = contexts(tiny_bagel)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 64, generator=g)  # a 2x3 latent grid (32 x 48 px)
    t = torch.tensor([0.25, 0.9])
    pf = prefill(model, ctx)
    v = velocity(model, pf.cache, x, t, (2, 3))
    assert v.shape == (2, 6, 64)
    for b in range(2):
        assert_close(v[b], uncached_velocity(model, ctx[b], x[b], t[b], (2, 3)), what=f"row {b}")
    # G samples sharing one prefill (expanded cache) and stacked guidance contexts (concat)
    one = prefill(model, ctx[:1])
    xs = torch.randn(3, 6, 64, generator=g)
    v_shared = velocity(model, one.cache.expand(3), xs, torch.full((3,), 0.5), (2, 3))
    for i in range(3):
        assert_close(v_shared[i], uncached_velocity(model, ctx[0], xs[i], 0.5, (2, 3)), what=f"sample {i}")
    both = KVCache.concat([one.cache, prefill(model, ctx[1:]).cache])
    assert_close(velocity(model, both, x, t, (2, 3)), v, what="concat of caches")
    assert_close(velocity(model, pf.cache.index([1, 0]), x.flip(0), t.flip(0), (2, 3)), v.flip(0), what="index")


def test_cached_text_decoding_equals_the_full_forward(tiny_bagel):
    model = tiny_bagel.model
    ctx = contexts(tiny_bagel)
    steps = torch.tensor([[20, 21, 22], [23, 24, 25]])
    cache = prefill(model, ctx).cache
    logits = []
    for i in range(steps.shape[1]):
        lg, cache = text_step(model, cache, steps[:, i])
        logits.append(lg)
    assert cache.next_pos.tolist() == [5 + 1 + 1 + 3 + 3, 4 + 3]  # texts count up, each image one
    for b in range(2):
        full = prefill(model, [ctx[b] + [Text(steps[b])]])
        span = full.spans[0][-1]
        ref = model.language_model.lm_head(full.hidden[0, span.start : span.start + span.length])
        assert_close(torch.stack([lg[b] for lg in logits]), ref, what=f"row {b}")


def test_padding_and_batching_do_not_change_a_row(tiny_bagel):
    model = tiny_bagel.model
    ctx = contexts(tiny_bagel)
    both = prefill(model, ctx)
    for b in range(2):
        alone = prefill(model, [ctx[b]])
        n = int(alone.valid.sum())
        assert_close(both.hidden[b, :n], alone.hidden[0], what=f"row {b}")
        assert_close(both.last_hidden()[b], alone.last_hidden()[0], what=f"last hidden {b}")


def test_inactive_rows_leave_no_trace_in_the_cache(tiny_bagel):
    model = tiny_bagel.model
    cache = prefill(model, contexts(tiny_bagel)).cache
    _, c1 = text_step(model, cache, torch.tensor([30, 31]), active=torch.tensor([True, False]))
    assert c1.next_pos.tolist() == [cache.next_pos[0] + 1, cache.next_pos[1]]
    lg_skip, _ = text_step(model, c1, torch.tensor([32, 33]))
    lg_direct, _ = text_step(model, cache.index([1]), torch.tensor([33]))
    assert_close(lg_skip[1], lg_direct[0], what="row 1 after an inactive step")


def test_prefill_extends_an_existing_cache_like_one_long_prefill(tiny_bagel):
    model = tiny_bagel.model
    ctx = contexts(tiny_bagel)
    first = prefill(model, [c[:2] for c in ctx])
    rest = prefill(model, [c[2:] or [Text([5])] for c in ctx], cache=first.cache)
    whole = prefill(model, [ctx[0], ctx[1] + [Text([5])]])
    assert rest.cache.next_pos.tolist() == whole.cache.next_pos.tolist()
    assert_close(rest.last_hidden(), whole.last_hidden(), what="split prefill")


def test_everything_is_differentiable(tiny_bagel):
    model = tiny_bagel.model
    model.zero_grad(set_to_none=True)
    pf = prefill(model, contexts(tiny_bagel))
    v = velocity(model, pf.cache, torch.randn(2, 4, 64), torch.tensor([0.5, 0.5]), (2, 2))
    lg, _ = text_step(model, pf.cache, torch.tensor([3, 4]))
    (v.square().mean() + lg.logsumexp(-1).mean()).backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for must in (
        "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight",
        "language_model.model.layers.0.mlp.gate_proj.weight",
        "vit_model.vision_model.encoder.layers.0.mlp.fc1.weight",
        "connector.fc2.weight",
        "time_embedder.mlp.0.weight",
        "vae2llm.weight",
        "llm2vae.weight",
        "language_model.lm_head.weight",
        "language_model.model.norm_moe_gen.weight",
    ):
        assert must in names, must
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not model.latent_pos_embed.pos_embed.requires_grad and not model.vit_pos_embed.pos_embed.requires_grad
    model.zero_grad(set_to_none=True)


def test_velocity_checks_its_inputs(tiny_bagel):
    cache = prefill(tiny_bagel.model, contexts(tiny_bagel)).cache
    with pytest.raises(ValueError, match="rows"):
        velocity(tiny_bagel.model, cache, torch.zeros(3, 4, 64), 0.5, (2, 2))
    with pytest.raises(ValueError, match="position table"):
        velocity(tiny_bagel.model, cache, torch.zeros(2, 81, 64), 0.5, (9, 9))  # max_latent_size is 8


# ------------------------------------------------------------------------------------------------
# images and an end-to-end draw


def test_vit_images_of_different_sizes_batch_like_alone(tiny_bagel):
    from alphagrpo_serve.models.bagel import vit_embeds

    a, b = image(5, 32, 32), image(6, 16, 24)
    both = vit_embeds(tiny_bagel.model, [a, b])
    assert both[0].shape == (16, tiny_bagel.config.hidden_size) and both[1].shape == (6, tiny_bagel.config.hidden_size)
    assert_close(both[0], vit_embeds(tiny_bagel.model, [a])[0], what="32x32 image")
    assert_close(both[1], vit_embeds(tiny_bagel.model, [b])[0], what="16x24 image (padded in the batch)")


def test_resize_rule_and_preprocessing():
    import numpy as np

    from alphagrpo_serve.models.bagel import resize_dims, vit_pixels, vit_sizes

    # BAGEL-7B-MoT's ViT transform (980, 224, 14): 640x480 keeps its scale, rounded to multiples of 14
    assert resize_dims(640, 480, 980, 224, 14) == (644, 476)
    # a small image is scaled up until its short edge is 224
    assert resize_dims(100, 50, 980, 224, 14) == (448, 224)
    # VAE transform (1024, 512, 16): a 2:1 panorama ends at 1024 x 512
    assert resize_dims(2000, 1000, 1024, 512, 16) == (1024, 512)

    class Cfg:  # the official numbers come out of the official config values
        class vit:
            patch_size = 14

        vit_max_num_patch_per_side = 70

    assert vit_sizes(Cfg) == (980, 224, 14)
    px = vit_pixels(Cfg, np.full((30, 40, 3), 255, np.uint8))
    assert px.shape == (3, 224, 294) and torch.allclose(px, torch.ones_like(px), atol=1e-5)


def test_a_guided_ode_draw_end_to_end(tiny_bagel):
    """What the policy does: three contexts (full, no text = empty, no image = full here), a shared
    prefill, 4 guided Euler steps on a 32x32 canvas, VAE decode."""
    from alphagrpo_serve.models.bagel import cfg_active, cfg_combine, timestep_schedule, unpatchify

    model, tok = tiny_bagel.model, tiny_bagel.tokens
    with torch.no_grad():
        full = prefill(model, [[Text(tok.wrap(tiny_bagel.tokenizer.encode("a red circle")))]]).cache.expand(2)
        empty = KVCache.empty(model, 2)
        x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
        ts = timestep_schedule(5, shift=3.0)
        for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
            scale = 4.0 if cfg_active(t, (0.4, 1.0)) else 1.0
            v = velocity(model, KVCache.concat([full, empty]), x.repeat(2, 1, 1), t, (2, 2))
            x = x - cfg_combine(v[:2], v[2:], None, scale, 1.0, "global") * (t - t_next)
        img = tiny_bagel.vae.decode(unpatchify(x, (2, 2), 2, 16))
    assert img.shape == (2, 32, 32, 3) and img.dtype == torch.uint8
    assert not torch.equal(img[0], img[1])  # the two samples started from different noise
