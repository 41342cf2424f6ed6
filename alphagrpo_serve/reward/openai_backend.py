"""DVReward on OpenAI-compatible servers (vLLM, SGLang, ...): an LLM decomposes each prompt into
yes/no questions through chat completions with JSON-schema structured output, and an MLLM answers
each (image, question) pair; a question's score is read off the first answer token's log-probs.

Both run requests concurrently on asyncio (httpx) with a concurrency limit, a timeout per request,
and retries with exponential backoff on transient errors (connection errors, timeouts, HTTP 408,
409, 429 and 5xx). Errors name the server and the model. Invalid decompositions are asked again up
to `attempts` times; a prompt that never decomposes is reported as failed. A question whose answer
finally fails is marked failed in the breakdown (excluded from S and Q, counted), never scored.

The instruction texts below are the project's own; docs/openai_reward.md explains them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .dvreward import DVReward
from .openai_parsing import DECOMPOSITION_SCHEMA, score_answer, validate_decomposition
from .types import QUALITY_TAGS, SEMANTIC_TAGS, Answer, Question

DECOMPOSE_INSTRUCTIONS = (
    "You turn an image-generation prompt into a checklist of atomic yes/no questions that a viewer can answer "
    "by looking at one image. Write two lists. 'semantic': one question per requirement of the prompt "
    "(each object that must exist, each count, colour or other attribute, each action, each spatial relation, "
    "any text that must appear, anything that must be absent, the style, setting and viewpoint when the prompt "
    "asks for them), tagged with one of: " + ", ".join(SEMANTIC_TAGS) + ". 'quality': a few questions about "
    "how well the image is made whatever it shows, tagged with one of: " + ", ".join(QUALITY_TAGS) + ". "
    "Every question must be answerable with yes or no, must start with a word such as Is, Are, Does, Do, Can "
    "or Has, must end with a question mark, and a 'yes' must always mean the image is better. Do not repeat a "
    "requirement. Answer with the JSON object only."
)
VERIFY_INSTRUCTIONS = "Look at the image and answer the question with a single word: yes or no."

TRANSIENT_STATUS = {408, 409, 429, 500, 502, 503, 504}


class BackendError(RuntimeError):
    """A request that finally failed; the message names the server and the model."""


@dataclass
class Endpoint:
    """One OpenAI-compatible server and model. url: the API base, e.g. http://127.0.0.1:8000/v1."""

    url: str
    model: str
    api_key: Optional[str] = None
    concurrency: int = 16  # requests in flight at once
    timeout_s: float = 60.0  # per request
    retries: int = 3  # extra attempts on transient errors
    backoff_s: float = 0.5  # first retry delay; doubles each time (with jitter)

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if not self.model:
            raise ValueError("model must be named")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        self.url = self.url.rstrip("/")

    def __str__(self) -> str:
        return f"{self.url} (model {self.model!r})"


class ChatClient:
    """POST {url}/chat/completions with a semaphore, timeout, and retries on transient errors.

    An httpx.AsyncClient belongs to one event loop, so one is made per loop that uses this client."""

    def __init__(self, endpoint: Endpoint):
        self.ep = endpoint
        self._clients: Dict[int, tuple] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.retried = 0

    def _for_loop(self):
        import httpx

        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._clients.get(id(loop))
            if entry is None or entry[0] is not loop:
                headers = {"Authorization": f"Bearer {self.ep.api_key}"} if self.ep.api_key else {}
                limits = httpx.Limits(
                    max_connections=self.ep.concurrency, max_keepalive_connections=self.ep.concurrency
                )
                entry = (
                    loop,
                    httpx.AsyncClient(timeout=self.ep.timeout_s, headers=headers, limits=limits),
                    asyncio.Semaphore(self.ep.concurrency),
                )
                self._clients[id(loop)] = entry
        return entry[1], entry[2]

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        entry = self._clients.pop(id(loop), None)
        if entry is not None:
            await entry[1].aclose()

    async def chat(self, messages: List[Dict], **params) -> Dict:
        import httpx

        client, sem = self._for_loop()
        body = dict(model=self.ep.model, messages=messages, **params)
        delay, last = self.ep.backoff_s, ""
        async with sem:
            for attempt in range(self.ep.retries + 1):
                self.requests += 1
                try:
                    r = await client.post(f"{self.ep.url}/chat/completions", json=body)
                except (httpx.TransportError, httpx.TimeoutException) as exc:
                    last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                else:
                    if r.status_code == 200:
                        try:
                            return r.json()
                        except ValueError:
                            raise BackendError(f"{self.ep}: the response is not JSON: {r.text[:200]!r}") from None
                    last = f"HTTP {r.status_code}: {r.text[:300]}"
                    if r.status_code not in TRANSIENT_STATUS:
                        raise BackendError(f"{self.ep}: {last}")
                if attempt < self.ep.retries:
                    self.retried += 1
                    await asyncio.sleep(delay * (1 + 0.25 * random.random()))
                    delay *= 2
        raise BackendError(f"{self.ep}: failed after {self.ep.retries + 1} attempts ({last})")


