"""Independent check of the BAGEL core against vLLM's BagelForConditionalGeneration: the same tiny
random checkpoint (tools/make_tiny_bagel.py) served by a real vLLM CPU server (.venv-vllm, float32,
enforce_eager) on 127.0.0.1, next-token log-probs over the whole vocabulary compared at every
prompt position and for the next token.

vLLM implements BAGEL's understanding path with plain Qwen2 conventions: a prompt's image
placeholder expands to vit_max_num_patch_per_side^2 tokens that take consecutive position ids
and, on the CPU attention backend, causal attention. Official BAGEL gives all tokens of an image one
position id and full attention inside the image (our prefill). So the text prompt goes through our
`prefill`, and the image prompt through our `forward_embeds` with vLLM's positions and causal mask:
every weight (both towers, connector, position tables, qk-norm, GQA, RoPE, untied head) is checked;
BAGEL's image layout itself is checked in test_bagel_core.py. ALPHAGRPO_SKIP_VLLM=1 skips the tier.
"""

from __future__ import annotations

import base64
import io
import os
import sys

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from alphagrpo_serve.models.bagel import Text, forward_embeds, prefill, to_pixels, vit_embeds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from vllm_local import VENV_PY, VLLMServer  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("ALPHAGRPO_SKIP_VLLM") == "1", reason="ALPHAGRPO_SKIP_VLLM=1")

TOL = 1e-3  # log-prob units; observed about 2e-6 (float32 on both sides, different kernels)


@pytest.fixture(scope="module")
def server(tiny_bagel_dir, tmp_path_factory):
    if not os.path.exists(VENV_PY):
        pytest.fail("the vLLM venv is missing: run `make vllm-env` (the README's test command does)")
    log = tmp_path_factory.mktemp("vllm_bagel") / "server.log"
    srv = VLLMServer(tiny_bagel_dir, "tiny-bagel", str(log), 512)
    try:
        yield srv.wait()
    finally:
        srv.stop()


def our_logprobs(model, hidden):
    return torch.log_softmax(model.language_model.lm_head(hidden).double(), dim=-1)


def compare(ours, prompt_ids, prompt_logprobs, next_top):
    """ours [T, V]: row i predicts token i + 1. prompt_logprobs: vLLM's per-position dicts
    {token id: {logprob}} (None first); next_top: {token id: logprob} after the prompt."""
    worst = 0.0
    for i in range(1, len(prompt_ids)):
        entries = prompt_logprobs[i]
        assert len(entries) >= ours.shape[1], f"position {i}: only {len(entries)} log-probs returned"
        for tok, e in entries.items():
            worst = max(worst, abs(ours[i - 1, int(tok)].item() - e["logprob"]))
    for tok, lp in next_top.items():
        worst = max(worst, abs(ours[-1, tok].item() - lp))
    assert worst <= TOL, f"max |our log-prob - vLLM's| = {worst:.3g}"
    return worst


def test_text_prompt_logprobs_match_vllm(server, tiny_bagel):
    tok, model = tiny_bagel.tokenizer, tiny_bagel.model
    V = tiny_bagel.config.llm.vocab_size
    ids = tiny_bagel.tokens.wrap(tok.encode("user\nDraw a red circle above a blue square.")) + [tiny_bagel.tokens.bos]
    body = {
        "model": server.name,
        "prompt": ids,
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": V,
        "prompt_logprobs": V,
        "return_tokens_as_token_ids": True,
    }
    r = httpx.post(f"{server.url}/completions", json=body, timeout=120).json()
    choice = r["choices"][0]
    next_top = {int(k.split(":")[1]): v for k, v in choice["logprobs"]["top_logprobs"][0].items()}
    assert len(next_top) == V
    with torch.no_grad():
        pf = prefill(model, [[Text(ids)]])
        ours = our_logprobs(model, pf.hidden[0])
    worst = compare(ours, ids, choice["prompt_logprobs"], next_top)
    print(f"text prompt: {len(ids)} positions x {V} tokens, max |diff| {worst:.2e}")


def png_data_url(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_and_text_prompt_logprobs_match_vllm(server, tiny_bagel):
    model, cfg = tiny_bagel.model, tiny_bagel.config
    V = cfg.llm.vocab_size
    side = cfg.vit.image_size  # vLLM resizes to this; the image already has it, so nothing resamples
    img = (np.random.RandomState(1).rand(side, side, 3) * 255).astype(np.uint8)
    body = {
        "model": server.name,
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": V,
        "prompt_logprobs": V,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(img)}},
                    {"type": "text", "text": "What shape is it?"},
                ],
            }
        ],
    }
    r = httpx.post(f"{server.url}/chat/completions", json=body, timeout=120).json()
    assert "choices" in r, r
    ids = r["prompt_token_ids"]
    pad = tiny_bagel.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    at = [i for i, t in enumerate(ids) if t == pad]
    assert len(at) == cfg.vit_max_num_patch_per_side**2
    assert ids[at[0] - 1] == tiny_bagel.tokens.start_of_image and ids[at[-1] + 1] == tiny_bagel.tokens.end_of_image
    top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    next_top = {int(t["token"].split(":")[1]): t["logprob"] for t in top}
    T = len(ids)
    with torch.no_grad():  # vLLM's conventions: consecutive positions, causal everywhere
        emb = model.language_model.model.embed_tokens(torch.tensor(ids))
        emb[torch.tensor(at)] = vit_embeds(model, [to_pixels(img)])[0]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        hidden, _ = forward_embeds(
            model,
            emb[None],
            torch.arange(T)[None],
            torch.zeros(1, T, dtype=torch.bool),
            causal[None],
            torch.ones(1, T, dtype=torch.bool),
        )
        ours = our_logprobs(model, hidden[0])
    worst = compare(ours, ids, r["prompt_logprobs"], next_top)
    print(f"image + text prompt: {T} positions ({len(at)} image) x {V} tokens, max |diff| {worst:.2e}")
