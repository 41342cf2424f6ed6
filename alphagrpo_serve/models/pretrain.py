"""Pretraining of the tiny UMM on ShapesWorld (`alphagrpo pretrain`): four tasks mixed (models/tasks.py),
flow-matching loss on the image to draw plus cross-entropy on thought, critique and caption tokens.

Checkpoints (model, optimiser, step, RNG states) are written atomically every --ckpt-every steps
and --resume continues from the last one; the final weights go to a safetensors file with the
config in its metadata.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..fileio import save_torch_atomic, write_atomic
from .layout import collate
from .tasks import ExampleMaker
from .tiny_umm import KIND_NOISY, TinyUMM, TinyUMMConfig, attention_mask, patchify
from .tokenizer import Tokenizer


@dataclass
class PretrainConfig:
    steps: int = 6000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    text_weight: float = 0.5
    seed: int = 0
    ckpt_every: int = 250
    width: int = 160
    layers: int = 5
    heads: int = 5
    decoder: str = "conv"  # TinyUMMConfig.decoder (the shipped weights use conv)
    time_budget_s: float = 0.0  # stop early (and save) after this many seconds; 0 = no limit
    stop_at: int = 0  # stop (and save) at this step, schedule unchanged; 0 = run to `steps`


def training_loss(model: TinyUMM, batch, generator: Optional[torch.Generator] = None, text_weight: float = 0.5):
    """(total, image_loss, text_loss) for a collated batch."""
    cfg = model.cfg
    B = batch.tokens.shape[0]
    x0 = batch.target
    t = torch.sigmoid(torch.randn(B, generator=generator))  # logit-normal times: most steps mid-trajectory
    eps = torch.randn(x0.shape, generator=generator)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    noisy = patchify(x_t, cfg.patch)
    x = model.embed(batch.tokens, batch.kinds, batch.positions, batch.clean, noisy, t)
    h, _ = model.run(x, attention_mask(batch.blocks, batch.valid))
    logits = model.text_logits(h[:, :-1])
    text_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100
    )
    rows = batch.has_gen
    img_loss = torch.zeros(())
    if bool(rows.any()):
        hp = h[batch.kinds == KIND_NOISY].view(-1, cfg.n_patches, cfg.width)
        v = model.velocity(hp, x_t[rows])
        img_loss = F.mse_loss(v, (eps - x0)[rows])
    return img_loss + text_weight * text_loss, img_loss, text_loss


def export_safetensors(model: TinyUMM, path: str, extra_meta: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    meta = {"config": json.dumps(model.cfg.to_dict()), "format": "alphagrpo-tiny-umm-v1"}
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def pretrain(cfg: PretrainConfig, out_dir: str, resume: bool = False, progress: bool = True) -> str:
    """Runs pretraining; returns the path of the exported safetensors."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    tok = Tokenizer()
    torch.manual_seed(cfg.seed)
    mcfg = TinyUMMConfig(vocab_size=len(tok), width=cfg.width, layers=cfg.layers, heads=cfg.heads, decoder=cfg.decoder)
    model = TinyUMM(mcfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )
    maker = ExampleMaker(tok, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, log = 0, []
    # Two length buckets (with / without an input image) so short rows are not padded to long ones;
    # the task mix over a run stays the maker's. Part-filled buckets are checkpointed too.
    pools = {False: [], True: []}
    if resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        maker.rng.bit_generator.state = state["maker_rng"]
        maker.sampler.rng.bit_generator.state = state["sampler_rng"]
        gen.set_state(state["torch_gen"])
        pools = state.get("pools", {False: [], True: []})  # older checkpoints had none
    elapsed0 = log[-1]["elapsed_s"] if log else 0.0

    def lr_at(s):
        if s < cfg.warmup:
            return cfg.lr * (s + 1) / cfg.warmup
        frac = (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def checkpoint():
        save_torch_atomic(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "log": log,
                "maker_rng": maker.rng.bit_generator.state,
                "sampler_rng": maker.sampler.rng.bit_generator.state,
                "torch_gen": gen.get_state(),
                "pools": pools,
                "config": cfg.__dict__,
            },
            ckpt_path,
        )

    start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", disable=not progress, dynamic_ncols=True)
    model.train()

    def next_batch():
        while True:
            ex = maker()
            key = any(seg[0] == "image" for seg in ex.segments)
            pools[key].append(ex.segments)
            if len(pools[key]) == cfg.batch:
                rows, pools[key] = pools[key], []
                return collate(rows, tok.pad_id, mcfg.patch, mcfg.canvas)

    while step < cfg.steps:
        batch = next_batch()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, img_loss, text_loss = training_loss(model, batch, gen, cfg.text_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = elapsed0 + time.time() - start
        log.append(
            {
                "step": step,
                "img_loss": float(img_loss.detach()),
                "text_loss": float(text_loss.detach()),
                "grad_norm": float(gnorm),
                "elapsed_s": elapsed,
            }
        )
        bar.update(1)
        bar.set_postfix(img=f"{float(img_loss.detach()):.4f}", text=f"{float(text_loss.detach()):.3f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            checkpoint()
        if (cfg.time_budget_s and elapsed > cfg.time_budget_s) or step == cfg.stop_at:
            checkpoint()
            break
    bar.close()
    path = os.path.join(out_dir, "tiny_umm.safetensors")
    export_safetensors(model, path, {"steps": step, "train_seconds": round(log[-1]["elapsed_s"] if log else 0, 1)})
    with open(os.path.join(out_dir, "train_log.jsonl"), "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    return path