def run_sync(coro):
    """Runs a coroutine to completion from synchronous code (also when the caller's thread already
    runs an event loop: then on a private thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: Dict[str, object] = {}

    def target():
        try:
            box["v"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller
            box["e"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]  # type: ignore[misc]
    return box["v"]


# ---- decomposer ----------------------------------------------------------------------------------
class DecompositionFailed(ValueError):
    def __init__(self, prompt: str, why: str):
        super().__init__(f"could not decompose {prompt!r}: {why}")
        self.prompt, self.why = prompt, why


class OpenAIDecomposer:
    """prompt -> questions via structured output; validated, retried, cached in memory and on disk.

    cache_path: a JSONL file of {"prompt", "questions"} rows, read at start and appended to."""

    def __init__(
        self,
        endpoint: Endpoint,
        attempts: int = 3,
        cache_path: Optional[str] = None,
        instructions: str = DECOMPOSE_INSTRUCTIONS,
        max_tokens: int = 1024,
        temperature: float = 0.0,
    ):
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.ep, self.chat = endpoint, ChatClient(endpoint)
        self.attempts, self.instructions = attempts, instructions
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache_path = cache_path
        self.memory: Dict[str, List[Question]] = {}
        self._file_lock = threading.Lock()
        self.invalid_outputs = 0
        if cache_path and os.path.exists(cache_path):
            self.memory.update(read_questions_jsonl(cache_path))

    def _messages(self, prompt: str) -> List[Dict]:
        return [{"role": "system", "content": self.instructions}, {"role": "user", "content": f"Prompt: {prompt}"}]

    async def decompose_one(self, prompt: str) -> List[Question]:
        if prompt in self.memory:
            return self.memory[prompt]
        why = ""
        for _ in range(self.attempts):
            res = await self.chat.chat(
                self._messages(prompt),
                temperature=self.temperature,
                max_tokens=self.max_tokens,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "decomposition", "schema": DECOMPOSITION_SCHEMA, "strict": True},
                },
            )
            text = _content(res)
            try:
                questions = validate_decomposition(json.loads(text))
            except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
                self.invalid_outputs += 1
                why = f"{exc} (output {text[:120]!r})"
                continue
            self._remember(prompt, questions)
            return questions
        raise DecompositionFailed(prompt, f"{self.attempts} invalid outputs from {self.ep}; last: {why}")

    def _remember(self, prompt: str, questions: List[Question]) -> None:
        self.memory[prompt] = questions
        if self.cache_path:
            row = {
                "prompt": prompt,
                "questions": [dict(id=q.id, text=q.text, kind=q.kind, tag=q.tag) for q in questions],
            }
            with self._file_lock, open(self.cache_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    async def adecompose(self, prompts: Sequence[str], return_exceptions: bool = False):
        try:
            return await asyncio.gather(*[self.decompose_one(p) for p in prompts], return_exceptions=return_exceptions)
        finally:
            await self.chat.aclose()

    def decompose(self, prompts: Sequence[str]) -> List[List[Question]]:
        """The Decomposer interface: raises ValueError (DecompositionFailed) naming a failed prompt."""
        return run_sync(self.adecompose(list(prompts)))


def read_questions_jsonl(path: str) -> Dict[str, List[Question]]:
    from ..fileio import iter_jsonl

    out = {}
    for n, row in iter_jsonl(path):
        try:
            out[row["prompt"]] = [Question(q["id"], q["text"], q["kind"], q["tag"]) for q in row["questions"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a decomposition row ({exc})") from None
    return out


def _content(res: Dict) -> str:
    try:
        return res["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise BackendError(f"unexpected chat completion shape: {str(res)[:200]}") from None


# ---- verifier ------------------------------------------------------------------------------------------
def png_data_url(image) -> str:
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"images must be uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class OpenAIVerifier:
    """(image, question) -> P(yes) / (P(yes) + P(no)) from the first generated token's top log-probs."""

    def __init__(
        self, endpoint: Endpoint, top_logprobs: int = 5, max_tokens: int = 3, instructions: str = VERIFY_INSTRUCTIONS
    ):
        if top_logprobs < 5:
            raise ValueError(f"top_logprobs must be >= 5 (the yes/no variants), got {top_logprobs}")
        self.ep, self.chat = endpoint, ChatClient(endpoint)
        self.top_logprobs, self.max_tokens, self.instructions = top_logprobs, max_tokens, instructions
        self.fallbacks = 0
        self.failures = 0

    async def answer(self, image_url: str, q: Question) -> Answer:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": f"{self.instructions}\nQuestion: {q.text}"},
                ],
            }
        ]
        try:
            res = await self.chat.chat(
                messages, temperature=0.0, max_tokens=self.max_tokens, logprobs=True, top_logprobs=self.top_logprobs
            )
            text = _content(res)
            first = res["choices"][0].get("logprobs") or {}
            content = first.get("content") or []
            top = content[0].get("top_logprobs", []) if content else []
        except (BackendError, KeyError, IndexError, TypeError) as exc:
            self.failures += 1
            return Answer(q, None, "", True, str(exc)[:500])
        score, how = score_answer(top, text)
        if score is None:
            self.failures += 1
            return Answer(q, None, text, True, f"{self.ep}: {how}")
        if how != "logprobs":
            self.fallbacks += 1
        return Answer(q, float(score), text.strip(), False, how)

    async def averify(self, images: Sequence, questions: Sequence[List[Question]]) -> List[List[Answer]]:
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} question lists")
        urls = [png_data_url(im) for im in images]
        tasks = [[self.answer(u, q) for q in qs] for u, qs in zip(urls, questions)]
        try:
            flat = await asyncio.gather(*[t for ts in tasks for t in ts])
        finally:
            await self.chat.aclose()
        out, i = [], 0
        for ts in tasks:
            out.append(list(flat[i : i + len(ts)]))
            i += len(ts)
        return out

    def verify(self, images: Sequence, questions: Sequence[List[Question]]) -> List[List[Answer]]:
        return run_sync(self.averify(images, questions))


