"""The GRPO training loop: rollouts from the servers, advantages, the loss on the trainer's own copy
of the policy, AdamW, weight push; metrics, evaluation, checkpoints, resume, and torchrun ranks.

One step (rank r of N):
  prompts_for(step) -> rank r's share -> RT2I or SRR rollouts (rollout.py) -> rewards of all ranks
  gathered -> kernels.grpo_advantages over the whole batch -> loss.grpo_backward -> gradients
  averaged over ranks -> clip -> AdamW -> rank 0 pushes the weights (LoRA adapters when LoRA) to
  every server, all ranks learn the new policy versions -> next step.
Everything random in a step derives from (seed, step), so a resumed run repeats the uninterrupted
run's prompts and seeds exactly.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from alphagrpo_serve import kernels
from alphagrpo_serve.fileio import save_torch_atomic, write_json_atomic
from alphagrpo_serve.models.registry import load_policy
from alphagrpo_serve.tasks import load_task

from .config import TrainConfig, config_yaml
from .data import PromptSource, draw_sde_window, shard
from .evaluation import (
    EVAL_MODES,
    cached_evaluation,
    draw_grid,
    eval_sampling,
    evaluate_file,
    modes_for,
    read_heldout_file,
)
from .fsdp import average_grads, clip_grad_norm, gathered
from .loss import grpo_backward
from .report import before_after_table, plot_panels, write_report
from .rollout import RolloutRunner, Rollouts
from .servers import ServerPool
from .shaping import Refiller, format_flags, shaped_rewards, step_stats


def policy_device(cfg: TrainConfig) -> str:
    """cfg.device, with a bare 'cuda' under torchrun meaning this rank's GPU (cuda:LOCAL_RANK)."""
    if cfg.device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return cfg.device


