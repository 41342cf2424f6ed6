"""BAGEL's autoencoder: the FLUX VAE as diffusers' AutoencoderKL, loaded from ae.safetensors.

ae.safetensors keeps Black Forest Labs' original names (encoder.down.0.block.0.norm1.weight, ...,
decoder.up.3.upsample.conv.weight, attention as 1x1 convolutions). diffusers' own single-file
converter (loaders.single_file_utils.convert_ldm_vae_checkpoint) is run on *meta* tensors of the
file's shapes to learn the name map and the reshapes, so no weight is read twice; then each tensor
streams from the memory-mapped file into the meta-built AutoencoderKL. The FLUX configuration is
written here (nothing is fetched); channel widths and blocks per level are read off the file's
shapes (BAGEL-7B-MoT: 128/256/512/512, 2 blocks), so a tiny VAE with the same geometry (16 latent
channels, /8) loads through the same path.

Latents are normalised as BAGEL does: z = scale * (mean - shift) with scale 0.3611, shift 0.1159.
The official encoder samples the posterior; encode() takes its mean unless sample=True.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open

from .config import VAE_LATENT_CHANNELS, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from .loading import CheckpointError, assign_tensors

# black-forest-labs/FLUX.1 ae.safetensors as an AutoencoderKL (diffusers' vae/config.json of FLUX.1)
FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=VAE_LATENT_CHANNELS,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=VAE_SCALING_FACTOR,
    shift_factor=VAE_SHIFT_FACTOR,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)


def vae_config_from_shapes(shapes: Dict[str, Tuple[int, ...]]) -> dict:
    """FLUX_VAE_CONFIG with block_out_channels / layers_per_block read from BFL-named shapes."""
    try:
        levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        widths = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels)
        blocks = len({m.group(1) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
        z2 = shapes["encoder.conv_out.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"ae.safetensors: missing {e.args[0]} (not a FLUX VAE in BFL layout)") from None
    if z2 != 2 * VAE_LATENT_CHANNELS or len(levels) != 4:
        raise CheckpointError(
            f"ae.safetensors: {len(levels)} levels and {z2 // 2} latent channels; "
            f"BAGEL's FLUX VAE has 4 levels (/8) and {VAE_LATENT_CHANNELS} channels"
        )
    return dict(FLUX_VAE_CONFIG, block_out_channels=widths, layers_per_block=blocks)


def bfl_to_diffusers_map(shapes: Dict[str, Tuple[int, ...]], config: dict) -> Dict[str, str]:
    """diffusers name -> BFL name, from diffusers' converter run on meta tensors."""
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    owner = {id(t): k for k, t in meta.items()}
    converted = convert_ldm_vae_checkpoint(meta, config)
    out = {}
    for new_key, t in converted.items():
        base = t if t._base is None else t._base  # conv->linear reshapes are views of the source
        out[new_key] = owner[id(base)]
    return out


class FluxVAE:
    """encode: images -> normalised latents [B, 16, H/8, W/8]; decode: latents -> images."""

    def __init__(self, ae: AutoencoderKL):
        self.ae = ae
        self.scale = VAE_SCALING_FACTOR
        self.shift = VAE_SHIFT_FACTOR

    @property
    def device(self):
        return self.ae.encoder.conv_in.weight.device

    @property
    def dtype(self):
        return self.ae.encoder.conv_in.weight.dtype

    def encode(self, images, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images: uint8 [B, H, W, 3] (numpy or tensor) or float [B, 3, H, W] in [-1, 1]; H, W
        multiples of 8 (16 for whole latent tokens). Returns z = scale (latent - shift) [B, 16, H/8, W/8]."""
        x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        if x.dtype == torch.uint8:
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"expected uint8 [B, H, W, 3], got {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of 8")
        dist = self.ae.encode(x.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z - self.shift) * self.scale

    def decode_float(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1] (differentiable)."""
        return self.ae.decode(z.to(self.device, self.dtype) / self.scale + self.shift).sample

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> uint8 [B, 8h, 8w, 3] (as the official decode_image)."""
        x = self.decode_float(z).float()
        x = ((x * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
        return x.permute(0, 2, 3, 1)


def load_flux_vae(path: str, device="cpu", dtype=torch.float32) -> FluxVAE:
    """ae.safetensors (BFL names) -> FluxVAE on `device` in `dtype`; a missing, extra or
    mis-shaped tensor is a CheckpointError naming it."""
    with safe_open(path, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    config = vae_config_from_shapes(shapes)
    name_map = bfl_to_diffusers_map(shapes, config)
    with torch.device("meta"):
        ae = AutoencoderKL(**config)
    assign_tensors(ae, path, name_map, device=device, dtype=dtype, label="ae.safetensors")
    ae.eval().requires_grad_(False)  # never trained; decode_float stays differentiable in z
    return FluxVAE(ae)