def openai_reward(
    decomposer: Endpoint,
    verifier: Endpoint,
    cache_path: Optional[str] = None,
    attempts: int = 3,
    aggregation: str = "geometric",
) -> DVReward:
    """DVReward with an OpenAI-compatible decomposer and verifier."""
    return DVReward(
        OpenAIDecomposer(decomposer, attempts=attempts, cache_path=cache_path),
        OpenAIVerifier(verifier),
        aggregation=aggregation,
    )


async def decompose_file(
    dec: OpenAIDecomposer, prompts: Sequence[str], out_path: str, progress: bool = True
) -> Tuple[int, int, List[Tuple[str, str]]]:
    """Decomposes a dataset into out_path (JSONL), skipping prompts already in it (resume); returns
    (newly decomposed, skipped, [(prompt, why) failed])."""
    from tqdm import tqdm

    done = set(read_questions_jsonl(out_path)) if os.path.exists(out_path) else set()
    todo = list(dict.fromkeys(p for p in prompts if p not in done))
    dec.cache_path = out_path
    bar = tqdm(total=len(todo), desc="decompose", disable=not progress, dynamic_ncols=True)
    failed: List[Tuple[str, str]] = []
    ok = 0

    async def one(p):
        nonlocal ok
        try:
            await dec.decompose_one(p)
            ok += 1
        except (DecompositionFailed, BackendError) as exc:
            failed.append((p, str(exc)))
        bar.update(1)
        bar.set_postfix(failed=len(failed))

    try:
        await asyncio.gather(*[one(p) for p in todo])
    finally:
        await dec.chat.aclose()
        bar.close()
    return ok, len(prompts) - len(todo), failed
