"""Verifier throughput: 200 (prompt, image) pairs from ShapesWorld through the embedded detector
verifier and through the OpenAI-compatible verifier against a local vLLM (CPU build, tiny random
BLIP-2 from tools/make_tiny_vlm.py) at concurrency 1, 8 and 32. Both answer the same questions (the
embedded rule decomposer's). Appends a table to benchmarks/RESULTS.md.

    python benchmarks/reward_openai.py [--pairs 200] [--no-write]

Needs `make vllm-env`. The random model's answers are meaningless: this measures the plumbing
(HTTP, PNG data URLs, request concurrency, vLLM's batching on 1 CPU core), not judgement. Two
settings: top_logprobs 5 (production; the random model rarely puts yes/no there, so most answers
fail, but every request makes the full round trip) and the whole vocabulary (every answer scored).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))

from vllm_local import VLLMServer, make_models  # noqa: E402

from alphagrpo_serve.reward.embedded import DetectorVerifier, ShapesDecomposer  # noqa: E402
from alphagrpo_serve.reward.openai_backend import Endpoint, OpenAIVerifier  # noqa: E402
from alphagrpo_serve.shapes.evaluate import ground_truth_images, load_heldout  # noqa: E402
from results import append  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    rows = load_heldout()[: args.pairs]
    prompts = [r["prompt"] for r in rows]
    images = ground_truth_images(prompts, seeds=[r["seed"] for r in rows])
    questions = ShapesDecomposer().decompose(prompts)
    nq = sum(len(q) for q in questions)
    out = os.path.join(HERE, "out")
    os.makedirs(out, exist_ok=True)
    root = os.path.join(out, "tiny_vlm")
    make_models(root)
    table = [
        "| verifier | concurrency | pairs | questions (requests) | seconds | pairs/s | requests/s | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    emb = DetectorVerifier()
    t = time.perf_counter()
    emb.verify(images, questions)
    dt = time.perf_counter() - t
    table.append(
        f"| embedded (detector) | - | {len(prompts)} | {nq} | {dt:.3f} | {len(prompts) / dt:.0f} | {nq / dt:.0f} | 0 |"
    )
    import json

    with open(os.path.join(root, "vlm", "config.json")) as f:
        vocab = json.load(f)["text_config"]["vocab_size"]  # top log-probs over the whole vocabulary: yes/no always
        # among them, so every question runs the full scoring path (a real MLLM puts them in its top 5)
    srv = VLLMServer(os.path.join(root, "vlm"), "tiny-blip2", os.path.join(out, "vllm_bench.log")).wait()
    try:
        OpenAIVerifier(Endpoint(srv.url, srv.name, concurrency=8), top_logprobs=vocab).verify(images[:4], questions[:4])
        for top in (5, vocab):
            for conc in (1, 8, 32):
                ver = OpenAIVerifier(Endpoint(srv.url, srv.name, concurrency=conc, timeout_s=300), top_logprobs=top)
                t = time.perf_counter()
                ans = ver.verify(images, questions)
                dt = time.perf_counter() - t
                failed = sum(a.failed for aa in ans for a in aa)
                table.append(
                    f"| OpenAI API -> vLLM CPU, tiny BLIP-2, top_logprobs {top} | {conc} | {len(prompts)} | {nq} | "
                    f"{dt:.2f} | {len(prompts) / dt:.1f} | {nq / dt:.1f} | {failed} |"
                )
                print(table[-1], flush=True)
    finally:
        srv.stop()
    text = "\n".join(table)
    print(text)
    if not args.no_write:
        append(os.path.join(HERE, "RESULTS.md"), "Verifier throughput: embedded vs OpenAI-compatible (vLLM CPU)", text)


if __name__ == "__main__":
    main()
