"""`alphagrpo train`: argument parsing and the run's setup (distributed ranks, local server)."""

from __future__ import annotations

import datetime
import os
import signal
import sys


def add_parser(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="GRPO training (RT2I / SRR) against alphagrpo servers",
        description="GRPO training of the policy against one or more alphagrpo servers. Under torchrun "
        "every rank runs this command; prompts are sharded over ranks and rank 0 pushes "
        "weights and writes checkpoints.",
    )
    tr.add_argument("--config", default=None, help="TrainConfig YAML (configs/*.yaml; default: the built-in defaults)")
    tr.add_argument(
        "--server",
        default="local",
        metavar="HOST:PORT[,HOST:PORT...]|local",
        help="server address(es), or 'local' to start one with the embedded defaults and stop it at the end "
        "(default: local)",
    )
    tr.add_argument("--out", default=None, help="output folder (overrides the config's out_dir)")
    tr.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one config field (YAML value), repeatable: --set lr=1e-4 --set task=srr",
    )
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    tr.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML, each field with its documentation, and exit",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    tr.set_defaults(fn=run)


def _init_distributed(device: str) -> bool:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    # NCCL when the policy (and so its gradients) lives on GPUs, gloo when it lives on the CPU
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # rank 0 evaluates alone while the others wait at a barrier: a BAGEL evaluation can outlast the
    # default 10-minute collective timeout, so allow hours
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
    return True


def run(args) -> int:
    import yaml

    from .config import config_yaml, load_config, set_overrides

    try:
        overrides = set_overrides(args.set, args.config)
        if args.out:
            overrides["out_dir"] = args.out
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        cfg = load_config(args.config, overrides)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"error: {exc}")
    if args.print_config:
        print(config_yaml(cfg, docs=True), end="")
        return 0

    import torch.distributed as dist

    from .servers import LocalServer, ServerError
    from .train import Trainer

    # SIGTERM (a scheduler's preemption, torchrun stopping its workers) unwinds like Ctrl-C: the
    # finally below stops the local server and closes the trainer
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.server == "local":
        try:
            local_server_args(cfg)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    distributed = _init_distributed(cfg.device)
    rank = dist.get_rank() if distributed else 0
    local = None
    trainer = None
    try:
        if args.server == "local":
            addr = None
            if rank == 0:
                os.makedirs(cfg.out_dir, exist_ok=True)
                print(f"starting a local server (policy {cfg.policy['name']} on {cfg.device}) ...", flush=True)
                local = LocalServer(
                    cfg.policy,
                    extra_args=local_server_args(cfg),
                    log_path=os.path.join(cfg.out_dir, "server.log"),
                    device=cfg.device,
                    dtype=cfg.dtype,
                    start_timeout_s=cfg.server_start_timeout_s,
                )
                addr = local.address
                print(f"local server on {addr}", flush=True)
            if distributed:
                box = [addr]
                dist.broadcast_object_list(box, src=0)
                addr = box[0]
            addresses = [addr]
        else:
            addresses = [a.strip() for a in args.server.split(",") if a.strip()]
        trainer = Trainer(cfg, addresses, resume=args.resume, progress=not args.no_progress)
        summary = trainer.run()
        if rank == 0:
            if summary.get("table"):
                print("\nHeld-out split (GenEval rule), before -> after:\n")
                print(summary["table"])
            if summary.get("report"):
                print(f"\nreport: {summary['report']}")
        return 0
    except ServerError as exc:
        ckpt = os.path.join(cfg.out_dir, "checkpoint.pt")
        note = f"; the last checkpoint ({ckpt}) is intact: continue with --resume" if os.path.exists(ckpt) else ""
        print(f"error: {exc}{note}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        if local is not None:
            local.stop()
        if distributed:
            dist.destroy_process_group()


def local_server_args(cfg) -> list:
    """The `alphagrpo serve` flags of the local server that match the run: its prompt task (whose
    embedded reward scores the rollouts) and a thought budget at least the run's. ValueError when
    the task has no embedded reward (an open-domain run needs a server with --reward openai or
    kserve, given by --server HOST:PORT)."""
    from alphagrpo_serve.tasks import load_task

    if load_task(cfg.prompt_task).reward() is None:
        raise ValueError(
            f"--server local runs the embedded reward, and prompt_task {cfg.prompt_task!r} has none: start "
            "`alphagrpo serve --reward openai|kserve ...` and pass --server HOST:PORT"
        )
    return ["--task", cfg.prompt_task, "--max-thought-tokens", str(max(128, cfg.max_thought_tokens))]
