"""The `alphagrpo` command.

    alphagrpo info                          what the native extension was built with
    alphagrpo eval shapes --ground-truth    GenEval-style table of the held-out split on ideal renders
    alphagrpo eval shapes --pairs P.jsonl   score your own (prompt, image) pairs
    alphagrpo reward --prompt P --image I   DVReward of one image with its question breakdown
    alphagrpo pretrain --out runs/pretrain  pretrain the tiny UMM (resumable, progress bar)
    alphagrpo generate --prompt P --out x.png [--think] [--grid N]   draw (in-process)
    alphagrpo reflect --prompt P --image in.png --out out.png        critique and redraw
    alphagrpo eval policy [--think] [--reflect]                      held-out accuracy of the tiny UMM
    alphagrpo serve [--port 50051 ...]      gRPC PolicyService + RewardService (see --help)
    alphagrpo generate --server H:P ...     draw through a running server
    alphagrpo verify --server H:P --prompt P --image I               reward breakdown from a server
    alphagrpo decompose --in P.txt --out Q.jsonl --url U --model M   questions from an OpenAI-compatible LLM
    alphagrpo train --config configs/demo.yaml [--server local|H:P,...] [--resume]   GRPO training

Run `alphagrpo COMMAND --help` for every flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _load_png(path: str):
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read image {path!r}: {exc}")


def cmd_info(args) -> int:
    from .kernels import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def cmd_eval_shapes(args) -> int:
    import numpy as np

    from .reward import embedded_reward
    from .shapes.evaluate import evaluate, ground_truth_images, load_heldout
    from .shapes.grammar import PromptError

    if args.ground_truth == bool(args.pairs):
        raise SystemExit("error: give exactly one of --ground-truth or --pairs FILE")
    if args.ground_truth:
        rows = load_heldout(args.split)[: args.limit] if args.limit else load_heldout(args.split)
        prompts = [r["prompt"] for r in rows]
        images = ground_truth_images(prompts, args.canvas, [r.get("seed", i) for i, r in enumerate(rows)])
    else:
        prompts, images = [], []
        base = os.path.dirname(os.path.abspath(args.pairs))
        with open(args.pairs) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    prompts.append(row["prompt"])
                    images.append(_load_png(os.path.join(base, row["image"])))
                except (json.JSONDecodeError, KeyError) as exc:
                    raise SystemExit(f'error: {args.pairs}:{n}: expected {{"prompt": ..., "image": PATH}}: {exc}')
        if args.limit:
            prompts, images = prompts[: args.limit], images[: args.limit]
        images = np.stack(images)
    try:
        report = evaluate(prompts, images, reward=embedded_reward())
    except PromptError as exc:
        raise SystemExit(f"error: {exc}")
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return 0


def cmd_reward(args) -> int:
    from .reward import embedded_reward
    from .shapes.grammar import PromptError

    try:
        result = embedded_reward()([args.prompt], [_load_png(args.image)])[0]
    except (PromptError, ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}")
    print(result.table())
    return 0


def cmd_decompose(args) -> int:
    import asyncio

    from .reward.openai_backend import Endpoint, OpenAIDecomposer, decompose_file

    try:
        with open(args.inp) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        prompts = [json.loads(ln)["prompt"] if ln.startswith("{") else ln for ln in lines]
        ep = Endpoint(
            args.url,
            args.model,
            os.environ.get(args.api_key_env) if args.api_key_env else None,
            args.concurrency,
            args.timeout,
            args.retries,
        )
        dec = OpenAIDecomposer(ep, attempts=args.attempts)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: {exc}")
    ok, skipped, failed = asyncio.run(decompose_file(dec, prompts, args.out))
    print(f"decomposed {ok}, already in {args.out}: {skipped}, failed: {len(failed)}")
    for p, why in failed[:20]:
        print(f"  failed: {why}", file=sys.stderr)
    return 1 if failed else 0


def cmd_pretrain(args) -> int:
    from .models.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        decoder=args.decoder,
        ckpt_every=args.ckpt_every,
        time_budget_s=args.time_budget_min * 60,
        stop_at=args.stop_at,
    )
    path = pretrain(cfg, args.out, resume=args.resume)
    print(f"weights: {path}")
    return 0


def _overrides(args) -> dict:
    """The sampling fields a command line set (None: the policy's default)."""
    return {
        k: v
        for k, v in dict(
            steps=args.steps,
            cfg_scale=args.cfg,
            width=getattr(args, "width", None),
            height=getattr(args, "height", None),
        ).items()
        if v is not None
    }


def _settings(pol, args, reflect: bool = False):
    """(SamplingConfig, TextConfig) of an in-process command: its flags over the policy's defaults."""
    try:
        sc = pol.resolve_sampling(dict(_overrides(args), mode="ode"), reflect=reflect)
        text = pol.resolve_text({} if args.temperature is None else {"temperature": args.temperature})
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    return sc, text


def _save_images(images, path: str, upscale: int) -> None:
    import numpy as np
    from PIL import Image

    grid = np.concatenate(list(images), axis=1)  # one row, left to right
    im = Image.fromarray(grid)
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    im.save(path)


def _policy(args):
    from .models.registry import load_policy

    try:
        return load_policy(args.policy, args.model, args.device, args.dtype)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: {exc}")


def _client(args):
    from .client import Client

    token = None
    if getattr(args, "token_file", None):
        with open(args.token_file) as f:
            token = f.read().strip()
    return Client(args.server, token=token, timeout=args.timeout)


def cmd_generate(args) -> int:
    if args.server:
        import grpc

        local = [
            f
            for f, v, d in (
                ("--policy", args.policy, "tiny"),
                ("--model", args.model, None),
                ("--device", args.device, "cpu"),
                ("--dtype", args.dtype, None),
            )
            if v != d
        ]
        if local:
            raise SystemExit(f"error: {', '.join(local)} choose a local policy; with --server the served one draws")

        with _client(args) as c:
            try:
                out = c.generate(
                    [args.prompt],
                    group_size=args.grid,
                    seed=args.seed,
                    think=args.think,
                    temperature=args.temperature,
                    **_overrides(args),
                )
            except grpc.RpcError as exc:
                raise SystemExit(f"error: {args.server}: {exc.code().name}: {exc.details()}")
    else:
        pol = _policy(args)
        seeds = [args.seed + i for i in range(args.grid)]
        sc, text = _settings(pol, args)
        try:
            out = pol.generate([args.prompt] * len(seeds), seeds, sc, text, think=args.think)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}")
    for s in out:
        if args.think:
            print(f"seed {s.seed}: <think> {s.thought} </think>")
    _save_images([s.image for s in out], args.out, args.upscale)
    print(f"wrote {args.out}")
    return 0


