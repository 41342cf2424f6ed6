"""BAGEL-7B-MoT's model core: modules under the official names, loading of the official folder,
and the functional core (prefill / text steps / velocity / guidance) the policy is built on.
docs/bagel.md describes the layout, the quirks and the API."""
from .config import BagelConfig
from .cache import KVCache
from .core import (Plan, Prefill, Span, SpecialTokens, Text, VaeImage, VitImage, attention_mask, chunk_attend,
                   forward_embeds, latent_embeds, lm_head_weight, plan_contexts, prefill, text_logits, text_step,
                   text_step_hidden, velocity, vit_embeds)
from .guidance import cfg_active, cfg_combine, euler_step, timestep_schedule
from .images import (grid_position_ids, patchify, preprocess, resize_dims, resize_pixels, to_pixels, unpatchify,
                     vae_sizes, vit_pixels, vit_sizes)
from .loading import Bagel, CheckpointError, assign_tensors, build_model, load_bagel, load_model
from .modeling import BagelModel
from .tokens import BagelTokens, load_tokenizer
from .vae import FLUX_VAE_CONFIG, FluxVAE, load_flux_vae

__all__ = [
    "Bagel", "BagelConfig", "BagelModel", "BagelTokens", "CheckpointError", "FLUX_VAE_CONFIG", "FluxVAE",
    "KVCache", "Plan", "Prefill", "Span", "SpecialTokens", "Text", "VaeImage", "VitImage", "assign_tensors", "attention_mask", "build_model",
    "cfg_active", "cfg_combine", "chunk_attend", "euler_step", "forward_embeds", "grid_position_ids", "latent_embeds",
    "lm_head_weight", "load_bagel", "load_flux_vae", "load_model", "load_tokenizer", "patchify", "plan_contexts", "prefill",
    "preprocess", "resize_dims", "resize_pixels", "text_logits", "text_step", "text_step_hidden", "timestep_schedule", "to_pixels",
    "unpatchify", "vae_sizes", "velocity", "vit_embeds", "vit_pixels", "vit_sizes",
]
