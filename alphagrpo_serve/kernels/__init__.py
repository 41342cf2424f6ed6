"""Fused kernels for flow-matching GRPO: Python API over torch.ops.alphagrpo.

Each op dispatches to the native kernel (C++ on CPU, CUDA on GPU) when the extension is built
for the tensors' device, and otherwise to its plain-PyTorch twin in `reference` (with a one-time
warning). `reference` is the specification the native kernels are tested against.
"""

from . import reference
from ._registry import build_info, have_extension
from .flow_sde import SdeStep, flow_sde_logprob, flow_sde_step
from .grpo import LossOutput, flow_grpo_loss, grpo_advantages, grpo_linear_token_loss, grpo_token_loss
from .reference import cfg_combine, step_mean_kl

__all__ = [
    "LossOutput",
    "SdeStep",
    "build_info",
    "cfg_combine",
    "flow_grpo_loss",
    "flow_sde_logprob",
    "flow_sde_step",
    "grpo_advantages",
    "grpo_linear_token_loss",
    "grpo_token_loss",
    "have_extension",
    "reference",
    "step_mean_kl",
]