def cmd_reflect(args) -> int:
    pol = _policy(args)
    image = _load_png(args.image)
    seeds = [args.seed + i for i in range(args.grid)]
    sc, text = _settings(pol, args, reflect=True)
    try:
        out = pol.reflect([args.prompt] * len(seeds), [image] * len(seeds), seeds, sc, text)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    for s in out:
        print(f"seed {s.seed}: <think> {s.thought} </think>")
    _save_images([s.image for s in out], args.out, args.upscale)
    print(f"wrote {args.out}")
    return 0


def cmd_eval_policy(args) -> int:
    pol = _policy(args)
    task_name = args.task or pol.info.prompt_domain or "open"
    if task_name != "shapes":
        raise SystemExit(
            f"error: task {task_name!r} has no built-in held-out suite (only 'shapes' has one); "
            "evaluate against a reward server with `alphagrpo train` and a heldout_file"
        )
    from .shapes.policy_eval import evaluate_policy

    sc, _ = _settings(pol, args)
    res = evaluate_policy(pol, think=args.think, reflect=args.reflect, sampling=sc, limit=args.limit)
    print(res.report.table())
    if res.thought_parse_rate is not None:
        print(
            f"implicit thoughts that parse: {res.thought_parse_rate:.3f}; "
            f"that parse to the intended prompt: {res.thought_correct_rate:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    res.report.to_dict(),
                    thought_parse_rate=res.thought_parse_rate,
                    thought_correct_rate=res.thought_correct_rate,
                ),
                f,
                indent=1,
            )
    return 0


