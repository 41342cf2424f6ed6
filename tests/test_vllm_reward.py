"""The vllm tier: the OpenAI-compatible decomposer and verifier against a real vLLM server (the CPU
build, in its own venv .venv-vllm made by `make vllm-env`) serving tiny random models built here
(tools/make_tiny_vlm.py). The models' answers are meaningless: these tests check the plumbing -
structured output that validates, scores equal to the returned log-probs, concurrency, the
RewardService path, and a stopped server's error. ALPHAGRPO_SKIP_VLLM=1 skips the tier explicitly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import httpx
import pytest

from alphagrpo_serve.reward.openai_backend import BackendError, Endpoint, OpenAIDecomposer, OpenAIVerifier, png_data_url
from alphagrpo_serve.reward.openai_parsing import yes_no_score
from alphagrpo_serve.reward.types import Question
from alphagrpo_serve.shapes.world import Obj, Scene, render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from vllm_local import VENV_PY, VLLMServer, free_port, make_models  # noqa: E402

from serving import wait_for_line  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("ALPHAGRPO_SKIP_VLLM") == "1", reason="ALPHAGRPO_SKIP_VLLM=1")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not os.path.exists(VENV_PY):
        pytest.fail("the vLLM venv is missing: run `make vllm-env` (the README's test command does)")
    root = tmp_path_factory.mktemp("vllm")
    make_models(str(root))
    llm = VLLMServer(str(root / "llm"), "tiny-llm", str(root / "llm.log"), 4096)
    vlm = VLLMServer(str(root / "vlm"), "tiny-blip2", str(root / "vlm.log"), 512)
    with open(root / "vlm" / "config.json") as f:
        vlm.vocab_size = json.load(f)["text_config"]["vocab_size"]
    try:
        yield llm.wait(), vlm.wait()
    finally:
        llm.stop()
        vlm.stop()


def scene_image():
    return render(Scene([Obj("circle", "red", 10, 12, 6), Obj("square", "blue", 22, 20, 5)], canvas=32))


def test_decomposer_structured_output_validates(servers):
    llm, _ = servers
    dec = OpenAIDecomposer(Endpoint(llm.url, llm.name, concurrency=4, timeout_s=120), attempts=3)
    prompts = [
        "a red circle",
        "two blue squares",
        "a green triangle above a yellow circle",
        "a purple shape",
        "three orange triangles",
        "a blue circle to the left of a red square",
    ]
    out = dec.decompose(prompts)
    assert len(out) == len(prompts)
    for qs in out:  # validate_decomposition already ran; check what it promises
        assert any(q.kind == "semantic" for q in qs)
        assert all(
            q.text.endswith("?") and q.text.split()[0] in ("Is", "Are", "Does", "Do", "Can", "Has", "Have") for q in qs
        )
    assert dec.chat.requests >= len(prompts)
    assert set(dec.memory) == set(prompts)


def test_verifier_scores_equal_the_returned_logprobs(servers):
    _, vlm = servers
    img = scene_image()
    qs = [
        Question("q0", "Is there a red circle?", "semantic", "Existence"),
        Question("q1", "Are there two shapes?", "semantic", "Count"),
        Question("q2", "Are the edges clean?", "quality", "Geometry"),
    ]
    # top_logprobs over the whole (tiny) vocabulary, so yes and no are always among them (more than
    # the vocabulary crashes vLLM 0.32's sampler)
    vocab = vlm.vocab_size
    ver = OpenAIVerifier(Endpoint(vlm.url, vlm.name, concurrency=8), top_logprobs=vocab)
    answers = ver.verify([img, img[::-1].copy()], [qs, qs])
    assert ver.failures == 0 and ver.fallbacks == 0
    # an independent request for the same (image, question): the score is P(yes) / (P(yes) + P(no))
    body = {
        "model": vlm.name,
        "temperature": 0.0,
        "max_tokens": 3,
        "logprobs": True,
        "top_logprobs": vocab,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(img)}},
                    {"type": "text", "text": f"{ver.instructions}\nQuestion: {qs[0].text}"},
                ],
            }
        ],
    }
    r = httpx.post(f"{vlm.url}/chat/completions", json=body, timeout=60).json()
    top = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    p_yes = sum(math.exp(t["logprob"]) for t in top if t["token"].strip().lower() == "yes")
    p_no = sum(math.exp(t["logprob"]) for t in top if t["token"].strip().lower() == "no")
    assert p_yes > 0 and p_no > 0
    assert answers[0][0].score == pytest.approx(p_yes / (p_yes + p_no), abs=1e-5)
    assert yes_no_score(top) == pytest.approx(answers[0][0].score, abs=1e-9)
    for a in answers[0] + answers[1]:
        assert 0.0 <= a.score <= 1.0 and a.detail == "logprobs"


def test_verifier_default_top5_reports_fallbacks_and_failures_and_runs_concurrently(servers):
    _, vlm = servers
    qs = [Question(f"q{i}", f"Is shape {i} visible?", "semantic", "Existence") for i in range(16)]
    ver = OpenAIVerifier(Endpoint(vlm.url, vlm.name, concurrency=8))
    t0 = time.perf_counter()
    ans = ver.verify([scene_image()], [qs])[0]
    t_conc = time.perf_counter() - t0
    scored = sum(1 for a in ans if a.score is not None and a.detail == "logprobs")
    assert scored + ver.fallbacks + ver.failures == len(qs)  # every question accounted for, none silently scored
    assert all(a.failed == (a.score is None) for a in ans)
    ser = OpenAIVerifier(Endpoint(vlm.url, vlm.name, concurrency=1))
    t0 = time.perf_counter()
    ser.verify([scene_image()], [qs])
    t_ser = time.perf_counter() - t0
    assert t_conc < t_ser, (t_conc, t_ser)  # requests overlapped (vLLM batches them)


def test_reward_service_with_the_openai_backend(servers, tmp_path):
    llm, vlm = servers
    from alphagrpo_serve.client import Client

    port = free_port()
    cache = tmp_path / "decompositions.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "alphagrpo_serve.cli",
        "serve",
        "--port",
        str(port),
        "--reward",
        "openai",
        "--decomposer-url",
        llm.url,
        "--decomposer-model",
        llm.name,
        "--verifier-url",
        vlm.url,
        "--verifier-model",
        vlm.name,
        "--decomposition-cache",
        str(cache),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = wait_for_line(proc, "listening on")
        assert seen and "listening on" in seen[-1], "".join(seen)
        with Client(f"127.0.0.1:{port}", timeout=120) as c:
            res = c.verify(["a red circle"], [scene_image()])[0]
            qs = c.decompose(["a red circle"])[0]
        assert res.answers and len(res.answers) == len(qs)
        assert 0.0 <= res.reward <= 1.0 and res.failed == sum(a.failed for a in res.answers)
        assert "a red circle" in cache.read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_stopped_server_gives_a_clear_error(servers):
    llm, vlm = servers
    llm.stop()
    dec = OpenAIDecomposer(Endpoint(llm.url, llm.name, retries=1, backoff_s=0.05, timeout_s=5))
    with pytest.raises(BackendError, match=rf"127\.0\.0\.1:{llm.port}.*tiny-llm.*failed after 2 attempts"):
        dec.decompose(["a red circle"])
    vlm.stop()
    ver = OpenAIVerifier(Endpoint(vlm.url, vlm.name, retries=0, timeout_s=5))
    ans = ver.verify([scene_image()], [[Question("q0", "Is it red?", "semantic", "Attribute")]])[0]
    assert (
        ans[0].failed
        and ans[0].score is None
        and f"127.0.0.1:{vlm.port}" in ans[0].detail
        and "tiny-blip2" in ans[0].detail
    )