class Trainer:
    CKPT = "checkpoint.pt"

    def __init__(
        self, cfg: TrainConfig, addresses: Sequence[str], resume: bool = False, progress: bool = True, log=print
    ):
        self.cfg = cfg
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if cfg.prompts_per_step % self.world:
            raise ValueError(
                f"config: prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the "
                f"number of ranks ({self.world})"
            )
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.progress = progress and self.rank == 0
        self.out = cfg.out_dir
        os.makedirs(self.out, exist_ok=True)
        torch.manual_seed(cfg.seed)
        device = policy_device(cfg)
        self.policy = load_policy(cfg.policy["name"], cfg.policy["path"], device, cfg.dtype)
        if cfg.lora_rank:
            self.policy.enable_lora(cfg.lora_rank, cfg.lora_alpha)
        self.fsdp = cfg.fsdp and self.distributed  # fsdp.py: every rank takes part in reading the weights
        if self.fsdp:
            from .fsdp import shard

            shard(self.policy, device)
            self.log("fsdp: the policy is sharded over the ranks; the trainer's evaluations and grids are skipped")
        self.ref = (
            load_policy(cfg.policy["name"], cfg.policy["path"], device, cfg.dtype)
            if (cfg.kl_text > 0 or cfg.kl_image > 0)
            else None
        )
        # the base weights a LoRA run never changes: servers holding them get adapters only
        self.base_fingerprint = self.policy.weights_fingerprint() if cfg.lora_rank else None
        self.params = self.policy.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.task = load_task(cfg.prompt_task)
        self.heldout = read_heldout_file(cfg.heldout_file) if cfg.heldout_file else None
        self.source = PromptSource.of_config(cfg)
        self.pool = ServerPool(
            addresses, cfg.server_timeout_s, cfg.server_retries, cfg.server_backoff_s, offset=self.rank
        )
        self.runner = RolloutRunner(self.pool, cfg)
        self.refiller = Refiller(cfg, self.world) if cfg.dynamic_sampling else None
        self.step = 0
        self.history: List[Dict] = []  # per-step metrics (rank 0)
        self.periodic: List[Dict] = []  # periodic evaluations
        self.before: Optional[Dict] = None
        self.restarts = 0
        self.elapsed0 = 0.0
        if resume:
            self._load()
        self._writer = None

    # ---- checkpoints ------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.out, self.CKPT)

    def checkpoint(self) -> None:
        if self.fsdp:  # collective: full tensors on rank 0
            from .fsdp import full_state

            model, optim = full_state(self.policy, self.opt)
        if self.rank != 0:
            return
        if not self.fsdp:
            model, optim = self.policy.state_dict(), self.opt.state_dict()
        state = {
            "format": "alphagrpo-train-1",
            "step": self.step,
            "data_position": self.source.position(self.step),
            "model": model,
            "optimizer": optim,
            "schedule": {"lr": self.lr_at(self.step), "kind": self.cfg.lr_schedule},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "policy_version": self.policy.version,
            "config": self.cfg.to_dict(),
            "history": self.history,
            "periodic": self.periodic,
            "before": self.before,
            "restarts": self.restarts,
            "elapsed_s": self.elapsed(),
        }
        save_torch_atomic(state, self.ckpt_path)

    def _load(self) -> None:
        if not os.path.exists(self.ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}")
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)  # any rank, any device
        if state.get("format") != "alphagrpo-train-1":
            raise ValueError(f"{self.ckpt_path} is not a trainer checkpoint")
        changed = {
            k
            for k in ("task", "group_size", "prompts_per_step", "seed", "lora_rank", "policy")
            if state["config"].get(k) != getattr(self.cfg, k)
        }
        if changed:
            raise ValueError(f"--resume: the config differs from the checkpoint's in {sorted(changed)}")
        if self.fsdp:
            from .fsdp import load_full_state

            load_full_state(self.policy, self.opt, state["model"], state["optimizer"])
        else:
            self.policy.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]
        self.policy.version = state["policy_version"]
        self.history, self.periodic = state["history"], state["periodic"]
        self.before, self.restarts = state["before"], state["restarts"]
        self.elapsed0 = state["elapsed_s"]
        # metrics written after the checkpoint by the interrupted run are replaced by the rerun
        path = os.path.join(self.out, "metrics.jsonl")
        if self.rank == 0 and os.path.exists(path):
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= self.step]
            with open(path, "w") as f:
                f.writelines(keep)
        self.log(f"resumed from {self.ckpt_path} at step {self.step}")

    # ---- helpers -----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed0 + time.time() - self._t0 if hasattr(self, "_t0") else self.elapsed0

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.lr
        frac = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, frac))))

    def task_at(self, step: int) -> str:
        c = self.cfg
        if c.task != "mixed":
            return c.task
        if step < c.mixed_rt2i_steps:
            return "rt2i"
        return "srr" if (step - c.mixed_rt2i_steps) % 2 == 0 else "rt2i"

    def step_inputs(self, step: int) -> Dict:
        """Everything random about a step, from (seed, step) only: prompts, think flags, window, seeds."""
        c = self.cfg
        rng = np.random.default_rng([c.seed, 104729, step])
        window = draw_sde_window(c, rng)
        prompts = self.source.prompts_for(step)
        think = [bool(x) for x in rng.random(len(prompts)) < c.think_fraction]
        base_seed = int(rng.integers(0, 2**31 - 1))
        per_rank = len(prompts) // self.world  # sample (i, g) of the step has seed base + i * G + g on any rank count
        return {
            "step": step,
            "task": self.task_at(step),
            "prompts": prompts,
            "think": think,
            "window": window,
            "seeds": [base_seed + r * per_rank * c.group_size for r in range(self.world)],
        }

    def _broadcast(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _gather_rewards(self, r: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return r
        parts = [torch.empty_like(r) for _ in range(self.world)]
        dist.all_gather(parts, r.contiguous())
        return torch.cat(parts, 0)

    def _reduce_metrics(self, m: Dict[str, float]) -> Dict[str, float]:
        """Means over ranks (sums for *_count); a key only some ranks have (a category one rank did not
        draw) is averaged over those ranks."""
        if not self.distributed:
            return m
        parts = [None] * self.world
        dist.all_gather_object(parts, m)
        out = {}
        for k in {k for p in parts for k in p}:
            vals = [p[k] for p in parts if k in p]
            out[k] = sum(vals) if k.endswith("_count") else sum(vals) / len(vals)
        return out

    def weight_sets(self, full: bool) -> List[tuple]:
        """What goes to a server: full weights (first push, restarted server), else the LoRA
        adapters when training LoRA, else the full weights."""
        sets = []
        if full or not self.cfg.lora_rank:
            sets.append((self.policy.export_weights(lora=False), False))
        if self.cfg.lora_rank:
            sets.append((self.policy.export_weights(lora=True), True))
        return [(gathered(w), lora) for w, lora in sets] if self.fsdp else sets

    def sync_servers(self, force: bool = False) -> None:
        """Rank 0 pushes the current weights to every server that does not hold them (all when
        force); every rank then learns the servers' (boot id, version). In a LoRA run a server whose
        base weights have the trainer's fingerprint (same checkpoint and dtype) gets the adapters
        only: pushing BAGEL-7B's 29 GB base is skipped."""
        stale, infos = None, None
        if self.rank == 0:
            infos = self.pool.info() if (self.cfg.lora_rank or not force) else None  # one GetModelInfo each
            stale = list(range(len(self.pool.addresses))) if force else self.pool.stale(infos)
        if self.fsdp:  # gathering the weights takes every rank
            stale = self._broadcast(stale)
        adapters_only = []
        if self.rank == 0 and stale and self.cfg.lora_rank:
            adapters_only = [i for i in stale if infos[i].weights_fingerprint == self.base_fingerprint]
        full = [i for i in (stale or []) if i not in adapters_only]
        if self.fsdp:
            full = self._broadcast(full)
        sets = self.weight_sets(full=True) if full and (self.rank == 0 or self.fsdp) else None
        if self.rank == 0:
            if stale:
                if not force:
                    self.restarts += len(stale)
                    self.log(
                        f"server(s) {[self.pool.addresses[i] for i in stale]} restarted or changed: "
                        f"pushing the current weights (policy version {self.policy.version})"
                    )
                if full:
                    self.pool.push(sets, only=full)
                if adapters_only:
                    self.pool.push(self.weight_sets(full=False), only=adapters_only)
        self.pool.known = self._broadcast(self.pool.known)

    # ---- evaluation ------------------------------------------------------------------------------
    def eval_sampling(self):
        return eval_sampling(self.policy, self.cfg)

    def evaluate(self, limit: int = 0, modes=None) -> Optional[Dict[str, Dict]]:
        """The held-out file scored by the server's reward, else the task's suite (None: neither, or
        a sharded policy, which computes only with every rank)."""
        c = self.cfg
        if self.fsdp:
            return None
        modes = modes_for(self.policy, modes or [m for m in EVAL_MODES if c.eval_srr or not m[2]])
        self.policy.eval()
        with torch.no_grad():
            if self.heldout is not None:
                return evaluate_file(
                    self.policy, self.heldout, self.eval_sampling(), self.pool.verify_all, modes, limit
                )
            return self.task.evaluate(self.policy, self.eval_sampling(), modes, limit)

    def grid(self, name: str) -> Optional[str]:
        if self.fsdp:
            return None
        prompts = self.task.grid_prompts() if self.heldout is None else [r["prompt"] for r in self.heldout[:6]]
        with torch.no_grad():
            return draw_grid(
                self.policy,
                os.path.join(self.out, name),
                prompts,
                range(4),
                self.eval_sampling(),
                title=f"{name.rsplit('.', 1)[0].replace('_', ' ')} (step {self.step}; think mode, ODE, greedy thoughts)",
            )

    # ---- one step ---------------------------------------------------------------------------------------
    def rollouts(self, inp: Dict) -> Rollouts:
        prompts = shard(inp["prompts"], self.rank, self.world)
        think = shard(inp["think"], self.rank, self.world)
        seed = inp["seeds"][self.rank]
        if inp["task"] == "srr":
            return self.runner.srr(prompts, seed, inp["window"])
        return self.runner.rt2i(prompts, think, seed, inp["window"])

    def train_step(self) -> Dict:
        c = self.cfg
        t0 = time.time()
        self.sync_servers()
        inp = self.step_inputs(self.step)
        roll = self.rollouts(inp)
        t_roll = time.time() - t0
        # format reward, then dynamic sampling (shaping.py); advantages come from the shaped rewards
        ok, has = format_flags(self.task, roll)
        rewards = shaped_rewards(c, roll, ok)
        refilled = 0
        if self.refiller is not None:
            roll, rewards, ok, has, refilled = self.refiller.refill(self, inp, roll, rewards, ok, has)
        t_roll = time.time() - t0
        t_gen, t_ver = self.runner.timing.pop("generate", 0.0), self.runner.timing.pop("verify", 0.0)
        # advantages over the whole batch (all ranks), then this rank's rows
        rewards_all = self._gather_rewards(rewards)
        adv_all = kernels.grpo_advantages(rewards_all, std_scope=c.adv_std_scope, clip=c.adv_clip)
        P = roll.rewards.shape[0]
        adv = adv_all[self.rank * P : (self.rank + 1) * P].reshape(-1)
        # rollouts from another policy version: corrected (recorded log-probs as behaviour policy) or dropped
        off = [
            i
            for i, (s, a) in enumerate(zip(roll.samples, roll.addresses))
            if s.policy_version != self.pool.expected_version(a)
        ]
        keep = list(range(len(roll.samples)))
        if off and c.off_policy == "drop":
            keep = [i for i in keep if i not in set(off)]
        samples = [roll.samples[i] for i in keep]
        refl = None if roll.reflect_images is None else [roll.reflect_images[i] for i in keep]
        t1 = time.time()
        self.policy.train()
        lm: Dict[str, float] = {}
        for u in range(c.updates_per_batch):
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            self.opt.zero_grad(set_to_none=False)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if samples:
                lm = grpo_backward(self.policy, samples, adv[keep], c, refl, self.ref)
                if u == 0:  # the recompute's deviation from the record is measured before any update
                    gap = {k: lm[k] for k in ("image_logp_dev", "text_logp_dev") if k in lm}
                lm.update(gap)
            if self.distributed:
                average_grads(self.params, self.world)  # FSDP-sharded gradients are averaged already
            gnorm = clip_grad_norm(self.params, c.grad_clip)
            self.opt.step()
        self.policy.eval()
        t_train = time.time() - t1
        t2 = time.time()
        sets = self.weight_sets(full=False) if self.rank == 0 or self.fsdp else None
        if self.rank == 0:
            versions = self.pool.push(sets)
            self.policy.version = max(versions.values())
        self.pool.known = self._broadcast(self.pool.known)
        self.policy.version = self._broadcast(self.policy.version)
        t_push = time.time() - t2
        self.step += 1
        m = {
            "reward_mean": float(roll.rewards.mean()),
            "reward_std": float(roll.rewards.std(unbiased=False)),
            "reward_raw_mean": float(roll.raw_rewards.mean()),
            "reward_semantic": float(roll.semantic.mean()),
            "reward_quality": float(roll.quality.mean()),
            "grad_norm": gnorm,
            "lr": self.lr_at(self.step - 1),
            "off_policy_count": float(len(off)),
            "dropped_count": float(len(roll.samples) - len(keep)),
            "time_generate_s": t_gen,
            "time_verify_s": t_ver,
            "time_rollout_s": t_roll,
            "time_train_s": t_train,
            "time_push_s": t_push,
            "reward_shaped_mean": float(rewards.mean()),
            "refilled_count": float(refilled),
            **step_stats(self.task, roll, rewards, ok, has, c.dynamic_min_std),
            **lm,
        }
        if roll.kind == "srr":
            m["srr_stage1_mean"] = float(roll.stage1_rewards.mean())
            m["srr_improved_frac"] = float(
                (roll.raw_rewards > roll.stage1_rewards.min(1, keepdim=True).values).float().mean()
            )
        m.update(self._accuracy(roll))
        m = self._reduce_metrics(m)
        m.update(
            step=self.step,
            task=roll.kind,
            policy_version=self.policy.version,
            elapsed_s=round(self.elapsed(), 2),
            prompts=inp["prompts"],
            seeds=inp["seeds"],
            window=list(inp["window"]),
        )
        return m

    def _accuracy(self, roll: Rollouts) -> Dict[str, float]:
        """The task's metrics of the rollout images (ShapesWorld: accuracy per category); none for
        prompts outside the task."""
        try:
            return self.task.rollout_metrics(
                [s.prompt for s in roll.samples], np.stack([s.image for s in roll.samples])
            )
        except ValueError:
            return {}

    # ---- the run -------------------------------------------------------------------------------------------
    def _tb(self, m: Dict) -> None:
        if self.rank != 0:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(os.path.join(self.out, "tb"))
            except ImportError:
                self._writer = False
                self.log("tensorboard is not installed: metrics go to metrics.jsonl only")
        if self._writer:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._writer.add_scalar(
                        k.replace("_", "/", 1) if k.startswith(("reward_", "acc_", "time_", "text_", "image_")) else k,
                        v,
                        m["step"],
                    )
            self._writer.flush()

    def run(self) -> Dict:
        c = self.cfg
        self._t0 = time.time()
        files: Dict[str, str] = {}
        if self.rank == 0:
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                f.write(config_yaml(c))
            if self.before is None and c.max_steps > 0:
                self.log("evaluating the base policy on the held-out split ...")
                self.before = cached_evaluation(c, self.policy, lambda: self.evaluate(limit=c.eval_final_limit))
                if self.before is None:
                    self.log(f"task {c.prompt_task!r} has no held-out suite and no heldout_file is set: no evaluation")
                else:
                    write_json_atomic(self.before, os.path.join(self.out, "eval_before.json"))
                    if c.eval_every and c.eval_limit != c.eval_final_limit and not self.periodic:
                        # the periodic evaluations' own starting point: the base policy on their rows
                        modes = [m_ for m_ in EVAL_MODES if not m_[2]]
                        res = cached_evaluation(
                            c, self.policy, lambda: self.evaluate(limit=c.eval_limit, modes=modes), c.eval_limit, False
                        )
                        self.periodic.append({"step": 0, "results": res})
                self.grid("grid_before.png")
        if self.distributed:
            dist.barrier()
        self.sync_servers(force=True)
        from tqdm import tqdm

        bar = tqdm(total=c.max_steps, initial=self.step, desc="grpo", disable=not self.progress, dynamic_ncols=True)
        metrics_path = os.path.join(self.out, "metrics.jsonl")
        while self.step < c.max_steps:
            m = self.train_step()
            if self.rank == 0:
                self.history.append({k: v for k, v in m.items() if k not in ("prompts", "seeds")})
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                self._tb(m)
                bar.update(1)
                bar.set_postfix(
                    task=m["task"],
                    reward=f"{m['reward_mean']:.3f}",
                    S=f"{m['reward_semantic']:.2f}",
                    Q=f"{m['reward_quality']:.2f}",
                )
            if (
                c.eval_every
                and self.step % c.eval_every == 0
                and self.step < c.max_steps
                and self.rank == 0
                and self.before is not None
            ):
                res = self.evaluate(limit=c.eval_limit, modes=[m_ for m_ in EVAL_MODES if not m_[2]])
                self.periodic.append({"step": self.step, "results": res})
                self._tb({"step": self.step, **{f"eval_{k}/overall": v["overall"] for k, v in res.items()}})
                bar.write(f"step {self.step}: held-out " + ", ".join(f"{k} {v['overall']:.3f}" for k, v in res.items()))
            if self.step % c.checkpoint_every == 0 or self.step == c.max_steps:
                self.checkpoint()
            if self.distributed:
                dist.barrier()
        bar.close()
        summary = {"steps": self.step, "restarts": self.restarts}
        saved = None
        if self.fsdp:  # collective: the last checkpoint (a 0-step run has none) and the gathered weights
            if self._broadcast(not os.path.exists(self.ckpt_path)):
                self.checkpoint()
            from .fsdp import save_policy

            saved = save_policy(self.policy, c, os.path.join(self.out, "policy"), self.rank)
        if self.rank == 0:
            if not os.path.exists(self.ckpt_path):  # the loop checkpoints its last step; a 0-step run has none
                self.checkpoint()
            after = self.evaluate(limit=c.eval_final_limit) if self.before is not None else None
            if after is not None:
                write_json_atomic(after, os.path.join(self.out, "eval_after.json"))
            if os.path.exists(os.path.join(self.out, "grid_before.png")):
                files["grid before training"] = os.path.join(self.out, "grid_before.png")
            grid_after = self.grid("grid_after.png")
            if grid_after:
                files["grid after training"] = grid_after
            files.update(plot_panels(self.out, self.history, self.periodic, self.before, after))
            files["metrics (JSONL)"] = metrics_path
            files["checkpoint"] = self.ckpt_path
            weights = saved or self.policy.save(os.path.join(self.out, "policy"))
            files["trained weights (full, merged)"] = weights
            report = write_report(
                self.out,
                c.to_dict(),
                self.before,
                after,
                self.history,
                self.periodic,
                files,
                self.elapsed(),
                self.task.results_table,
            )
            summary.update(
                before=self.before,
                after=after,
                report=report,
                table=before_after_table(self.before, after) if self.before and after else "",
            )
            if self._writer:
                self._writer.close()
        if self.distributed:
            dist.barrier()
        return summary

    def close(self) -> None:
        self.pool.close()
