"""A local vLLM OpenAI-compatible server (the CPU build in .venv-vllm) for the vllm test tier and the
reward benchmark: tiny random models from tools/make_tiny_vlm.py, 127.0.0.1 only, bounded waits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PY = os.path.join(REPO, ".venv-vllm", "bin", "python")
STRUCTURED = json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(root: str, timeout: float = 600) -> None:
    """tools/make_tiny_vlm.py ROOT in the vLLM venv (skipped when ROOT already holds both models)."""
    if all(os.path.exists(os.path.join(root, m, "config.json")) for m in ("llm", "vlm")):
        return
    if not os.path.exists(VENV_PY):
        raise RuntimeError("the vLLM venv is missing: run `make vllm-env`")
    res = subprocess.run(
        [VENV_PY, os.path.join(REPO, "tools", "make_tiny_vlm.py"), root],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if res.returncode != 0:
        raise RuntimeError(f"make_tiny_vlm.py failed:\n{res.stderr[-3000:]}")


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free port; wait() polls /v1/models."""

    def __init__(self, model_dir: str, name: str, log_path: str, max_len: int = 512, extra=()):
        if not os.path.exists(VENV_PY):
            raise RuntimeError("the vLLM venv is missing: run `make vllm-env`")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.name, self.log_path = name, log_path
        cmd = [
            VENV_PY,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model_dir,
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_len),
            "--gpu-memory-utilization",
            "0.1",
            "--enforce-eager",
            "--max-logprobs",
            "1000",
            "--structured-outputs-config",
            STRUCTURED,
            *extra,
        ]
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 420.0) -> "VLLMServer":
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM ({self.name}) exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM ({self.name}) did not answer within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()


if __name__ == "__main__":  # manual use: python tools/vllm_local.py MODEL_DIR NAME
    srv = VLLMServer(sys.argv[1], sys.argv[2], "/tmp/vllm_local.log").wait()
    print(srv.url, flush=True)
    try:
        srv.proc.wait()
    except KeyboardInterrupt:
        srv.stop()
