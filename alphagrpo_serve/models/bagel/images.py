"""Pixels, patches and position ids the way BAGEL lays them out (official data/data_utils.py and
data/transforms.py): patches flatten as (row, col) with (p, q, c)-ordered pixels inside; a patch's
position id is row * max_per_side + col (the 'extrapolate' rule)."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[..., C, H, W] -> [..., (H/p)(W/p), p*p*C] (BAGEL's 'chpwq->hwpqc' order). Used for ViT pixels
    (p = ViT patch) and for VAE latents (p = 2: 64-dim latent tokens)."""
    *lead, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"patchify: {h}x{w} is not a multiple of {p}")
    x = x.reshape(*lead, c, h // p, p, w // p, p)
    x = x.permute(*range(len(lead)), -4, -2, -3, -1, -5)  # ..., h, w, p, q, c
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, grid: Tuple[int, int], p: int, c: int) -> torch.Tensor:
    """Inverse of patchify: [..., h*w, p*p*c] with grid (h, w) -> [..., c, h*p, w*p]."""
    h, w = grid
    *lead, n, d = tokens.shape
    if n != h * w or d != p * p * c:
        raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} do not fit grid {grid} with p={p}, c={c}")
    x = tokens.reshape(*lead, h, w, p, p, c)
    x = x.permute(*range(len(lead)), -1, -5, -3, -4, -2)  # ..., c, h, p, w, q
    return x.reshape(*lead, c, h * p, w * p)


def grid_position_ids(grid: Tuple[int, int], max_per_side: int, device=None) -> torch.Tensor:
    """Flattened ids row * max_per_side + col of an (h, w) patch grid -> [h*w] long."""
    h, w = grid
    if h > max_per_side or w > max_per_side:
        raise ValueError(f"a {h}x{w} patch grid exceeds the position table ({max_per_side} per side)")
    rows = torch.arange(h, device=device)[:, None] * max_per_side
    return (rows + torch.arange(w, device=device)).reshape(-1)


def resize_dims(
    width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int = 14 * 14 * 9 * 1024
) -> Tuple[int, int]:
    """BAGEL's MaxLongEdgeMinShortEdgeResize: (new_width, new_height), both multiples of `stride`,
    long edge <= max_size, short edge >= min_size where possible, at most max_pixels pixels."""

    def divisible(v):
        return max(stride, int(round(v / stride) * stride))

    def scaled(w, h, s):
        return divisible(round(w * s)), divisible(round(h * s))

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_w, new_h = scaled(width, height, scale)
    if new_w * new_h > max_pixels:
        new_w, new_h = scaled(new_w, new_h, max_pixels / (new_w * new_h))
    if max(new_w, new_h) > max_size:
        new_w, new_h = scaled(new_w, new_h, max_size / max(new_w, new_h))
    return new_w, new_h


def to_pixels(image) -> torch.Tensor:
    """uint8 [H, W, 3] (numpy or tensor) -> float32 [3, H, W] in [-1, 1] (ToTensor, Normalize 0.5/0.5)."""
    t = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {t.dtype} {tuple(t.shape)}")
    return (t.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def resize_pixels(pixels: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
    """[3, H, W] float -> [3, h, w], bicubic with antialiasing (torchvision's default for tensors)."""
    if tuple(pixels.shape[-2:]) == tuple(size_hw):
        return pixels
    return F.interpolate(pixels[None], size=size_hw, mode="bicubic", antialias=True, align_corners=False)[0]


def preprocess(image, max_size: int, min_size: int, stride: int) -> torch.Tensor:
    """BAGEL's ImageTransform: uint8 [H, W, 3] -> [3, h, w] in [-1, 1] resized by resize_dims.
    ViT: (980, 224, 14) for BAGEL-7B-MoT; VAE: (1024, 512, 16)."""
    pixels = to_pixels(image)
    new_w, new_h = resize_dims(pixels.shape[2], pixels.shape[1], max_size, min_size, stride)
    return resize_pixels(pixels, (new_h, new_w))


def vit_sizes(cfg) -> Tuple[int, int, int]:
    """(max_size, min_size, stride) of BAGEL's ViT transform: (980, 224, 14) for BAGEL-7B-MoT
    (vit_max_num_patch_per_side x patch, 224, patch), clipped for smaller towers."""
    p = cfg.vit.patch_size
    top = cfg.vit_max_num_patch_per_side * p
    return top, min(224, top), p


def vae_sizes(cfg) -> Tuple[int, int, int]:
    """(max_size, min_size, stride) of BAGEL's VAE transform: (1024, 512, 16) for BAGEL-7B-MoT
    (max_latent_size x 16, 512, 16), clipped for smaller latent tables."""
    s = cfg.pixels_per_latent_token
    top = cfg.max_latent_size * s
    return top, min(512, top), s


def vit_pixels(cfg, image) -> torch.Tensor:
    """uint8 [H, W, 3] -> ViT input [3, h, w] in [-1, 1] as BAGEL's vit_transform prepares it."""
    return preprocess(image, *vit_sizes(cfg))
