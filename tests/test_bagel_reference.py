"""The core against a naive reference written in this test from the official formulas: one
sequence, token by token - each token picks its expert's weights by name, RoPE and attention are
spelled out, masks follow BAGEL's rules (causal text, full inside an image, one position per
image), the DiT timestep embedding and the latent embedding are recomputed by hand. It checks the
generation path (which vLLM does not implement) and BAGEL's image layout."""

from __future__ import annotations

import math

import torch

from alphagrpo_serve.models.bagel import KVCache, Text, VaeImage, build_model, prefill, velocity


def rms(x, w, eps):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, pos, theta):
    """x [n_heads, d] at position pos: rotate-half RoPE."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv])
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * torch.cos(ang) + torch.cat([-x2, x1], -1) * torch.sin(ang)


def timestep_embedding(sd, t):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    f = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
    h = sd["time_embedder.mlp.0.weight"] @ f + sd["time_embedder.mlp.0.bias"]
    h = h * torch.sigmoid(h)
    return sd["time_embedder.mlp.2.weight"] @ h + sd["time_embedder.mlp.2.bias"]


def reference_hidden(bagel, tokens):
    """tokens: list of dicts {emb [D], pos, gen, seg, full} in sequence order -> final hidden [n, D]."""
    cfg = bagel.config.llm
    sd = {k: v.double() for k, v in bagel.model.state_dict().items()}
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
    x = torch.stack([t["emb"] for t in tokens]).double()
    n = len(tokens)
    sees = [
        [j <= i or (tokens[i]["full"] and tokens[j]["full"] and tokens[i]["seg"] == tokens[j]["seg"]) for j in range(n)]
        for i in range(n)
    ]
    for layer in range(cfg.num_hidden_layers):
        p = f"language_model.model.layers.{layer}."

        def w(name, i):
            gen = tokens[i]["gen"]
            if name.startswith("mlp."):
                return sd[p + name.replace("mlp.", "mlp_moe_gen." if gen else "mlp.")]
            base, _, leaf = name.rpartition(".")
            return sd[p + base + ("_moe_gen" if gen else "") + "." + leaf]

        q, k, v = [], [], []
        for i in range(n):
            h = rms(x[i], w("input_layernorm.weight", i), eps)
            qi = (w("self_attn.q_proj.weight", i) @ h + w("self_attn.q_proj.bias", i)).reshape(H, d)
            ki = (w("self_attn.k_proj.weight", i) @ h + w("self_attn.k_proj.bias", i)).reshape(Hkv, d)
            vi = (w("self_attn.v_proj.weight", i) @ h + w("self_attn.v_proj.bias", i)).reshape(Hkv, d)
            qi = rope(rms(qi, w("self_attn.q_norm.weight", i), eps), tokens[i]["pos"], theta)
            ki = rope(rms(ki, w("self_attn.k_norm.weight", i), eps), tokens[i]["pos"], theta)
            q.append(qi), k.append(ki), v.append(vi)
        new_x = []
        for i in range(n):
            heads = []
            for hd in range(H):
                g = hd // (H // Hkv)
                idx = [j for j in range(n) if sees[i][j]]
                scores = torch.stack([q[i][hd] @ k[j][g] for j in idx]) / math.sqrt(d)
                a = torch.softmax(scores, 0)
                heads.append(sum(a[m] * v[j][g] for m, j in enumerate(idx)))
            xi = x[i] + w("self_attn.o_proj.weight", i) @ torch.cat(heads)
            h = rms(xi, w("post_attention_layernorm.weight", i), eps)
            up = w("mlp.up_proj.weight", i) @ h
            gate = w("mlp.gate_proj.weight", i) @ h
            new_x.append(xi + w("mlp.down_proj.weight", i) @ (gate * torch.sigmoid(gate) * up))
        x = torch.stack(new_x)
    return torch.stack(
        [
            rms(
                x[i],
                sd[
                    "language_model.model.norm_moe_gen.weight"
                    if tokens[i]["gen"]
                    else "language_model.model.norm.weight"
                ],
                eps,
            )
            for i in range(n)
        ]
    )


def test_velocity_and_logits_match_a_token_by_token_reference(tiny_bagel):
    model, tok = tiny_bagel.model, tiny_bagel.tokens
    sd = {k: v.double() for k, v in model.state_dict().items()}
    emb = sd["language_model.model.embed_tokens.weight"]
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 64, generator=g)  # a clean context image on a 2x2 grid (timestep 0)
    x_t = torch.randn(6, 64, generator=g)  # the query: a 2x3 grid at t = 0.35
    t = 0.35
    max_lat = tiny_bagel.config.max_latent_size

    def latent_tokens(lat, grid, tt, pos, seg):
        ids = [r * max_lat + c for r in range(grid[0]) for c in range(grid[1])]
        te = timestep_embedding(sd, tt)
        return [
            dict(
                emb=sd["vae2llm.weight"] @ lat[i].double()
                + sd["vae2llm.bias"]
                + te
                + sd["latent_pos_embed.pos_embed"][ids[i]],
                pos=pos,
                gen=True,
                seg=seg,
                full=True,
            )
            for i in range(len(ids))
        ]

    def marker(tid, pos, seg):
        return dict(emb=emb[tid], pos=pos, gen=False, seg=seg, full=True)

    def text(ids, pos0, seg):
        return [dict(emb=emb[i], pos=pos0 + j, gen=False, seg=seg, full=False) for j, i in enumerate(ids)]

    prompt = tok.wrap([10, 11, 12])  # positions 0..4
    edit = tok.wrap([13])  # after the image: positions 6..8
    seq = text(prompt, 0, 0)
    seq += (
        [marker(tok.start_of_image, 5, 1)] + latent_tokens(clean, (2, 2), 0.0, 5, 1) + [marker(tok.end_of_image, 5, 1)]
    )
    seq += text(edit, 6, 2)
    n_ctx = len(seq)
    seq += [marker(tok.start_of_image, 9, 3)] + latent_tokens(x_t, (2, 3), t, 9, 3) + [marker(tok.end_of_image, 9, 3)]
    ref = reference_hidden(tiny_bagel, seq)
    ref_v = ref[n_ctx + 1 : n_ctx + 7] @ sd["llm2vae.weight"].T + sd["llm2vae.bias"]
    ref_logits = ref[n_ctx - 1] @ sd["language_model.lm_head.weight"].T

    with torch.no_grad():
        pf = prefill(model, [[Text(prompt), VaeImage(clean, (2, 2)), Text(edit)]])
        v = velocity(model, pf.cache, x_t[None], t, (2, 3))[0]
        logits = model.language_model.lm_head(pf.last_hidden())[0]
    assert pf.cache.next_pos.tolist() == [9]
    # float32 against float64: observed about 1e-6
    assert (v.double() - ref_v).abs().max() < 2e-5, float((v.double() - ref_v).abs().max())
    assert (logits.double() - ref_logits).abs().max() < 2e-5, float((logits.double() - ref_logits).abs().max())


def test_random_build_has_the_checkpoint_tables(tiny_bagel):
    """build_model + init_random (tests without files) writes the same sin-cos tables as the tiny
    checkpoint, which vLLM recomputes from the official formula (the vLLM tier matched them)."""
    m = build_model(tiny_bagel.config)
    m.init_random(torch.Generator().manual_seed(0))
    for name in ("vit_pos_embed", "latent_pos_embed"):
        got = getattr(m, name).pos_embed
        want = getattr(tiny_bagel.model, name).pos_embed
        assert torch.allclose(got, want, atol=1e-6), name
    m.special_tokens = tiny_bagel.model.special_tokens
    v = velocity(m, KVCache.empty(m, 1), torch.zeros(1, 4, 64), 0.5, (2, 2))
    assert v.shape == (1, 4, 64) and torch.isfinite(v).all()
