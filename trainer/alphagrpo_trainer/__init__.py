"""alphagrpo_trainer: the GRPO trainer client (RT2I and SRR) for alphagrpo servers.

It talks to servers through the wire contract (alphagrpo_serve.client), computes losses with
alphagrpo_serve.kernels on its own copy of the policy, and pushes new weights back. Entry point:
`alphagrpo train --config CONFIG.yaml` (see configs/ and TrainConfig for every field).
"""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
