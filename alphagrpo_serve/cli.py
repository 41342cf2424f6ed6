"""The `alphagrpo` command.

    alphagrpo info                          what the native extension was built with
    alphagrpo eval shapes --ground-truth    GenEval-style table of the held-out split on ideal renders
    alphagrpo eval shapes --pairs P.jsonl   score your own (prompt, image) pairs
    alphagrpo reward --prompt P --image I   DVReward of one image with its question breakdown

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
                    raise SystemExit(f"error: {args.pairs}:{n}: expected {{\"prompt\": ..., \"image\": PATH}}: {exc}")
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


def cmd_pretrain(args) -> int:
    from .models.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, width=args.width,
                         layers=args.layers, heads=args.heads, ckpt_every=args.ckpt_every,
                         time_budget_s=args.time_budget_min * 60)
    path = pretrain(cfg, args.out, resume=args.resume)
    print(f"weights: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alphagrpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print what the native extension was built with")
    info.set_defaults(fn=cmd_info)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="what", required=True)
    shapes = ev.add_parser("shapes", help="GenEval-style accuracy on ShapesWorld, per category, plus mean DVReward")
    shapes.add_argument("--ground-truth", action="store_true",
                        help="score ideal renders of the held-out prompts (must be 1.0: a check of the detector)")
    shapes.add_argument("--pairs", metavar="FILE",
                        help="JSONL of {\"prompt\": ..., \"image\": PATH} (paths relative to the file)")
    shapes.add_argument("--split", default=None, metavar="FILE",
                        help="held-out split JSONL for --ground-truth (default: the shipped shapes/data/heldout.jsonl)")
    shapes.add_argument("--canvas", type=int, default=32, help="canvas size for --ground-truth renders (default 32)")
    shapes.add_argument("--limit", type=int, default=0, help="use only the first N rows (default: all)")
    shapes.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    shapes.set_defaults(fn=cmd_eval_shapes)

    pt = sub.add_parser("pretrain", help="pretrain the tiny UMM on ShapesWorld (four tasks; resumable)")
    pt.add_argument("--out", default="runs/pretrain", help="output folder: checkpoint.pt, train_log.jsonl, tiny_umm.safetensors")
    pt.add_argument("--steps", type=int, default=5000, help="optimiser steps (default 5000)")
    pt.add_argument("--batch", type=int, default=64, help="sequences per step (default 64)")
    pt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, warm-up then cosine to 10%% (default 1e-3)")
    pt.add_argument("--width", type=int, default=160, help="transformer width (default 160)")
    pt.add_argument("--layers", type=int, default=5, help="transformer layers (default 5)")
    pt.add_argument("--heads", type=int, default=5, help="attention heads (default 5)")
    pt.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    pt.add_argument("--ckpt-every", type=int, default=250, help="checkpoint cadence in steps (default 250)")
    pt.add_argument("--time-budget-min", type=float, default=0.0,
                    help="stop, checkpoint and export after this many minutes (default 0: no limit)")
    pt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    pt.set_defaults(fn=cmd_pretrain)

    rw = sub.add_parser("reward", help="embedded DVReward of one image, with its question breakdown")
    rw.add_argument("--prompt", required=True, help="a ShapesWorld prompt, explicit or implicit")
    rw.add_argument("--image", required=True, help="PNG file")
    rw.set_defaults(fn=cmd_reward)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "split", None) is None and hasattr(args, "split"):
        from .shapes.evaluate import HELDOUT

        args.split = HELDOUT
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