def _add_policy_flags(p, out_default=None):
    from .server.cli import add_model_flags

    add_model_flags(p)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the policy's, 20 for tiny)")
    p.add_argument("--cfg", type=float, default=None, help="text guidance scale (default: the policy's, 3.0 for tiny)")
    p.add_argument("--width", type=int, default=None, help="canvas width in pixels (default: the policy's)")
    p.add_argument("--height", type=int, default=None, help="canvas height in pixels (default: the policy's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    p.add_argument("--grid", type=int, default=1, help="images in a row, seeds seed..seed+N-1 (default 1)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="text sampling temperature, 0 = greedy (default: the policy's, 1.0 for tiny)",
    )
    p.add_argument("--upscale", type=int, default=8, help="nearest-neighbour upscale of the saved PNG (default 8)")


def cmd_verify(args) -> int:
    import grpc

    with _client(args) as c:
        try:
            (r,) = c.verify([args.prompt], [_load_png(args.image)])
        except grpc.RpcError as exc:
            raise SystemExit(f"error: {args.server}: {exc.code().name}: {exc.details()}")
    print(r.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .server.cli import add_serve_parser

    p = argparse.ArgumentParser(
        prog="alphagrpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print what the native extension was built with")
    info.set_defaults(fn=cmd_info)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="what", required=True)
    shapes = ev.add_parser("shapes", help="GenEval-style accuracy on ShapesWorld, per category, plus mean DVReward")
    shapes.add_argument(
        "--ground-truth",
        action="store_true",
        help="score ideal renders of the held-out prompts (must be 1.0: a check of the detector)",
    )
    shapes.add_argument(
        "--pairs", metavar="FILE", help='JSONL of {"prompt": ..., "image": PATH} (paths relative to the file)'
    )
    shapes.add_argument(
        "--split",
        default=None,
        metavar="FILE",
        help="held-out split JSONL for --ground-truth (default: the shipped shapes/data/heldout.jsonl)",
    )
    shapes.add_argument("--canvas", type=int, default=32, help="canvas size for --ground-truth renders (default 32)")
    shapes.add_argument("--limit", type=int, default=0, help="use only the first N rows (default: all)")
    shapes.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    shapes.set_defaults(fn=cmd_eval_shapes)

    gen = sub.add_parser("generate", help="draw images with a policy (in-process, or through --server)")
    gen.add_argument(
        "--prompt", required=True, help="the prompt (for the tiny UMM: a ShapesWorld prompt, explicit or implicit)"
    )
    gen.add_argument("--out", required=True, help="PNG to write (a row of --grid images)")
    gen.add_argument("--think", action="store_true", help="write a <think> thought first and print it")
    gen.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT[,HOST:PORT]",
        help="ask a running `alphagrpo serve` instead of loading the model here",
    )
    gen.add_argument("--token-file", default=None, help="bearer token for a server started with --auth-token-file")
    gen.add_argument("--timeout", type=float, default=120.0, help="deadline of the call in seconds (default 120)")
    _add_policy_flags(gen)
    gen.set_defaults(fn=cmd_generate)

    ref = sub.add_parser("reflect", help="critique an image and draw a refined one (in-process)")
    ref.add_argument("--prompt", required=True, help="the prompt the image should show")
    ref.add_argument("--image", required=True, help="PNG of the image to refine (a canvas size the policy draws)")
    ref.add_argument("--out", required=True, help="PNG to write")
    _add_policy_flags(ref)
    ref.set_defaults(fn=cmd_reflect)

    pol = ev.add_parser(
        "policy", help="held-out accuracy of a policy on its task's suite (ShapesWorld: GenEval rule, ODE, fixed seeds)"
    )
    pol.add_argument("--task", default=None, help="task whose held-out suite to run (default: the policy's)")
    pol.add_argument("--think", action="store_true", help="think mode: write a thought before drawing")
    pol.add_argument("--reflect", action="store_true", help="then one round of self-reflective refinement")
    pol.add_argument("--limit", type=int, default=0, help="first N held-out rows only (default: all 360)")
    pol.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    _add_policy_flags(pol)
    pol.set_defaults(fn=cmd_eval_policy)

    pt = sub.add_parser("pretrain", help="pretrain the tiny UMM on ShapesWorld (four tasks; resumable)")
    pt.add_argument(
        "--out", default="runs/pretrain", help="output folder: checkpoint.pt, train_log.jsonl, tiny_umm.safetensors"
    )
    pt.add_argument("--steps", type=int, default=5000, help="optimiser steps (default 5000)")
    pt.add_argument("--batch", type=int, default=64, help="sequences per step (default 64)")
    pt.add_argument(
        "--lr", type=float, default=1e-3, help="peak learning rate, warm-up then cosine to 10%% (default 1e-3)"
    )
    pt.add_argument("--width", type=int, default=160, help="transformer width (default 160)")
    pt.add_argument("--layers", type=int, default=5, help="transformer layers (default 5)")
    pt.add_argument("--heads", type=int, default=5, help="attention heads (default 5)")
    pt.add_argument(
        "--decoder",
        default="conv",
        choices=["linear", "conv"],
        help="velocity decoder: joint convolutional (default; the shipped weights) or per-patch linear head",
    )
    pt.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    pt.add_argument("--ckpt-every", type=int, default=250, help="checkpoint cadence in steps (default 250)")
    pt.add_argument(
        "--time-budget-min",
        type=float,
        default=56.0,
        help="stop, checkpoint and export after this many minutes of training, resumed runs counted "
        "(default 56, the shipped model's budget; 0: no limit)",
    )
    pt.add_argument(
        "--stop-at",
        type=int,
        default=0,
        help="stop, checkpoint and export at this step; the schedule still spans --steps (default 0: off)",
    )
    pt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    pt.set_defaults(fn=cmd_pretrain)

    add_serve_parser(sub)

    try:  # the trainer client ships in the same distribution (trainer/alphagrpo_trainer)
        from alphagrpo_trainer.cli import add_parser as add_train_parser
    except ImportError:  # pragma: no cover - a partial install
        add_train_parser = None
    if add_train_parser is not None:
        add_train_parser(sub)

    vf = sub.add_parser("verify", help="DVReward of one image from a running server, as a question table")
    vf.add_argument("--server", required=True, metavar="HOST:PORT[,HOST:PORT]", help="server address(es)")
    vf.add_argument("--prompt", required=True, help="the prompt the image should satisfy")
    vf.add_argument("--image", required=True, help="PNG file")
    vf.add_argument("--token-file", default=None, help="bearer token file")
    vf.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (default 60)")
    vf.set_defaults(fn=cmd_verify)

    dc = sub.add_parser("decompose", help="decompose a prompt file into yes/no questions on an OpenAI-compatible LLM")
    dc.add_argument(
        "--in", dest="inp", required=True, help="prompts: a text file (one per line) or JSONL with 'prompt'"
    )
    dc.add_argument("--out", required=True, help="questions JSONL; prompts already in it are skipped (resume)")
    dc.add_argument("--url", required=True, help="API base, e.g. http://127.0.0.1:8000/v1")
    dc.add_argument("--model", required=True, help="model name on that server")
    dc.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    dc.add_argument("--attempts", type=int, default=3, help="tries per prompt on invalid output (default 3)")
    dc.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    dc.add_argument("--retries", type=int, default=3, help="retries on transient errors (default 3)")
    dc.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    dc.set_defaults(fn=cmd_decompose)

    rw = sub.add_parser("reward", help="embedded DVReward of one image, with its question breakdown")
    rw.add_argument("--prompt", required=True, help="a ShapesWorld prompt, explicit or implicit")
    rw.add_argument("--image", required=True, help="PNG file")
    rw.set_defaults(fn=cmd_reward)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "split") and args.split is None:
        from .shapes.evaluate import HELDOUT

        args.split = HELDOUT
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
