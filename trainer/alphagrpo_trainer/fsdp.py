"""FSDP2 for full fine-tuning of a policy larger than one device (TrainConfig.fsdp, under torchrun).

The policy names its units (Policy.fsdp_modules: for BAGEL every MoT layer and the ViT tower); each
becomes one `fully_shard` group over all ranks (resharded after its forward), so parameters,
gradients and AdamW state of the units live 1/world per rank; the rest (embeddings, LM head, small
heads) stays replicated and its gradients are all-reduced here. FSDP averages the units' gradients
itself (reduce-scatter).

A sharded policy computes only collectively, so in this mode every rank takes part in what reads
the full weights (weight pushes, checkpoints, the final save; rank 0 writes and pushes), and the
trainer skips its own held-out evaluations and grids: evaluate the saved policy afterwards
(`alphagrpo eval policy` or a server). LoRA runs do not need it (adapters are small): fsdp needs
lora_rank 0.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def shard(policy, device: str) -> int:
    """Shards the policy's units over the default process group; returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _, units = policy.fsdp_modules()
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for unit in units:
        # every unit is its own FSDP root (the policy calls them, not one root forward): ask for the
        # reshard explicitly, or FSDP keeps a root's parameters gathered after its forward
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    return len(units)


def average_grads(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """All-reduce (mean) the gradients FSDP has not reduced: those of replicated parameters."""
    for p in params:
        if p.grad is not None and not isinstance(p.grad, DTensor):
            dist.all_reduce(p.grad)
            p.grad /= world


def clip_grad_norm(params, max_norm: float) -> float:
    """torch's clip_grad_norm_, also for a mix of sharded (DTensor) and replicated gradients: the
    squared norms of the local shards are summed over ranks, the replicated ones counted once."""
    params = [p for p in params if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    dev = next(p.grad.to_local().device if isinstance(p.grad, DTensor) else p.grad.device for p in params)
    sharded = torch.zeros((), dtype=torch.float64, device=dev)
    replicated = torch.zeros((), dtype=torch.float64, device=dev)
    for p in params:
        if isinstance(p.grad, DTensor):
            sharded += p.grad.to_local().double().square().sum()
        else:
            replicated += p.grad.double().square().sum()
    dist.all_reduce(sharded)
    total = math.sqrt(float(sharded + replicated))
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total


def gathered(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Full tensors (on the CPU) for a dict that may hold DTensors: collective, every rank calls it
    with the same names in the same order."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(policy, opt) -> Tuple[dict, dict]:
    """(model state, optimizer state) as full tensors on rank 0 (other ranks: empty): collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root, _ = policy.fsdp_modules()
    model = get_model_state_dict(root, options=_options(cpu_offload=True))
    optim = get_optimizer_state_dict(root, opt, options=_options(cpu_offload=True))
    return model, optim


def load_full_state(policy, opt, model: dict, optim: dict) -> None:
    """Restores full_state()'s dicts (every rank holds them) into the sharded policy and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    root, _ = policy.fsdp_modules()
    set_model_state_dict(root, model, options=_options())
    set_optimizer_state_dict(root, opt, optim, options=_options())


def save_policy(policy, cfg, path: str, rank: int) -> Optional[str]:
    """The trained policy where load() reads it back: the full weights are gathered (collective),
    then rank 0 loads an unsharded copy on the CPU and saves it. Returns the path on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from alphagrpo_serve.models.registry import load_policy

    root, _ = policy.fsdp_modules()
    state = get_model_state_dict(root, options=_options(cpu_offload=True))
    if rank != 0:
        return None
    plain = load_policy(cfg.policy["name"], cfg.policy["path"], "cpu", cfg.dtype)
    plain.load_state_dict(state)
    return plain.save(path)
