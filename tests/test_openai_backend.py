"""The OpenAI-compatible reward client against a scripted HTTP server on 127.0.0.1 (stdlib): retries
and their limits, errors that name server and model, concurrency limits, invalid decompositions
retried then reported, yes/no scores from log-probs with fallbacks, the disk cache and resume.
(tests/test_vllm_reward.py runs the same code against a real vLLM server.)"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from alphagrpo_serve.reward.dvreward import DVReward
from alphagrpo_serve.reward.openai_backend import (
    BackendError,
    DecompositionFailed,
    Endpoint,
    OpenAIDecomposer,
    OpenAIVerifier,
    decompose_file,
    read_questions_jsonl,
)
from alphagrpo_serve.reward.types import Question

GOOD = {
    "semantic": [{"question": "Is there a red circle?", "tag": "Existence"}],
    "quality": [{"question": "Are the edges clean?", "aspect": "Geometry"}],
}


class Scripted:
    """An HTTP server whose /v1/chat/completions answers come from a function of the request."""

    def __init__(self, respond, delay=0.0):
        self.respond, self.delay = respond, delay
        self.requests, self.inflight, self.max_inflight = [], 0, 0
        lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.requests.append(body)
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                    n = len(outer.requests)
                time.sleep(outer.delay)
                status, payload = outer.respond(n, body)
                with lock:
                    outer.inflight -= 1
                data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def chat(content, top=None):
    choice = {"message": {"role": "assistant", "content": content}}
    if top is not None:
        choice["logprobs"] = {
            "content": [{"token": top[0]["token"] if top else content, "logprob": 0.0, "top_logprobs": top}]
        }
    return {"choices": [choice]}


def ep(url, **kw):
    return Endpoint(url, "tiny-model", **dict(dict(retries=3, backoff_s=0.01, timeout_s=5), **kw))


def test_retries_transient_errors_then_succeeds():
    with Scripted(lambda n, b: (503, {"error": "busy"}) if n <= 2 else (200, chat(json.dumps(GOOD)))) as s:
        dec = OpenAIDecomposer(ep(s.url))
        qs = dec.decompose(["a red circle"])[0]
    assert [q.text for q in qs] == ["Is there a red circle?", "Are the edges clean?"]
    assert dec.chat.retried == 2 and len(s.requests) == 3
    req = s.requests[-1]
    assert req["model"] == "tiny-model" and req["response_format"]["type"] == "json_schema"


def test_errors_name_the_server_and_model():
    with Scripted(lambda n, b: (400, {"error": "bad request: no such model"})) as s:
        with pytest.raises(BackendError, match=r"127\.0\.0\.1.*tiny-model.*HTTP 400"):
            OpenAIDecomposer(ep(s.url)).decompose(["a red circle"])
        assert len(s.requests) == 1  # a client error is not retried
    with Scripted(lambda n, b: (503, {"error": "busy"})) as s:
        with pytest.raises(BackendError, match="failed after 3 attempts.*HTTP 503"):
            OpenAIDecomposer(ep(s.url, retries=2)).decompose(["a red circle"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BackendError, match=f"127.0.0.1:{port}.*tiny-model.*ConnectError"):
        OpenAIDecomposer(ep(f"http://127.0.0.1:{port}/v1", retries=1)).decompose(["a red circle"])
    with pytest.raises(ValueError, match="http"):
        Endpoint("127.0.0.1:8000", "m")


def test_invalid_decompositions_are_retried_then_reported():
    outputs = iter(
        [
            "not json",
            json.dumps({"semantic": [{"question": "red circle", "tag": "Existence"}], "quality": []}),
            json.dumps(GOOD),
        ]
    )
    with Scripted(lambda n, b: (200, chat(next(outputs)))) as s:
        dec = OpenAIDecomposer(ep(s.url), attempts=3)
        assert len(dec.decompose(["a red circle"])[0]) == 2
        assert dec.invalid_outputs == 2
    with Scripted(lambda n, b: (200, chat('{"semantic": [], "quality": []}'))) as s:
        dec = OpenAIDecomposer(ep(s.url), attempts=2)
        with pytest.raises(DecompositionFailed, match="'a red circle'.*2 invalid outputs.*no semantic question"):
            dec.decompose(["a red circle"])
        assert len(s.requests) == 2


def test_verifier_scores_from_logprobs_with_fallback_and_failure():
    lp = {
        "yes": math.log(0.5),
        " Yes": math.log(0.1),
        "No": math.log(0.2),
        " maybe": math.log(0.1),
        "x": math.log(0.05),
    }

    def respond(n, body):
        q = body["messages"][0]["content"][1]["text"]
        assert body["logprobs"] is True and body["top_logprobs"] >= 5 and body["temperature"] == 0.0
        assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
        if "first" in q:
            return 200, chat("yes", [{"token": t, "logprob": v} for t, v in lp.items()])
        if "second" in q:  # neither yes nor no among the top log-probs: the parsed answer
            return 200, chat("No, it is not.", [{"token": "The", "logprob": -0.1}])
        return 200, chat("purple", [{"token": "purple", "logprob": -0.1}])

    qs = [
        Question("q0", "Is this the first?", "semantic", "Existence"),
        Question("q1", "Is this the second?", "semantic", "Count"),
        Question("q2", "Is this the third?", "quality", "Geometry"),
    ]
    img = np.zeros((16, 16, 3), np.uint8)
    with Scripted(respond) as s:
        ver = OpenAIVerifier(ep(s.url))
        ans = ver.verify([img], [qs])[0]
    assert ans[0].score == pytest.approx((0.5 + 0.1) / (0.5 + 0.1 + 0.2)) and ans[0].detail == "logprobs"
    assert ans[1].score == 0.0 and ans[1].detail.startswith("fallback")
    assert ans[2].score is None and ans[2].failed and "neither yes nor no" in ans[2].detail
    assert ver.fallbacks == 1 and ver.failures == 1

    class Fixed:
        def decompose(self, prompts):
            return [qs for _ in prompts]

    with Scripted(respond) as s:
        res = DVReward(Fixed(), OpenAIVerifier(ep(s.url)))(["p"], [img])[0]
    assert res.failed == 1  # the failed question is excluded from Q (none left: Q = 1) and counted
    S = (0.6 / 0.8 + 0.0) / 2
    assert res.semantic == pytest.approx(S) and res.quality == 1.0 and res.reward == pytest.approx(math.sqrt(S))


def test_concurrency_is_bounded():
    with Scripted(lambda n, b: (200, chat("yes", [{"token": "yes", "logprob": 0.0}])), delay=0.05) as s:
        ver = OpenAIVerifier(ep(s.url, concurrency=3))
        qs = [Question(f"q{i}", f"Is it {i}?", "semantic", "Existence") for i in range(12)]
        ans = ver.verify([np.zeros((8, 8, 3), np.uint8)], [qs])[0]
    assert all(a.score == 1.0 for a in ans)
    assert 2 <= s.max_inflight <= 3, s.max_inflight


def test_disk_cache_and_resume(tmp_path):
    out = tmp_path / "q.jsonl"
    with Scripted(
        lambda n, b: (200, chat(json.dumps(GOOD)) if "bad" not in b["messages"][1]["content"] else chat("{}"))
    ) as s:
        dec = OpenAIDecomposer(ep(s.url), attempts=2)
        ok, skipped, failed = asyncio.run(decompose_file(dec, ["a", "b", "bad one"], str(out), progress=False))
        assert (ok, skipped, len(failed)) == (2, 0, 1) and "bad one" in failed[0][1]
        n = len(s.requests)
        dec2 = OpenAIDecomposer(ep(s.url), attempts=1)
        ok, skipped, failed = asyncio.run(decompose_file(dec2, ["a", "b", "c"], str(out), progress=False))
        assert (ok, skipped) == (1, 2) and len(s.requests) == n + 1  # only "c" was asked
    assert sorted(read_questions_jsonl(str(out))) == ["a", "b", "c"]
    cached = OpenAIDecomposer(ep("http://127.0.0.1:9/v1"), cache_path=str(out))  # nothing listens: cache only
    assert cached.decompose(["b"])[0][0].text == "Is there a red circle?"
