"""`alphagrpo serve`: its flags, and the model flags that the in-process commands share."""

from __future__ import annotations

import os


def add_model_flags(p) -> None:
    """--policy, --model, --device, --dtype: which policy to load and where (serve and in-process commands)."""
    from ..models.registry import DTYPES, available

    p.add_argument(
        "--policy",
        default="tiny",
        help=f"policy from the registry: {', '.join(available())} (default: tiny, the embedded tiny UMM)",
    )
    p.add_argument(
        "--model",
        "--weights",
        dest="model",
        default=None,
        metavar="PATH",
        help="the policy's weights: a file or checkpoint folder (default: the policy's default; the tiny "
        "UMM ships its weights)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="weights' dtype (default: the policy's default for the device: float32 on the CPU)",
    )


def add_serve_parser(sub) -> None:
    """The `serve` subcommand on the `alphagrpo` parser's subparsers."""
    sv = sub.add_parser("serve", help="serve PolicyService and RewardService over gRPC")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    add_model_flags(sv)
    sv.add_argument(
        "--task",
        default=None,
        help="prompt domain the server accepts: shapes (ShapesWorld's grammar) "
        "or open (any prompt); default: the policy's own, else open",
    )
    sv.add_argument(
        "--reward",
        default="embedded",
        choices=["embedded", "openai", "kserve"],
        help="reward backend: the task's embedded DVReward (default; ShapesWorld's detector), "
        "OpenAI-compatible servers, or a verifier model on a KServe v2 / Triton server",
    )
    sv.add_argument("--reward-url", default=None, help="--reward kserve: HOST:PORT of the KServe v2 gRPC server")
    sv.add_argument(
        "--reward-model",
        default=None,
        help="--reward kserve: the verifier model there (alphagrpo_verify signature, docs/kserve.md)",
    )
    sv.add_argument("--reward-ca-cert", default=None, help="--reward kserve: PEM root certificate (TLS to that server)")
    sv.add_argument(
        "--decomposer-url", default=None, help="--reward openai: API base of the decomposer LLM, e.g. http://h:8000/v1"
    )
    sv.add_argument("--decomposer-model", default=None, help="--reward openai: the decomposer's model name")
    sv.add_argument("--verifier-url", default=None, help="--reward openai: API base of the verifier MLLM")
    sv.add_argument("--verifier-model", default=None, help="--reward openai: the verifier's model name")
    sv.add_argument("--api-key-env", default=None, help="environment variable holding the reward servers' API key")
    sv.add_argument(
        "--reward-concurrency", type=int, default=16, help="requests in flight per reward server (default 16)"
    )
    sv.add_argument(
        "--decomposition-cache", default=None, help="JSONL cache of decompositions (read, then appended to)"
    )
    sv.add_argument("--max-batch", type=int, default=64, help="samples per model batch (default 64)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5)")
    sv.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="samples queued per request kind before RESOURCE_EXHAUSTED (default 1024)",
    )
    sv.add_argument("--max-prompts", type=int, default=64, help="prompts or items per request (default 64)")
    sv.add_argument("--max-steps", type=int, default=100, help="largest sampling steps accepted (default 100)")
    sv.add_argument(
        "--max-thought-tokens",
        type=int,
        default=128,
        help="longest thought or critique a request may ask for (default 128; BAGEL's app allows 1024)",
    )
    sv.add_argument("--max-group", type=int, default=64, help="samples per prompt (group_size) accepted (default 64)")
    sv.add_argument("--max-prompt-chars", type=int, default=512, help="characters per prompt (default 512)")
    sv.add_argument(
        "--max-update-mb", type=int, default=1024, help="bytes one UpdateWeights stream may declare, MiB (default 1024)"
    )
    sv.add_argument(
        "--max-update-total-mb",
        type=int,
        default=2048,
        help="bytes all UpdateWeights streams in progress may hold together, MiB (default 2048)",
    )
    sv.add_argument(
        "--max-reward-queue",
        type=int,
        default=1024,
        help="Verify/Decompose items waiting or running before RESOURCE_EXHAUSTED (default 1024)",
    )
    sv.add_argument("--max-message-mb", type=int, default=64, help="gRPC message size limit, MiB (default 64)")
    sv.add_argument("--auth-token-file", default=None, help="require 'authorization: Bearer <token in file>'")
    sv.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    sv.add_argument("--tls-key", default=None, help="PEM private key")
    sv.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port on --host (default: off)")
    sv.add_argument("--grace-s", type=float, default=10.0, help="drain time on SIGTERM, seconds (default 10)")
    sv.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop gracefully when the process that started this server exits (what `alphagrpo train "
        "--server local` asks for, so a killed trainer leaves no server behind)",
    )
    sv.add_argument(
        "--kserve-port",
        type=int,
        default=None,
        help="serve the KServe v2 / Triton inference protocol on this port (default: on --port, beside "
        "the native services)",
    )
    sv.add_argument("--no-kserve", action="store_true", help="do not serve the KServe v2 protocol")
    sv.set_defaults(fn=cmd_serve)


def cmd_serve(args) -> int:
    from .app import ServeConfig
    from .app import main as serve_main
    from .validation import Limits

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    cfg = ServeConfig(
        host=args.host,
        port=args.port,
        policy=args.policy,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        task=args.task,
        reward=args.reward,
        decomposer_url=args.decomposer_url,
        decomposer_model=args.decomposer_model,
        verifier_url=args.verifier_url,
        verifier_model=args.verifier_model,
        reward_api_key=api_key,
        reward_concurrency=args.reward_concurrency,
        decomposition_cache=args.decomposition_cache,
        reward_url=args.reward_url,
        reward_model=args.reward_model,
        reward_ca_cert=args.reward_ca_cert,
        kserve=not args.no_kserve,
        kserve_port=args.kserve_port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_message_mb=args.max_message_mb,
        auth_token_file=args.auth_token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        grace_s=args.grace_s,
        exit_with_parent=args.exit_with_parent,
        limits=Limits(
            max_prompts=args.max_prompts,
            max_steps=args.max_steps,
            max_thought_tokens=args.max_thought_tokens,
            max_group=args.max_group,
            max_prompt_chars=args.max_prompt_chars,
            max_update_bytes=args.max_update_mb << 20,
            max_update_total_bytes=args.max_update_total_mb << 20,
            max_reward_queue=args.max_reward_queue,
        ),
    )
    try:
        return serve_main(cfg)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise SystemExit(f"error: {exc}")
